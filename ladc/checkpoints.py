"""Stage-1 checkpoints: written atomically, read with torch.load(weights_only=True) and checked for the
keys a ladc checkpoint has, downloaded from a run without leaving files behind."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

import mlflow
import torch

from .errors import LadcError, check
from .models import create_model

CHECKPOINT = "checkpoints/last.pt"
KEYS = ("model", "optimizer", "epoch", "config", "data_spec", "num_classes", "backbone", "mean", "std")


def save_checkpoint(path: Path, model, optimizer, epoch: int, cfg: dict, data, history: list | None = None) -> None:
    """Model, optimizer, epoch, config, data spec and RNG states; `history` = metrics logged so far."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "config": json.dumps(cfg), "data_spec": json.dumps(data.spec), "num_classes": data.num_classes,
        "backbone": cfg["stage1"]["backbone"], "mean": list(data.mean), "std": list(data.std),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def load_checkpoint(source, name: str | None = None) -> dict:
    """A ladc checkpoint from a path or bytes, loaded weights-only; anything else is a one-line error."""
    name = name or str(source)
    try:
        ckpt = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except Exception as e:
        raise LadcError(f"checkpoint {name} cannot be read ({type(e).__name__}): it is not a ladc checkpoint; "
                        f"use a stage-1 run's {CHECKPOINT}") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    check(not missing, f"checkpoint {name} is not a ladc stage-1 checkpoint (missing {', '.join(missing)}): "
                       f"use a stage-1 run's {CHECKPOINT}")
    return ckpt


def download_checkpoint(run_id: str) -> dict:
    """The last checkpoint of a stage-1 run, in memory (no file is left behind); `sha256` is the hash of
    its bytes (the feature cache key)."""
    try:
        run = mlflow.get_run(run_id)
    except Exception:
        raise LadcError(f"run {run_id} does not exist in {mlflow.get_tracking_uri()}: "
                        f"pass the id of a stage-1 run (see the MLflow UI or `python train.py runs`)") from None
    check(run.data.tags.get("stage") == "stage1", f"run {run_id} is a {run.data.tags.get('stage', 'non-ladc')} "
                                                   f"run, not a stage-1 run: pass a stage-1 run id")
    with tempfile.TemporaryDirectory(prefix="ladc-dl-") as d:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT, dst_path=d)
        except Exception:
            if run.info.status == "FINISHED":
                raise LadcError(f"run {run_id} finished but its checkpoint {CHECKPOINT} is gone (artifacts deleted "
                                f"or moved?): train a new stage-1 run") from None
            raise LadcError(f"run {run_id} ({run.info.status}) ended before its first checkpoint: nothing to resume "
                            f"or build on; train a new stage-1 run") from None
        blob = Path(path).read_bytes()
    ckpt = load_checkpoint(blob, f"{CHECKPOINT} of run {run_id}")
    ckpt["sha256"] = hashlib.sha256(blob).hexdigest()
    ckpt["run_id"] = run_id
    return ckpt


def model_from_checkpoint(ckpt: dict, num_classes: int | None = None) -> torch.nn.Module:
    n = ckpt["num_classes"]
    if num_classes is not None:
        check(n == num_classes, f"checkpoint is for {n} classes, the data has {num_classes}: use a backbone "
                                f"trained on this dataset")
    model = create_model(ckpt["backbone"], n)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise LadcError(f"checkpoint does not fit backbone {ckpt['backbone']} ({str(e).splitlines()[0]}): "
                        f"train a new stage-1 run") from None
    return model
