"""Optuna studies over LADC's calibration hyperparameters (m, alpha, beta, tau) on a backbone's cached
features: one MLflow parent run per study, one nested child run per trial, the best trial refitted,
registered once and promoted when it beats the champion.

Any number of worker processes may run one study at once, and any of them may be killed at any
moment: trials are created under a lock and counted so that the study ends with exactly `n_trials`
finished trials; each worker holds a lock file for its lifetime, so the trials and MLflow runs of a
dead worker are failed (KILLED) and replaced by the next worker that looks; each process seeds its
sampler differently, so a restart or a second worker never replays the same configurations.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from . import tracking
from .errors import LadcError, check
from .params import SearchSpace, Stage2Params
from .stage2_tracking import Backbone, run_stage2

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
HOST = socket.gethostname()


@dataclass(frozen=True)
class StudySpec:
    """What a study searches and how long: validated before any work starts."""

    n_trials: int
    space: SearchSpace
    params: Stage2Params          # the fixed stage-2 settings (method, classifier, epochs, ...)
    name: str | None = None       # default: ladc-<dataset>-<backbone[:8]>-<method>-<classifier>
    storage: str | None = None    # journal file (default mlruns/optuna/journal.log) or an RDB URL
    sampler_seed: int = 0
    timeout: float | None = None  # stop starting trials after this many seconds
    promote: bool = True
    register: bool = True

    def __post_init__(self):
        check(self.n_trials >= 1, f"--n-trials {self.n_trials} must be >= 1")
        check(self.params.method in ("ladc", "ladc_avg"), f"tuning searches LADC's m, alpha, beta, tau: --method "
                                                          f"must be ladc or ladc_avg, not {self.params.method}")
        check(self.timeout is None or self.timeout > 0, f"--timeout {self.timeout} must be > 0 seconds")


# ---------------------------------------------------------------- storage

def check_storage(storage: str | None, default_dir: Path) -> None:
    """Check an Optuna storage location without creating anything: a journal file whose folder can be
    written, an sqlite file likewise, or an RDB URL whose driver is installed."""
    if storage is None or storage.endswith(".log") or storage.startswith("journal:"):
        path = journal_path(storage, default_dir)
        where = "--storage" if storage else "the default Optuna journal"
        tracking.check_writable_dir(path.parent, f"{where} {path}", "pass a writable --storage path")
        check(not path.exists() or path.is_file(), f"{where} {path} is not a file: pass a .log file path")
        return
    scheme = storage.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        check(storage.startswith("sqlite:///"), f"--storage {storage}: write sqlite URLs as sqlite:///PATH")
        tracking.check_writable_dir(Path(storage[len("sqlite:///"):]).parent, f"--storage {storage}",
                                    "pass a writable sqlite:///PATH")
        return
    drivers = {"postgresql": ("psycopg2", "psycopg2-binary"), "mysql": ("pymysql", "pymysql")}
    check(scheme in drivers, f"--storage {storage}: unknown storage; use a .log journal file, sqlite:///PATH, "
                             f"postgresql://USER:PW@HOST/DB or mysql://...")
    module, package = drivers[scheme]
    import importlib.util
    check("+" in storage.split(":", 1)[0] or importlib.util.find_spec(module) is not None,
          f"--storage {storage} needs the {module} driver: pip install {package}")


def journal_path(storage: str | None, default_dir: Path) -> Path:
    if storage and storage.startswith("journal:"):
        storage = storage[len("journal:"):]
    return Path(storage) if storage else Path(default_dir) / "journal.log"


def open_storage(storage: str | None, default_dir: Path):
    """(Optuna storage, description): a journal file (safe for several processes on one machine) or an
    RDB URL (postgresql://, mysql://, sqlite:///), with heartbeats so crashed workers' trials are failed."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None or storage.endswith(".log") or storage.startswith("journal:"):
        path = journal_path(storage, default_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            st = JournalStorage(JournalFileBackend(str(path)))
            st.get_all_studies()  # reads the journal: a damaged line shows here, not mid-study
            return st, f"journal:{path.resolve()}"
        except (ValueError, json.JSONDecodeError):
            raise LadcError(torn_journal_message(path)) from None
        except OSError as e:
            raise LadcError(f"cannot open the Optuna journal {path} ({e.strerror}): pass a writable "
                            f"--storage path") from None
    last = None
    for attempt in range(5):  # several workers creating the tables of a new database at once
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return RDBStorage(storage, heartbeat_interval=60, grace_period=180), storage
        except Exception as e:
            last = e
            time.sleep(0.2 * (attempt + 1))
    raise LadcError(f"cannot open Optuna storage {storage} ({type(last).__name__}: "
                    f"{str(last).splitlines()[0][:120]}): check the URL and that the database is reachable")


def torn_journal_message(path: Path) -> str:
    """Name the first line of an Optuna journal that is not a complete JSON record."""
    line_no = "?"
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError
                json.loads(line)
            except ValueError:
                line_no = i
                break
    return (f"Optuna journal {path} is damaged at line {line_no} (a write cut short, e.g. by a full disk): "
            f"delete that line (sed -i '{line_no}d' {path}) to keep the other trials, or pass a new --storage")


# ---------------------------------------------------------------- locks and workers

class FileLock:
    """An exclusive flock on a file (one machine), released by the kernel when the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class Worker:
    """This process as a worker of a study. It holds an flock on its own file for its lifetime, so any
    other process on this machine can tell whether it is alive (pid reuse cannot fool it)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.id = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.f = open(self._file(self.id), "w")
        fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self

    def __exit__(self, *exc):
        self.f.close()
        self._file(self.id).unlink(missing_ok=True)

    def _file(self, worker_id: str) -> Path:
        return self.folder / worker_id.replace(":", "_")

    def is_dead(self, worker_id: str | None) -> bool:
        """True when `worker_id` is a worker of this machine that no longer runs; False when it runs or
        belongs to another machine (RDB heartbeats cover those)."""
        if not worker_id or not worker_id.startswith(HOST + ":"):
            return False
        path = self._file(worker_id)
        if not path.exists():
            return True
        try:
            with open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
            return True
        except BlockingIOError:
            return False


def reclaim_dead(study: optuna.Study, worker: Worker, experiment_id: str, local: bool) -> int:
    """Fail the RUNNING trials of dead workers, and end their MLflow runs KILLED. Call it while holding
    the study's ask lock: then a RUNNING trial without a worker (killed between its creation and its
    first bookkeeping) is dead too on a local journal, and on an RDB after two minutes."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        age = time.time() - t.datetime_start.timestamp() if t.datetime_start else 0.0
        if worker.is_dead(owner) or (owner is None and (local or age > 120)):
            study._storage.set_trial_user_attr(t._trial_id, "failed_because", "its worker died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
    runs = mlflow.search_runs([experiment_id], output_format="list", filter_string=(
        f"tags.study_name = '{study.study_name}' and attributes.status = 'RUNNING' and tags.stage != 'study'"))
    for r in runs:
        if worker.is_dead(r.data.tags.get("worker")):
            mlflow.MlflowClient().set_terminated(r.info.run_id, "KILLED")
    return n


def load_or_create(name: str, storage, attrs: dict, lock: Path, sampler_seed: int, worker: Worker):
    """The study `name`, created when new (under a lock, so workers started together do not race), its
    attributes checked, with a sampler seeded for this process: the creator of a new study uses
    `sampler_seed` (one worker reproduces a study), every later process a seed derived from it, the
    number of trials so far and its worker id, so restarts and parallel workers draw new points."""
    with FileLock(lock):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            for k, v in attrs.items():
                got = study.user_attrs.get(k)
                check(got == v, f"study '{name}' exists with {k} {got}, not {v}: pick another --study-name")
            created = False
        except KeyError:
            created = True
            try:
                study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
            except optuna.exceptions.DuplicatedStudyError:  # another machine created it meanwhile (RDB)
                created = False
                study = optuna.load_study(study_name=name, storage=storage)
            for k, v in attrs.items():
                study.set_user_attr(k, v)
        n_before = len(study.get_trials(deepcopy=False))
    seed = sampler_seed if created else int.from_bytes(hashlib.sha256(
        f"{sampler_seed}:{n_before}:{worker.id}".encode()).digest()[:4], "little")
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), seed


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


# ---------------------------------------------------------------- trials

def suggest(trial: optuna.Trial, space: SearchSpace) -> dict:
    out = {}
    for name, (lo, hi) in space.items():
        if lo == hi:
            out[name] = lo
        elif name == "m":
            out[name] = trial.suggest_int("m", lo, hi)
        else:
            out[name] = trial.suggest_float(name, lo, hi, log=(name == "beta" and lo > 0))
    return out


def run_trial(trial: optuna.Trial, bb: Backbone, spec: StudySpec, space: SearchSpace, parent_id: str,
              worker: Worker, log) -> float:
    """One stage-2 fit = one nested MLflow run; returns validation top-1 (raises TrialPruned when pruned)."""
    hp = suggest(trial, space)
    p = spec.params.replace(**hp)
    pruned = {"at": None}

    def on_epoch(epoch, rec):
        trial.report(rec["val_top1"], epoch)
        if trial.should_prune():
            pruned["at"] = epoch
            return True
        return False

    t0 = time.perf_counter()
    name = f"trial-{trial.number:03d} m{hp['m']} a{hp['alpha']:.3f} b{hp['beta']:.3f} t{hp['tau']:.3f}"
    tags = {"stage": "trial", "study_name": trial.study.study_name, "trial_number": str(trial.number),
            "worker": worker.id}
    try:
        rid, reports, _, _, _ = run_stage2(bb, p, parent_run_id=parent_id, name=name, tags=tags, plots=False,
                                           model=False, on_epoch=on_epoch, progress=False)
    except Exception as e:
        log(f"trial {trial.number:3d} failed: {type(e).__name__}: {e}")
        raise
    value = reports["val"]["top1"]
    for k in ("top1", "many", "medium", "few"):
        trial.set_user_attr(f"test_{k}", reports["test"][k])
    trial.set_user_attr("mlflow_run_id", rid)
    state = "pruned" if pruned["at"] else "complete"
    mlflow.MlflowClient().set_tag(rid, "trial_state", state)
    log(f"trial {trial.number:3d}  m={hp['m']} alpha={hp['alpha']:.3f} beta={hp['beta']:.3f} tau={hp['tau']:.3f}  "
        f"val {value:6.2f}  {state}{'@' + str(pruned['at']) if pruned['at'] else ''}  "
        f"{time.perf_counter() - t0:.1f}s")
    if pruned["at"]:
        raise optuna.TrialPruned()
    return value


# ---------------------------------------------------------------- the study

def run_study(bb: Backbone, spec: StudySpec, log=print, state_dir: Path | None = None) -> dict:
    """Run (or join, or resume) a study on a loaded backbone until it has exactly `spec.n_trials` finished
    trials, then refit, register and maybe promote its best trial (once per study, whichever worker
    gets there first). Returns a summary dict."""
    state_dir = Path(state_dir or tracking.MLRUNS / "optuna")
    fs, p = bb.fs, spec.params
    from . import calibration as cal

    space = spec.space.for_heads(len(cal.head_classes(fs.counts, p.head_fraction)))
    storage, storage_desc = open_storage(spec.storage, state_dir)
    name = spec.name or f"ladc-{bb.dataset}-{bb.run_id[:8]}-{p.method}-{p.classifier}"
    attrs = {"dataset": bb.dataset, "backbone_run": bb.run_id, "method": p.method, "classifier": p.classifier}
    local = not isinstance(storage, optuna.storages.RDBStorage)
    exp = tracking.experiment_id(bb.dataset)
    with Worker(state_dir / f"{name}.workers") as worker:
        lock = state_dir / f"{name}.lock"
        try:
            study, seed = load_or_create(name, storage, attrs, lock, spec.sampler_seed, worker)
        except (ValueError, json.JSONDecodeError):  # a journal line damaged after it was opened
            raise LadcError(torn_journal_message(journal_path(spec.storage, state_dir))) from None
        with FileLock(lock):  # one parent run per study, also with several processes
            parent_id = parent_run_for(name, exp)
            if parent_id is None:
                parent_id = create_parent_run(bb, spec, space, name, storage_desc, exp)
        result = {"study_name": name, "backbone_run": bb.run_id, "parent_run_id": parent_id, "sampler_seed": seed,
                  "worker": worker.id}
        with tracking.tracked_run(run_id=parent_id):
            t0 = time.perf_counter()
            ran = work(study, bb, spec, space, parent_id, worker, lock, exp, local, log)
            log(f"study {name}: {finished(study)}/{spec.n_trials} finished trials ({ran} run here, "
                f"{time.perf_counter() - t0:.1f}s; storage {storage_desc})")
            with FileLock(lock):
                log_study_summary(study, space)
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not complete:
                raise LadcError(f"study {name} has no complete trial: see the failed trials in the MLflow UI")
            best = study.best_trial
            result.update(best_value=best.value, best_params=best.params, n_finished=finished(study),
                          best_test_top1=best.user_attrs.get("test_top1"), n_run_here=ran)
            log(f"best trial {best.number}: {fmt_params(best.params)}  val {best.value:.2f}  "
                f"test {best.user_attrs.get('test_top1', float('nan')):.2f}")
            log(f"MLflow UI (after `mlflow ui --backend-store-uri {tracking.tracking_uri()}`): "
                f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning")
            if spec.register and finished(study) >= spec.n_trials:
                with FileLock(lock):  # several workers: the best trial is registered once
                    result.update(register_best(study, best, space, bb, spec, parent_id, name, worker, log))
    return result


def work(study, bb, spec, space, parent_id, worker, lock, exp, local, log) -> int:
    """Start trials until the study holds n_trials finished ones. A worker that finds the study full of
    running trials waits: one of them may fail and need replacing. Returns the trials run here."""
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    ran = 0
    while True:
        with FileLock(lock):
            reclaimed = reclaim_dead(study, worker, exp, local)
            if reclaimed:
                log(f"failed {reclaimed} trial(s) of a worker that died; they will be replaced")
            trials = study.get_trials(deepcopy=False)
            n_done = sum(t.state in DONE for t in trials)
            n_running = sum(t.state == TrialState.RUNNING for t in trials)
            if n_done >= spec.n_trials:
                return ran
            if deadline is not None and time.monotonic() > deadline:
                log(f"--timeout {spec.timeout:g}s reached: no new trials ({n_done}/{spec.n_trials} finished)")
                return ran
            trial = None
            if n_done + n_running < spec.n_trials:
                trial = study.ask()
                trial.set_user_attr("worker", worker.id)
        if trial is None:
            time.sleep(0.5)
            continue
        if not local and surplus(study, trial, spec.n_trials):  # several machines, no shared lock
            study.tell(trial, state=TrialState.FAIL)
            continue
        try:
            value = run_trial(trial, bb, spec, space, parent_id, worker, log)
            study.tell(trial, value)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except (Exception, KeyboardInterrupt) as e:
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(e, KeyboardInterrupt):
                raise
        ran += 1


def surplus(study, trial, n_trials) -> bool:
    earlier = [t for t in study.get_trials(deepcopy=False, states=DONE + (TrialState.RUNNING,))
               if t.number < trial.number]
    return len(earlier) >= n_trials


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def create_parent_run(bb: Backbone, spec: StudySpec, space: SearchSpace, name: str, storage_desc: str,
                      exp: str) -> str:
    p = spec.params
    client = mlflow.MlflowClient()
    run_id = client.create_run(exp, run_name=f"study-{name}", tags={
        "stage": "study", "dataset": bb.dataset, "backbone_run_id": bb.run_id, "study_name": name,
        "storage": storage_desc, "method": p.method, "classifier": p.classifier,
        "mlflow.note.content": f"Optuna study {name}: {spec.n_trials} trials over "
                               f"{', '.join(space.free())} of {p.method} + {p.classifier} on backbone {bb.run_id}; "
                               f"each nested run is a trial",
        **tracking.environment_tags(bb.fs.x["train"].device)}).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in {
        **{f"search.{k}": list(v) for k, v in space.items()}, "n_trials": spec.n_trials,
        "sampler_seed": spec.sampler_seed, **{f"stage2.{k}": v for k, v in tracking.flatten(p.as_dict()).items()}}.items()])
    return run_id


def register_best(study, best, space: SearchSpace, bb: Backbone, spec: StudySpec, parent_id: str, study_name: str,
                  worker: Worker, log) -> dict:
    """Refit the best trial's configuration as a child run with its model, register it as ladc-<dataset>
    (once per study and trial) and promote it when it beats the champion."""
    from . import registry

    client = mlflow.MlflowClient()
    name = registry.model_name(bb.dataset)
    already = [v for v in registry.versions(client, name)
               if v.tags.get("study") == study_name and v.tags.get("trial") == str(best.number)]
    if already:
        log(f"best trial already registered as {name} v{already[0].version}")
        return {"version": already[0].version, "promoted": False}
    bp = spec.params.replace(**{k: best.params.get(k, lo) for k, (lo, hi) in space.items()})
    rid, reports, _, info, _ = run_stage2(bb, bp, parent_run_id=parent_id, name=f"best-trial-{best.number:03d}",
                                          tags={"stage": "best", "study_name": study_name, "worker": worker.id},
                                          progress=False)
    version, promoted, prev = registry.register(
        info["model_uri"], bb.dataset, reports["val"]["top1"], reports["test"]["top1"],
        {"study": study_name, "trial": best.number, "backbone_run": bb.run_id, "run_id": rid,
         **{k: f"{v:.4g}" if isinstance(v, float) else v
            for k, v in ((k, getattr(bp, k)) for k in ("m", "alpha", "beta", "tau", "method", "classifier"))}},
        promote=spec.promote)
    mlflow.set_tags({"registered_version": version, "promoted": str(promoted)})
    if promoted:
        log(f"registered {name} v{version} and promoted it to @champion"
            + (f" (replaces v{prev.version}, val {prev.tags.get('val_top1')})" if prev else ""))
    else:
        log(f"registered {name} v{version}; @champion stays "
            + (f"v{prev.version} (val {prev.tags.get('val_top1')})" if prev else "unset (--no-promote)"))
    return {"version": version, "promoted": promoted, "refit_val_top1": reports["val"]["top1"]}


def log_study_summary(study: optuna.Study, space: SearchSpace) -> None:
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
                        "val_top1": best.value, "test_top1": best.user_attrs.get("test_top1", float("nan")),  # UI columns
                        "n_complete": len(complete), "n_pruned": len(study.get_trials(states=(TrialState.PRUNED,)))})
    # tags, not params: a resumed study may find a new best, and params cannot change
    mlflow.set_tags({"best_trial": str(best.number), **{f"best_{k}": f"{v:.4g}" for k, v in best.params.items()}})
    mlflow.log_dict({"number": best.number, "value": best.value, "params": best.params,
                     "test": {k: best.user_attrs.get(f"test_{k}") for k in ("top1", "many", "medium", "few")}},
                    "study/best_trial.json")
    from optuna.visualization import matplotlib as ovm

    from .plots import log_figure

    free = space.free()
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
