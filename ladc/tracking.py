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


def check_writable_dir(folder: Path, what: str) -> None:
    """A one-line error unless `folder` (or, when it does not exist yet, its nearest existing parent) is a
    folder this process can write in. Creates nothing."""
    folder = Path(folder).resolve()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LadcError(f"{what}: {probe} is not a folder; pick another location")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise LadcError(f"{what}: cannot write in {probe} ({e.strerror}); pick a writable location "
                        f"(or set MLFLOW_TRACKING_URI)") from None


def check_tracking_store(uri: str | None = None) -> None:
    """Before any work: an sqlite store must be writable (MLflow would retry for minutes, then fail)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        check_writable_dir(db.parent, f"tracking store {uri}")
        if db.exists() and not os.access(db, os.W_OK):
            raise LadcError(f"tracking store {db} is read-only: make it writable or set MLFLOW_TRACKING_URI")


def setup_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI when set, else the sqlite store mlruns/mlflow.db (artifacts in
    mlruns/artifacts). Returns the URI in use. A new sqlite store is created under a lock, so processes
    started together do not race on its tables."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.tracking.fluent"):
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
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri)
    try:
        return mlflow.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


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
    return df.rename(columns=lambda c: c.split(".")[-1] if c != "tags.mlflow.runName" else "name")


def latest_stage1_run(data_cfg: dict) -> str | None:
    """The newest FINISHED stage-1 run with the same dataset spec (dataset, imbalance factor, seed,
    validation size), or None."""
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    df = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.end_time DESC"],
                            filter_string=f"tags.stage = 'stage1' and tags.dataset = '{data_cfg['dataset']}' "
                                          f"and attributes.status = 'FINISHED'")
    keys = [k for k in ("imbalance_factor", "seed", "val_per_class") if k in data_cfg]
    for _, row in df.iterrows():
        if all(num(row.get(f"params.data.{k}")) == num(data_cfg.get(k)) for k in keys):
            return row.run_id
    return None
