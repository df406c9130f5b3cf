#!/usr/bin/env python
"""Wall time of a tuning study on CIFAR-10-LT-sized features (12,406 x 64) and the share of it spent in
MLflow logging (targets on the 2-core CPU: 50 trials <= 5 minutes, logging <= 20%).

Runs the product's own study (`ladc.tuning.run_study`: one nested MLflow run per trial, per-epoch
pruning, the worker bookkeeping) in a temporary tracking store and journal storage, timing every MLflow
call made during the study.

  python benchmarks/tune_speed.py [--n-trials 50] [--features cache/features/KEY.pt]
"""

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage2_speed import synthetic_features  # noqa: E402

from ladc import tracking  # noqa: E402
from ladc.config import config_path  # noqa: E402
from ladc.features import load_cached  # noqa: E402
from ladc.params import SearchSpace, Stage2Params  # noqa: E402
from ladc.stage2_tracking import Backbone  # noqa: E402
from ladc.tuning import StudySpec, open_storage, run_study  # noqa: E402

SPENT = {"s": 0.0, "depth": 0}


def timed(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        if SPENT["depth"]:
            return fn(*a, **k)
        SPENT["depth"] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT["s"] += time.perf_counter() - t
            SPENT["depth"] -= 1
    return wrapper


def instrument():
    """Time every MLflow entry point the trial code uses (fluent API and client)."""
    for name in ("start_run", "end_run", "log_params", "log_metrics", "set_tags", "set_tag", "log_artifact",
                 "log_figure", "search_runs", "active_run"):
        setattr(mlflow, name, timed(getattr(mlflow, name)))
    C = mlflow.tracking.MlflowClient
    for name in ("log_batch", "set_tag", "set_terminated", "create_run", "get_run"):
        setattr(C, name, timed(getattr(C, name)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-trials", type=int, default=50)
    ap.add_argument("--features", help="a cached feature file instead of synthetic CIFAR-10-LT-sized features")
    args = ap.parse_args()
    fs = load_cached(Path(args.features), Path(args.features).stem) if args.features else synthetic_features()
    cfg = yaml.safe_load(config_path("cifar10_lt").read_text())
    with tempfile.TemporaryDirectory(prefix="ladc-tune-bench-") as d:
        tmp = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        tracking.setup_tracking()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        instrument()
        bb = Backbone("synthetic", {}, {"dataset": "bench"}, fs)
        spec = StudySpec(n_trials=args.n_trials, space=SearchSpace.from_config(cfg["tune"]),
                         params=Stage2Params.from_dict(cfg["stage2"]), name="bench", register=False)
        t0 = time.perf_counter()
        res = run_study(bb, spec, log=lambda *a: None, state_dir=tmp / "optuna")  # the product's own study code
        total = time.perf_counter() - t0
        study = optuna.load_study(study_name="bench", storage=open_storage(None, tmp / "optuna")[0])
        states = [t.state.name for t in study.trials]
    print(f"features {tuple(fs.x['train'].shape)}, {args.n_trials} trials "
          f"({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {states.count('FAIL')} failed)")
    print(f"study wall time {total:.1f} s ({total / args.n_trials:.2f} s/trial), MLflow logging {SPENT['s']:.1f} s "
          f"= {SPENT['s'] / total * 100:.1f}% of it; best val top-1 {res['best_value']:.2f}")


if __name__ == "__main__":
    main()
