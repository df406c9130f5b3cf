#!/usr/bin/env python
"""Train LADC: stage 1 (backbone with Representation Enhancement), stage 2 (classifier re-balancing on
frozen features), or both. Every run is tracked in MLflow (default store: mlruns/mlflow.db).

  python train.py stage1 --dataset cifar10_lt --data-root data/cifar10-jpeg --epochs 30
  python train.py stage1 --resume RUN_ID
  python train.py stage2 --backbone-run RUN_ID --method ladc --classifier lws_plus
  python train.py table  --backbone-run RUN_ID          # every method of the paper's tables
  python train.py all    --dataset cifar10_lt --epochs 30
  python train.py runs   --stage stage1                # run ids, newest first
"""

from __future__ import annotations

import argparse
import sys

from ladc.cli_common import add_data_args, add_stage1_args, resolve_config
from ladc import cli_stage2
from ladc.errors import cli_main


def cmd_stage1(args) -> None:
    from ladc.stage1 import train_stage1

    if args.resume:
        run_id = train_stage1({}, resume_run_id=args.resume)
    else:
        run_id = train_stage1(resolve_config(args))
    print(f"stage-1 run {run_id} finished")


def cmd_runs(args) -> None:
    import pandas as pd

    from ladc.tracking import list_runs, setup_tracking

    print(f"tracking store: {setup_tracking()}")
    df = list_runs(args.dataset, args.stage, args.n)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False) if not df.empty else "no runs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s1 = sub.add_parser("stage1", help="train a backbone (Remix + RandAugment), tracked in MLflow")
    add_data_args(s1)
    add_stage1_args(s1)
    s1.add_argument("--resume", metavar="RUN_ID", help="continue a killed stage-1 run from its last checkpoint")
    s1.set_defaults(func=cmd_stage1)
    cli_stage2.add_commands(sub, add_data_args, add_stage1_args)
    rl = sub.add_parser("runs", help="list recent runs and their ids")
    rl.add_argument("--dataset")
    rl.add_argument("--stage", help="stage1 | stage2 | table | study | trial")
    rl.add_argument("-n", type=int, default=20)
    rl.set_defaults(func=cmd_runs)
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
