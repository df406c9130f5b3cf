"""A tracked stage-2 run: features from the cache, a fit, and everything logged to MLflow."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.entities import Metric

from . import tracking
from .checkpoints import download_checkpoint, model_from_checkpoint
from .features import DEFAULT_CACHE, FeatureSet, get_features, require_features
from .inference import pick_device
from .metrics import flat_metrics
from .models import ImageClassifier
from .plots import log_accuracy_report
from .params import Stage2Params
from .stage2 import fit_stage2, validate_for_features


@dataclass
class Backbone:
    """A stage-1 run loaded once per command: its id, checkpoint, data spec and cached features."""

    run_id: str
    ckpt: dict
    data_cfg: dict
    fs: FeatureSet

    @property
    def dataset(self) -> str:
        return self.data_cfg["dataset"]


def load_backbone(run_id: str, data_root: str | None = None, cache_dir=DEFAULT_CACHE, device: str | None = None,
                  ckpt: dict | None = None, data=None, progress: bool = True) -> Backbone:
    """The checkpoint (downloaded once), data config and features (from the cache, or extracted from
    `data` when already decoded) of a stage-1 run, features on the device."""
    tracking.setup_tracking()
    ckpt = ckpt or download_checkpoint(run_id)
    data_cfg = json.loads(ckpt["config"])["data"]
    if data_root:
        data_cfg["data_root"] = data_root
    dev = pick_device(device)
    fs = require_features(get_features(ckpt, data_cfg, cache_dir, dev, data=data, progress=progress))
    fs.check_finite()
    return Backbone(run_id, ckpt, data_cfg, fs.to(dev))


def run_name(p: Stage2Params) -> str:
    """`ladc+lws_plus m2 a0.1 b0.6 t1.2`, `cbs+crt s1`: the method first (the stage is a tag)."""
    name = f"{p.method}+{p.classifier}"
    if p.method in ("ladc", "ladc_avg"):
        name += f" m{p.m} a{p.alpha:.3g} b{p.beta:.3g} t{p.tau:.3g}"
    return name + (f" s{p.seed}" if p.seed else "")


def log_history(run_id: str, history: list[dict]) -> None:
    """Per-epoch curves in one batched call (one round-trip instead of one per epoch)."""
    ts = int(time.time() * 1000)
    metrics = [Metric(f"stage2_{k}", float(rec[k]), ts, rec["epoch"]) for rec in history
               for k in ("loss", "val_top1", "lr")]
    for i in range(0, len(metrics), 1000):
        mlflow.tracking.MlflowClient().log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def classifier_model(ckpt: dict, clf, fs: FeatureSet) -> ImageClassifier:
    return ImageClassifier(model_from_checkpoint(ckpt), clf.cpu(), fs.meta["mean"], fs.meta["std"]).eval()


def log_model(ckpt: dict, clf, fs: FeatureSet, p: Stage2Params, registered_model_name: str | None = None):
    from .serving import log_classifier

    model = classifier_model(ckpt, clf, fs)
    shape = fs.meta.get("image_shape", [3, 32, 32])
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return log_classifier(model, ckpt["backbone"], p.classifier, fs.classes, example,
                          registered_model_name=registered_model_name)


def run_stage2(bb: Backbone, p: Stage2Params, *, parent_run_id: str | None = None, name: str | None = None,
               tags: dict | None = None, plots: bool = True, model: bool = True, on_epoch=None,
               progress: bool = True):
    """Fit one stage-2 configuration on a loaded backbone as an MLflow run (child of `parent_run_id` when
    given). Returns (run_id, reports, history, info, classifier)."""
    p = Stage2Params.from_dict(p)
    fs = bb.fs
    validate_for_features(p, fs.counts)
    all_tags = {"stage": "stage2", "dataset": bb.dataset, "method": p.method, "classifier": p.classifier,
                "backbone_run_id": bb.run_id, "feature_cache_key": fs.meta.get("key", ""),
                **tracking.environment_tags(fs.x["train"].device), **(tags or {})}
    with tracking.tracked_run(name or run_name(p), experiment=tracking.experiment_id(bb.dataset), tags=all_tags,
                              nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
        mlflow.log_params({**{f"stage2.{k}": v for k, v in tracking.flatten(p.as_dict()).items()},
                           "m": p.m, "alpha": p.alpha, "beta": p.beta, "tau": p.tau,
                           "data.dataset": bb.dataset, "data.imbalance_factor": bb.data_cfg.get("imbalance_factor"),
                           "data.seed": bb.data_cfg.get("seed"), "data.train_counts": str(fs.counts.tolist()),
                           "feature_cache": fs.path})
        tracking.log_dataset(bb.fs.meta.get("data_spec", bb.data_cfg), fs.classes, fs.counts.tolist(),
                             fs.meta.get("key", "features"), context="stage-2 features")
        clf, history, reports, info = fit_stage2(fs, p, on_epoch=on_epoch, log=print if progress else (lambda *a: None))
        log_history(run.info.run_id, history)
        final = {**flat_metrics(reports["val"], "val"), **flat_metrics(reports["test"], "test"),
                 "fit_seconds": info["fit_seconds"], "num_head_classes": info["num_head_classes"]}
        mlflow.log_metrics(final)
        mlflow.set_tags({"method_used": info["method_used"], "head_classes": str(info["head_classes"])})
        if plots:
            log_accuracy_report(reports, fs.classes, fs.counts.tolist())
        if model:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"classifier_state": clf.state_dict(), "classifier": p.classifier,
                            "config": json.dumps(p.as_dict())}, Path(d) / "classifier.pt")
                mlflow.log_artifact(str(Path(d) / "classifier.pt"), "checkpoints")
            info["model_uri"] = log_model(bb.ckpt, clf, fs, p).model_uri
        return run.info.run_id, reports, history, info, clf


TABLE_ROWS = [
    ("CE", "ce", "stage1", {}),
    ("CBS + cRT", "cbs", "crt", {}),
    ("CBS + LWS", "cbs", "lws", {}),
    ("CBS + LWS-Plus", "cbs", "lws_plus", {}),
    ("LAS + cRT", "las", "crt", {}),
    ("DC + LWS-Plus", "dc", "lws_plus", {}),
    ("LADC_avg + LWS-Plus", "ladc_avg", "lws_plus", {}),
    ("LADC + LWS", "ladc", "lws", {}),
    ("LADC + LWS-Plus", "ladc", "lws_plus", {}),
    ("LADC + cRT", "ladc", "crt", {}),
    ("LADC + LWS-Plus, eq.6 inverse weighting", "ladc", "lws_plus", {"weighting": "inverse"}),
    ("LADC + LWS-Plus, eq.6 paper weighting", "ladc", "lws_plus", {"weighting": "paper"}),
    ("LADC + LWS-Plus, eq.13 paper (class) reading", "ladc", "lws_plus", {"sampling": "paper"}),
    ("LADC + LWS-Plus, eq.13 instance reading", "ladc", "lws_plus", {"sampling": "instance"}),
]


def run_table(bb: Backbone, p: Stage2Params, seeds: list[int] = (0,), out: str | None = None) -> pd.DataFrame:
    """Every method of the paper's tables on one backbone, each an MLflow child run of one parent run.
    Returns (and writes to `out` as CSV and Markdown) test/val top-1 and many/medium/few, mean over seeds."""
    p = Stage2Params.from_dict(p)
    rows = []
    with tracking.tracked_run(f"table-{bb.dataset}", experiment=tracking.experiment_id(bb.dataset),
                              tags={"stage": "table", "dataset": bb.dataset, "backbone_run_id": bb.run_id}) as parent:
        for label, method, clf, extra in TABLE_ROWS:
            for seed in seeds:
                q = p.replace(method=method, classifier=clf, seed=seed, **extra)
                _, reports, _, info, _ = run_stage2(bb, q, parent_run_id=parent.info.run_id, name=f"{label} s{seed}",
                                                    plots=False, model=False, progress=False)
                rows.append({"row": label, "method": method, "classifier": clf, "seed": seed,
                             **{f"{s}_{k}": reports[s][k] for s in ("val", "test")
                                for k in ("top1", "many", "medium", "few")}})
                print(f"{label:48s} seed {seed}  val {reports['val']['top1']:.2f}  test {reports['test']['top1']:.2f}")
        df = pd.DataFrame(rows)
        agg = df.drop(columns=["seed"]).groupby(["row", "method", "classifier"], sort=False).mean().reset_index()
        if len(seeds) > 1:
            std = df.groupby("row", sort=False)["test_top1"].std().reset_index(drop=True)
            agg["test_top1_std"] = std.values
        with tempfile.TemporaryDirectory() as d:
            agg.to_csv(Path(d) / "table.csv", index=False)
            mlflow.log_artifact(str(Path(d) / "table.csv"), "results")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            agg.to_csv(out, index=False)
            Path(out).with_suffix(".md").write_text(markdown_table(agg))
    return agg


def markdown_table(df: pd.DataFrame, digits: int = 2) -> str:
    df = df.dropna(axis=1, how="all")  # e.g. `few` on CIFAR-10-LT IF=100, which has no class under 20 images
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"
