#!/usr/bin/env python
"""Tune LADC's (m, alpha, beta, tau) with Optuna: `python tune.py --help` (see ladc/cli.py)."""

from ladc.cli import run_script, tune_main as main

if __name__ == "__main__":
    run_script(main)
