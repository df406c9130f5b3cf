#!/usr/bin/env python
"""Wall time of a tuning study on CIFAR-10-LT-sized features (12,406 x 64) and the share of it spent in
MLflow logging (targets on the 2-core CPU: 50 trials <= 5 minutes, logging <= 20%).

Runs the same objective as tune.py (one nested MLflow run per trial, per-epoch pruning) in a temporary
tracking store and journal storage, timing every MLflow call made during the study.

  python benchmarks/tune_speed.py [--n-trials 50] [--features cache/features/KEY.pt]
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage2_speed import synthetic_features  # noqa: E402

from ladc import calibration as cal, tracking, tuning  # noqa: E402
from ladc.config import config_path  # noqa: E402
from ladc.features import load_cached  # noqa: E402

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
    p = cfg["stage2"]
    tmp = Path(tempfile.mkdtemp(prefix="ladc-tune-bench-"))
    import os
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.setup_tracking()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    instrument()
    space = tuning.search_space(cfg["tune"], len(cal.head_classes(fs.counts, p["head_fraction"])))
    storage, desc = tuning.open_storage(None, tmp / "optuna")
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10))
    exp = tracking.experiment_id("bench")
    t0 = time.perf_counter()
    parent = mlflow.MlflowClient().create_run(exp, run_name="study-bench", tags={"stage": "study"}).info.run_id
    ctx = dict(fs=fs, ckpt=None, data_cfg={"dataset": "bench"}, p=p, space=space, n_trials=args.n_trials,
               parent_run_id=parent, backbone_run="synthetic", log=lambda *a: None)
    with tracking.tracked_run(run_id=parent):
        study.optimize(tuning.make_objective(ctx), n_trials=args.n_trials, catch=(Exception,))
        tuning.log_study_summary(study, space)
    total = time.perf_counter() - t0
    states = [t.state.name for t in study.trials]
    print(f"features {tuple(fs.x['train'].shape)}, {args.n_trials} trials "
          f"({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {states.count('FAIL')} failed)")
    print(f"study wall time {total:.1f} s ({total / args.n_trials:.2f} s/trial), MLflow logging {SPENT['s']:.1f} s "
          f"= {SPENT['s'] / total * 100:.1f}% of it; best val top-1 {study.best_value:.2f}")


if __name__ == "__main__":
    main()
