"""MLflow plumbing: the default store under mlruns/, experiments per dataset, runs that always end
FINISHED, FAILED or KILLED, and the environment/code version every run records."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow

from . import __version__
from .config import ROOT
from .errors import LadcError

MLRUNS = Path(os.environ.get("LADC_MLRUNS", Path.cwd() / "mlruns"))


def default_tracking_uri() -> str:
    return f"sqlite:///{(MLRUNS / 'mlflow.db').resolve()}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_writable_dir(folder: Path, what: str, fix: str) -> None:
    """A one-line error (`what`, the problem, `fix`) unless `folder` can be written in, or created where it
    does not exist yet (its nearest existing parent is a writable folder). Creates nothing."""
    folder = Path(folder).resolve()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    verb = "write in" if probe == folder else "create"
    if not probe.is_dir():
        raise LadcError(f"{what}: cannot {verb} {folder} ({probe} is not a folder); {fix}")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise LadcError(f"{what}: cannot {verb} {folder} ({e.strerror} in {probe}); {fix}") from None


def check_tracking_store(uri: str | None = None) -> None:
    """Before any work: an sqlite store must be writable (MLflow would retry for minutes, then fail)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        fix = ("set MLFLOW_TRACKING_URI to a writable sqlite:///PATH" if os.environ.get("MLFLOW_TRACKING_URI")
               else "run from a writable folder or set MLFLOW_TRACKING_URI=sqlite:///PATH")
        check_writable_dir(db.parent, f"tracking store {uri}", fix)
        if db.exists() and not os.access(db, os.W_OK):
            raise LadcError(f"tracking store {db} is read-only: make it writable or set MLFLOW_TRACKING_URI")


def setup_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI when set, else the sqlite store mlruns/mlflow.db (artifacts in
    mlruns/artifacts). Returns the URI in use. A new sqlite store is created under a lock, so processes
    started together do not race on its tables."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.tracking.fluent",
                 "mlflow.tracking._model_registry.fluent", "mlflow.models.model", "mlflow.pyfunc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _READY:
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / ".mlflow.db.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            mlflow.MlflowClient().search_experiments(max_results=1)  # creates or migrates the tables once
        _READY.add(uri)
    return uri


_READY: set = set()


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None  # a server or other store decides


def experiment_id(dataset: str) -> str:
    """The MLflow experiment of a dataset ('ladc-<dataset>'), created on first use."""
    uri = mlflow.get_tracking_uri()
    name = f"ladc-{dataset}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None and EXPERIMENT_KIND[0] in exp.tags:
        return exp.experiment_id
    if exp is None:
        root = _artifact_root(uri)
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            exp_id = mlflow.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    client = mlflow.MlflowClient()
    client.set_experiment_tag(exp_id, "mlflow.note.content", (
        f"LADC on {dataset}: stage-1 backbones (stage1-...), stage-2 fits (stage2-...), the paper's tables "
        f"(table-...) and Optuna studies (study-..., whose nested runs are the trials). Add the columns "
        f"params m/alpha/beta/tau and metrics val_top1/test_top1 to compare runs."))
    client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)  # open in the model-training view, not GenAI's
    return exp_id


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except Exception:
        pass
    return f"v{__version__}"


def environment_tags(device) -> dict[str, str]:
    import torch

    tags = {"code_version": code_version(), "ladc_version": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "mlflow": mlflow.__version__, "device": str(device),
            "host": platform.node()}
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    return tags


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else str(list(v))
    return out


@contextlib.contextmanager
def tracked_run(run_name: str | None = None, experiment: str | None = None, run_id: str | None = None,
                tags: dict | None = None, nested: bool = False, parent_run_id: str | None = None):
    """Start (or resume by run_id) an MLflow run that ends FINISHED on success, KILLED on Ctrl-C or
    SIGTERM, FAILED on any other exception."""
    kwargs = dict(run_id=run_id) if run_id else dict(run_name=run_name, experiment_id=experiment)
    if parent_run_id:
        kwargs["parent_run_id"] = parent_run_id
    run = mlflow.start_run(nested=nested, tags=tags if not run_id else None, **kwargs)
    if run_id and tags:
        mlflow.set_tags(tags)
    old = None
    if not nested:
        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        try:
            old = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old = None
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def list_runs(dataset: str | None = None, stage: str | None = None, max_results: int = 20):
    """A pandas table of recent ladc runs (newest first) for the terminal."""
    filters = [f"tags.stage = '{stage}'"] if stage else []
    if dataset:
        filters.append(f"tags.dataset = '{dataset}'")
    df = mlflow.search_runs(search_all_experiments=True, filter_string=" and ".join(filters),
                            order_by=["attributes.start_time DESC"], max_results=max_results)
    if df.empty:
        return df
    cols = ["run_id", "tags.mlflow.runName", "status", "tags.stage", "tags.dataset", "metrics.val_top1",
            "metrics.test_top1", "start_time"]
    df = df[[c for c in cols if c in df.columns]]
    return df.rename(columns=lambda c: c.split(".")[-1] if c != "tags.mlflow.runName" else "name").round(2)


def latest_stage1_run(data_cfg: dict, statuses=("FINISHED",)) -> str | None:
    """The newest stage-1 run in one of `statuses` with the same dataset spec (dataset, imbalance factor,
    seed, validation size), or None."""
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    df = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"],
                            filter_string=f"tags.stage = 'stage1' and tags.dataset = '{data_cfg['dataset']}'")
    if df.empty:
        return None
    df = df[df.status.isin(statuses)]
    keys = [k for k in ("imbalance_factor", "seed", "val_per_class") if k in data_cfg]
    for _, row in df.iterrows():
        if all(num(row.get(f"params.data.{k}")) == num(data_cfg.get(k)) for k in keys):
            return row.run_id
    return None


def interrupted_stage1_run(data_cfg: dict) -> str | None:
    """The newest stage-1 run of this data spec that was interrupted (KILLED, FAILED, or RUNNING with no
    live process: a kill -9) and has a checkpoint to continue from, or None."""
    run_id = latest_stage1_run(data_cfg, statuses=("KILLED", "FAILED", "RUNNING"))
    if run_id is None:
        return None
    run = mlflow.get_run(run_id)
    if run.info.status == "RUNNING" and time.time() * 1000 - run_last_activity(run_id) < 10 * 60 * 1000:
        return None  # probably still training in another process
    has_ckpt = any(a.path == "checkpoints/last.pt" for a in mlflow.MlflowClient().list_artifacts(run_id, "checkpoints"))
    return run_id if has_ckpt else None


def run_last_activity(run_id: str) -> float:
    """Milliseconds timestamp of a run's last logged train_loss (its start when none)."""
    hist = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    return max([m.timestamp for m in hist], default=mlflow.get_run(run_id).info.start_time)


def log_dataset(spec: dict, classes, counts, digest: str, context: str = "training") -> None:
    """The long-tailed training set as an MLflow dataset input of the active run (the UI's Dataset
    column): name from the spec, a digest of the spec, and the per-class counts as its table."""
    import pandas as pd

    imf = spec.get("imbalance_factor")
    name = f"{spec.get('dataset')}" + (f"-if{imf:g}" if isinstance(imf, (int, float)) else "") + f"-s{spec.get('seed', 0)}"
    df = pd.DataFrame({"class": list(classes), "train_count": [int(c) for c in counts]})
    import warnings

    try:
        with warnings.catch_warnings():  # MLflow's hint about integer columns with missing values: none here
            warnings.simplefilter("ignore", UserWarning)
            mlflow.log_input(mlflow.data.from_pandas(df, name=name, digest=digest[:16]), context=context)
    except Exception as e:  # the dataset is a convenience for the UI; never fail a run over it
        logging.getLogger(__name__).warning("dataset input not logged: %s", e)
