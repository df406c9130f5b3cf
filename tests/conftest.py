import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A temporary MLflow tracking store (never the repo's mlruns/)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    from ladc.tracking import setup_tracking
    setup_tracking()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def synthetic_cfg(**stage1) -> dict:
    cfg = yaml.safe_load((ROOT / "experiments" / "synthetic_lt.yaml").read_text())
    cfg["stage1"].update(stage1)
    return cfg


@pytest.fixture(scope="session")
def backbone(tmp_path_factory):
    """One tiny synthetic stage-1 run in a session-wide temporary store: (uri, run_id, cache_dir)."""
    import mlflow

    from ladc.stage1 import train_stage1
    from ladc.tracking import setup_tracking

    d = tmp_path_factory.mktemp("backbone")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    setup_tracking()
    run_id = train_stage1(synthetic_cfg(), progress=False)
    if old is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    mlflow.set_tracking_uri(old or "")
    return uri, run_id, d / "cache"
