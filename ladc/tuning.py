"""Optuna studies over LADC's calibration hyperparameters (m, alpha, beta, tau) on cached features,
with one MLflow parent run per study and one nested child run per trial."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from .errors import LadcError, check
from .stage2_run import run_stage2

PARAMS = ("m", "alpha", "beta", "tau")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class SurplusTrial(Exception):
    """This trial would exceed the study's n_trials (another worker filled it)."""


def search_space(tune_cfg: dict, num_heads: int) -> dict:
    """{param: (lo, hi)} from the config, checked: m within [1, #head classes], alpha >= 0, beta > 0,
    tau >= 0, lo <= hi, and at least one parameter free."""
    space = {}
    for name in PARAMS:
        bounds = tune_cfg.get(name)
        check(isinstance(bounds, (list, tuple)) and len(bounds) == 2,
              f"search bounds for {name} must be [low, high], got {bounds!r}")
        lo, hi = bounds
        check(lo <= hi, f"empty search space: {name} low {lo} > high {hi}; give low <= high")
        space[name] = (lo, hi)
    m_lo, m_hi = space["m"]
    check(isinstance(m_lo, int) and isinstance(m_hi, int), f"m bounds {space['m']} must be integers")
    check(m_lo >= 1, f"m low {m_lo} is out of range: m >= 1")
    check(m_lo <= num_heads, f"m low {m_lo} is out of range: there are only {num_heads} head classes")
    space["m"] = (m_lo, min(m_hi, num_heads))
    check(space["alpha"][0] >= 0, f"alpha low {space['alpha'][0]} is out of range: alpha >= 0")
    check(space["beta"][0] > 0, f"beta low {space['beta'][0]} is out of range: beta > 0")
    check(space["tau"][0] >= 0, f"tau low {space['tau'][0]} is out of range: tau >= 0")
    check(any(lo < hi for lo, hi in space.values()),
          "empty search space: every parameter is fixed (low == high); widen at least one range")
    return space


def suggest(trial: optuna.Trial, space: dict) -> dict:
    out = {}
    for name, (lo, hi) in space.items():
        if lo == hi:
            out[name] = lo
        elif name == "m":
            out[name] = trial.suggest_int("m", lo, hi)
        else:
            out[name] = trial.suggest_float(name, lo, hi, log=(name == "beta" and lo > 0))
    return out


def open_storage(storage: str | None, default_dir: Path):
    """Optuna storage: a journal file (default mlruns/optuna/journal.log, safe for several processes on
    one machine), a .log path, or an RDB URL (postgresql://, mysql://, sqlite:///)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None or storage.endswith(".log") or storage.startswith("journal:"):
        path = Path(storage[len("journal:"):] if storage and storage.startswith("journal:") else
                    storage or default_dir / "journal.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path.resolve()}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return RDBStorage(storage, heartbeat_interval=60, grace_period=180), storage
    except Exception as e:
        raise LadcError(f"cannot open Optuna storage {storage} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                        f"check the URL and that the database is reachable") from None


def fail_dead_local_trials(study: optuna.Study) -> int:
    """RUNNING trials started on this host by a process that no longer exists (a killed tune.py) are
    marked FAIL, so the study can go on; their MLflow runs were ended by the same kill or are ended here."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        if not worker.startswith(host + ":"):
            continue
        pid = int(worker.split(":")[1])
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        rid = t.user_attrs.get("mlflow_run_id")
        if rid and mlflow.get_run(rid).info.status == "RUNNING":
            mlflow.MlflowClient().set_terminated(rid, "KILLED")
        n += 1
    return n


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def make_objective(study_ctx: dict):
    """The Optuna objective: one stage-2 fit = one nested MLflow run; value = validation top-1."""
    fs, ckpt, data_cfg, p0 = study_ctx["fs"], study_ctx["ckpt"], study_ctx["data_cfg"], study_ctx["p"]
    space, n_trials, parent = study_ctx["space"], study_ctx["n_trials"], study_ctx["parent_run_id"]
    log = study_ctx["log"]

    def objective(trial: optuna.Trial) -> float:
        # trials before this one that count or may still count: never run more than n_trials
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=DONE + (TrialState.RUNNING,))
                   if t.number < trial.number]
        if len(earlier) >= n_trials:
            trial.study.stop()
            raise SurplusTrial()
        trial.set_user_attr("worker", WORKER)
        hp = suggest(trial, space)
        p = {**p0, **hp, "seed": p0.get("seed", 0)}
        pruned = {"at": None}

        def on_epoch(epoch, rec):
            trial.report(rec["val_top1"], epoch)
            if trial.should_prune():
                pruned["at"] = epoch
                return True
            return False

        t0 = time.perf_counter()
        name = f"trial-{trial.number:03d} m{hp['m']} a{hp['alpha']:.3f} b{hp['beta']:.3f} t{hp['tau']:.3f}"
        tags = {"stage": "trial", "study_name": trial.study.study_name, "trial_number": str(trial.number)}
        started = {}

        def remember_run():
            run = mlflow.active_run()
            if run is not None and "id" not in started:
                started["id"] = run.info.run_id
                trial.set_user_attr("mlflow_run_id", run.info.run_id)

        try:
            rid, reports, hist, info, _ = run_stage2(
                study_ctx["backbone_run"], p, fs=fs, ckpt=ckpt, data_cfg=data_cfg, parent_run_id=parent, name=name,
                tags=tags, plots=False, model=False, on_epoch=lambda e, r: (remember_run(), on_epoch(e, r))[1],
                progress=False)
        except Exception as e:
            remember_run()
            if "id" in started:
                mlflow.MlflowClient().set_tag(started["id"], "trial_state", "failed")
            log(f"trial {trial.number:3d} failed: {type(e).__name__}: {e}")
            raise
        value = reports["val"]["top1"]
        for k in ("top1", "many", "medium", "few"):
            trial.set_user_attr(f"test_{k}", reports["test"][k])
        trial.set_user_attr("mlflow_run_id", rid)
        state = "pruned" if pruned["at"] else "complete"
        mlflow.MlflowClient().set_tag(rid, "trial_state", state)
        dt = time.perf_counter() - t0
        try:
            best = trial.study.best_trial
            best_s = f"best {max(best.value, value) if best.value is not None else value:.2f}"
        except ValueError:
            best_s = f"best {value:.2f}"
        log(f"trial {trial.number:3d}  m={hp['m']} alpha={hp['alpha']:.3f} beta={hp['beta']:.3f} tau={hp['tau']:.3f}  "
            f"val {value:6.2f}  {best_s}  {state}{'@' + str(pruned['at']) if pruned['at'] else ''}  {dt:.1f}s")
        if pruned["at"]:
            raise optuna.TrialPruned()
        return value

    return objective


def log_study_summary(study: optuna.Study, space: dict) -> None:
    """Parent-run artifacts: the trials table, best params/value, and the study plots."""
    import matplotlib

    matplotlib.use("Agg")
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    with tempfile.TemporaryDirectory() as d:
        df.to_csv(Path(d) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "trials.csv"), "study")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = study.best_trial
    mlflow.log_metrics({"best_val_top1": best.value, "best_test_top1": best.user_attrs.get("test_top1", float("nan")),
                        "n_complete": len(complete), "n_pruned": len(study.get_trials(states=(TrialState.PRUNED,)))})
    # tags, not params: a resumed study may find a new best, and params cannot change
    mlflow.set_tags({"best_trial": str(best.number), **{f"best_{k}": str(v) for k, v in best.params.items()}})
    mlflow.log_dict({"number": best.number, "value": best.value, "params": best.params,
                     "test": {k: best.user_attrs.get(f"test_{k}") for k in ("top1", "many", "medium", "few")}},
                    "study/best_trial.json")
    import warnings

    from optuna.visualization import matplotlib as ovm

    from .plots import log_figure

    free = [k for k, (lo, hi) in space.items() if lo < hi]
    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "slice": lambda: ovm.plot_slice(study, params=free)}
    if len(complete) >= 3 and len(free) >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(study)
        plots["contour"] = lambda: ovm.plot_contour(study, params=free[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in plots.items():
            try:
                ax = make()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                log_figure(fig, f"study/{name}.png")
            except Exception as e:  # a plot that cannot be drawn (too few trials) never fails the study
                mlflow.set_tag(f"plot_{name}_skipped", f"{type(e).__name__}: {str(e)[:200]}")


def parent_run_for(study_name: str, experiment_id: str) -> str | None:
    df = mlflow.search_runs([experiment_id], filter_string=f"tags.stage = 'study' and tags.study_name = '{study_name}'",
                            order_by=["attributes.start_time DESC"], max_results=1)
    return None if df.empty else df.run_id[0]
