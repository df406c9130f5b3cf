#!/usr/bin/env python
"""Tune LADC's calibration hyperparameters (m, alpha, beta, tau) with Optuna on the cached features of a
trained backbone; every trial is a nested MLflow run; the best classifier is registered as
ladc-<dataset> and becomes @champion when it beats the current champion on validation accuracy.

  python tune.py --dataset cifar10_lt                       # newest matching backbone, or train one first
  python tune.py --dataset cifar10_lt --n-trials 100 --study-name my-study   # rerun to resume
  python tune.py --dataset cifar10_lt --backbone-run RUN_ID --tau 0.8 1.6 --no-promote
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

from ladc.errors import LadcError, check, cli_main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help="cifar10_lt | cifar100_lt | imagefolder_lt | synthetic_lt")
    ap.add_argument("--config", help="a YAML config instead of experiments/<dataset>.yaml")
    ap.add_argument("--data-root", help="where the data lives (for training a backbone or extracting features)")
    ap.add_argument("--backbone-run", metavar="RUN_ID",
                    help="stage-1 run to tune on (default: the newest finished one for this data spec)")
    ap.add_argument("--backbone-epochs", type=int,
                    help="epochs of the stage-1 run trained when none exists (default: tune.backbone_epochs)")
    ap.add_argument("--n-trials", type=int, help="total finished trials of the study (default: tune.n_trials)")
    ap.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    ap.add_argument("--study-name", help="Optuna study name; an existing study is resumed")
    ap.add_argument("--storage", help="Optuna storage: a .log journal file (default mlruns/optuna/journal.log) or "
                                      "an RDB URL such as postgresql://user:pw@host/db")
    ap.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    ap.add_argument("--method", default=None, help="stage-2 method (default ladc)")
    ap.add_argument("--classifier", default=None, help="stage-2 classifier (default lws_plus)")
    for name, kind in (("m", int), ("alpha", float), ("beta", float), ("tau", float)):
        ap.add_argument(f"--{name}", type=kind, nargs=2, metavar=("LOW", "HIGH"),
                        help=f"search bounds of {name} (default: tune.{name} in the config)")
    ap.add_argument("--stage2-epochs", type=int, help="stage-2 epochs per trial (paper: 30)")
    ap.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                    help="give the best model the champion alias when it beats the current one (default: on)")
    ap.add_argument("--cache-dir", default="cache/features", help="feature cache folder")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any config value (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="no per-trial lines")
    return ap


def same_spec(params: dict, data_cfg: dict) -> bool:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    keys = ("imbalance_factor", "seed", "val_per_class")
    return all(num(params.get(f"data.{k}")) == num(data_cfg.get(k)) for k in keys if k in data_cfg)


def find_backbone(data_cfg: dict) -> str | None:
    """The newest FINISHED stage-1 run with the same dataset spec."""
    import mlflow

    df = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.end_time DESC"],
                            filter_string=f"tags.stage = 'stage1' and tags.dataset = '{data_cfg['dataset']}' "
                                          f"and attributes.status = 'FINISHED'")
    for _, row in df.iterrows():
        params = {c[len("params."):]: row[c] for c in df.columns if c.startswith("params.")}
        if same_spec(params, data_cfg):
            return row.run_id
    return None


def run(args) -> dict:
    import mlflow
    import optuna

    from ladc import calibration as cal
    from ladc import tracking, tuning
    from ladc.config import apply_overrides, load_config, scale_schedule, set_if_given
    from ladc.stage1 import train_stage1
    from ladc.stage2 import validate_stage2
    from ladc.stage2_run import load_backbone_features

    uri = tracking.setup_tracking()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.backbone_run and not args.dataset and not args.config:
        from ladc.stage1 import download_checkpoint
        args.dataset = json.loads(download_checkpoint(args.backbone_run)["config"])["data"]["dataset"]
    check(args.dataset or args.config, "no dataset given: pass --dataset NAME (e.g. cifar10_lt)")
    cfg = apply_overrides(load_config(args.dataset, args.config), args.set)
    set_if_given(cfg["data"], data_root=args.data_root)
    tcfg = cfg["tune"]
    set_if_given(tcfg, n_trials=args.n_trials, m=args.m, alpha=args.alpha, beta=args.beta, tau=args.tau,
                 backbone_epochs=args.backbone_epochs)
    n_trials = int(tcfg["n_trials"])
    check(n_trials >= 1, f"--n-trials {n_trials} must be >= 1")
    p = cfg["stage2"]
    set_if_given(p, method=args.method, classifier=args.classifier, epochs=args.stage2_epochs)
    validate_stage2(p)
    check(p["method"] in ("ladc", "ladc_avg"), f"tuning searches LADC's m, alpha, beta, tau: --method must be "
                                               f"ladc or ladc_avg, not {p['method']}")
    dataset = cfg["data"]["dataset"]

    backbone = args.backbone_run or find_backbone(cfg["data"])
    if backbone is None:
        epochs = int(tcfg.get("backbone_epochs", cfg["stage1"]["epochs"]))
        log(f"no finished stage-1 run for {dataset} (IF {cfg['data'].get('imbalance_factor')}, seed "
            f"{cfg['data'].get('seed')}) in {uri}: training one for {epochs} epochs first "
            f"(--backbone-epochs N to shorten)")
        s1 = cfg["stage1"]
        if epochs != s1["epochs"]:
            scale_schedule(s1, epochs)
        backbone = train_stage1(cfg, progress=not args.quiet)
    log(f"backbone run {backbone}")
    ckpt, data_cfg, fs = load_backbone_features(backbone, args.data_root, args.cache_dir, p.get("device"))
    heads = cal.head_classes(fs.counts, p["head_fraction"])
    space = tuning.search_space(tcfg, len(heads))

    storage, storage_desc = tuning.open_storage(args.storage, tracking.MLRUNS / "optuna")
    study_name = args.study_name or f"ladc-{dataset}-{backbone[:8]}-{p['method']}-{p['classifier']}"
    attrs = {"dataset": dataset, "backbone_run": backbone, "method": p["method"], "classifier": p["classifier"]}
    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
        for k, v in attrs.items():
            got = existing.user_attrs.get(k)
            check(got == v, f"study '{study_name}' exists with {k} {got}, not {v}: pick another --study-name")
    except KeyError:
        pass
    except LadcError:
        raise
    except Exception as e:
        raise LadcError(f"cannot reach Optuna storage {storage_desc} ({type(e).__name__}): check --storage") from None
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=args.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10))
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    if (n := tuning.fail_dead_local_trials(study)):
        log(f"marked {n} trial(s) of a killed run FAIL")

    exp = tracking.experiment_id(dataset)
    lock_path = tracking.MLRUNS / "optuna" / f"{study_name}.lock"
    with study_lock(lock_path):  # one parent run per study, also with several processes
        parent_id = tuning.parent_run_for(study_name, exp)
        if parent_id is None:
            parent_id = mlflow.MlflowClient().create_run(exp, run_name=f"study-{study_name}", tags={
                "stage": "study", "dataset": dataset, "backbone_run_id": backbone, "study_name": study_name,
                "storage": storage_desc, "method": p["method"], "classifier": p["classifier"],
                **tracking.environment_tags(fs.x["train"].device)}).info.run_id
            mlflow.MlflowClient().log_batch(parent_id, params=[mlflow.entities.Param(k, str(v)) for k, v in {
                **{f"search.{k}": list(v) for k, v in space.items()}, "n_trials": n_trials, "seed": args.seed,
                **{f"stage2.{k}": v for k, v in tracking.flatten(p).items()}}.items()])

    result = {"study_name": study_name, "backbone_run": backbone, "parent_run_id": parent_id}
    with tracking.tracked_run(run_id=parent_id):
        done = tuning.finished(study)
        if done < n_trials:
            log(f"study {study_name}: {done} finished trials, running up to {n_trials - done} more "
                f"(storage {storage_desc})")
            ctx = dict(fs=fs, ckpt=ckpt, data_cfg=data_cfg, p=p, space=space, n_trials=n_trials,
                       parent_run_id=parent_id, backbone_run=backbone, log=log)

            def stop_when_full(study, trial):
                if tuning.finished(study) >= n_trials:
                    study.stop()

            t0 = time.perf_counter()
            study.optimize(tuning.make_objective(ctx), timeout=args.timeout, callbacks=[stop_when_full],
                           catch=(Exception,), gc_after_trial=False)
            log(f"study time {time.perf_counter() - t0:.1f}s")
        else:
            log(f"study {study_name} already has {done} finished trials (>= {n_trials}): nothing to run")
        with study_lock(lock_path):
            tuning.log_study_summary(study, space)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise LadcError(f"study {study_name} has no complete trial: see the failed trials in the MLflow UI")
        best = study.best_trial
        result.update(best_value=best.value, best_params=best.params, best_test_top1=best.user_attrs.get("test_top1"),
                      n_finished=tuning.finished(study))
        log(f"best trial {best.number}: {best.params}  val {best.value:.2f}  test {best.user_attrs.get('test_top1'):.2f}")
        with study_lock(lock_path):  # several workers: the best trial is registered once
            result.update(register_best(study, best, space, p, backbone, fs, ckpt, data_cfg, parent_id, dataset,
                                        study_name, args.promote, log))
    return result


def register_best(study, best, space, p, backbone, fs, ckpt, data_cfg, parent_id, dataset, study_name, promote,
                  log) -> dict:
    """Refit the best trial's configuration as a child run with its model, register it as ladc-<dataset>
    (once per study and trial) and promote it when it beats the champion."""
    import mlflow

    from ladc import registry
    from ladc.stage2_run import run_stage2

    result = {}
    client = mlflow.MlflowClient()
    name = registry.model_name(dataset)
    already = [v for v in (client.search_model_versions(f"name = '{name}'") if _has_model(client, name) else [])
               if v.tags.get("study") == study_name and v.tags.get("trial") == str(best.number)]
    if already:
        result.update(version=already[0].version, promoted=False)
        log(f"best trial already registered as {name} v{already[0].version}")
        return result
    bp = {**p, **{k: v for k, v in best.params.items()}}
    for k, (lo, hi) in space.items():
        bp.setdefault(k, lo)
    rid, reports, _, info, _ = run_stage2(backbone, bp, fs=fs, ckpt=ckpt, data_cfg=data_cfg, parent_run_id=parent_id,
                                          name=f"best-trial-{best.number:03d}", tags={"stage": "best",
                                          "study_name": study_name}, progress=False)
    version, promoted, prev = registry.register(
        info["model_uri"], dataset, reports["val"]["top1"], reports["test"]["top1"],
        {"study": study_name, "trial": best.number, "backbone_run": backbone, "run_id": rid,
         **{k: bp[k] for k in ("m", "alpha", "beta", "tau", "method", "classifier")}}, promote=promote)
    mlflow.set_tags({"registered_version": version, "promoted": str(promoted)})
    result.update(version=version, promoted=promoted, refit_val_top1=reports["val"]["top1"])
    if promoted:
        log(f"registered {name} v{version} and promoted it to @champion"
            + (f" (replaces v{prev.version}, val {prev.tags.get('val_top1')})" if prev else ""))
    else:
        log(f"registered {name} v{version}; @champion stays "
            + (f"v{prev.version} (val {prev.tags.get('val_top1')})" if prev else "unset (--no-promote)"))
    return result


class study_lock:
    """An exclusive file lock (one machine) around work that must happen once per study."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _has_model(client, name) -> bool:
    import mlflow

    try:
        client.get_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException:
        return False


@cli_main
def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
