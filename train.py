#!/usr/bin/env python
"""Train LADC: `python train.py stage1|stage2|table|all|runs --help` (see ladc/cli.py)."""

from ladc.cli import run_script, train_main as main

if __name__ == "__main__":
    run_script(main)
