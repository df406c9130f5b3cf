"""Stage 1: train a backbone on the long-tailed set with Representation Enhancement
(Remix + RandAugment on top of crop/flip), tracked in MLflow, resumable from its checkpoints."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import augment, tracking
from .data import LTData, build_dataset
from .errors import LadcError, check
from .metrics import accuracy_report, flat_metrics
from .models import BACKBONES, create_model

CHECKPOINT = "checkpoints/last.pt"


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def validate_stage1(s: dict) -> None:
    check(s["backbone"] in BACKBONES, f"unknown backbone '{s['backbone']}': choose one of {', '.join(BACKBONES)}")
    check(isinstance(s["epochs"], int) and s["epochs"] > 0, f"epochs {s['epochs']} must be a positive integer")
    check(s["lr"] > 0, f"lr {s['lr']} must be > 0")
    check(s["batch_size"] > 0, f"batch_size {s['batch_size']} must be > 0")
    check(s["warmup_epochs"] >= 0, f"warmup_epochs {s['warmup_epochs']} must be >= 0")
    check(0 < s["lr_gamma"] <= 1, f"lr_gamma {s['lr_gamma']} must be in (0, 1]")
    check(s["remix_alpha"] > 0, f"remix_alpha {s['remix_alpha']} must be > 0")


def lr_at(step: int, steps_per_epoch: int, s: dict) -> float:
    """Linear warm-up over warmup_epochs (per iteration), then step decay x lr_gamma at each milestone."""
    epoch = step / steps_per_epoch
    if epoch < s["warmup_epochs"]:
        return s["lr"] * (step + 1) / (s["warmup_epochs"] * steps_per_epoch)
    return s["lr"] * s["lr_gamma"] ** sum(epoch >= m for m in s["milestones"])


@torch.no_grad()
def predict(model, x_uint8: torch.Tensor, mean, std, device, batch_size: int = 1024, features: bool = False):
    """Logits (or penultimate features) for uint8 images, batched, model in eval mode."""
    model.eval()
    outs = []
    amp = device.type == "cuda"
    for i in range(0, len(x_uint8), batch_size):
        xb = augment.normalize(x_uint8[i:i + batch_size].to(device, non_blocking=True), mean, std)
        if amp:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model.features(xb) if features else model(xb)
        outs.append(out.float())
    return torch.cat(outs)


def evaluate(model, data: LTData, device) -> dict:
    counts = data.counts.tolist()
    reports = {}
    for split, (x, y) in data.splits().items():
        if len(y) == 0:
            continue
        pred = predict(model, x, data.mean, data.std, device).argmax(1)
        reports[split] = accuracy_report(pred, y, counts)
    return reports


def train_step(model, optimizer, xb, yb, counts, s: dict, randaug, mean, std, amp: bool):
    """One stage-1 step on a uint8 batch: crop/flip, RandAugment, normalise, Remix, forward, backward, SGD.
    Returns (loss, number of predictions matching the dominant label)."""
    xb = augment.random_crop_flip(xb, padding=s["crop_padding"])
    if randaug is not None:
        xb = randaug(xb)
    xb = augment.normalize(xb, mean, std)
    if amp:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
        if s["remix"]:
            xb, yi, yj, lam_y = augment.remix_batch(xb, yb, counts, s["remix_alpha"], s["remix_kappa"], s["remix_tau"])
            logits = model(xb)
            loss = augment.remix_loss(logits.float(), yi, yj, lam_y)
            target = torch.where(lam_y >= 0.5, yi, yj)
        else:
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            target = yb
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == target).sum()


def save_checkpoint(path: Path, model, optimizer, epoch: int, cfg: dict, data: LTData) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "config": json.dumps(cfg), "data_spec": json.dumps(data.spec), "num_classes": data.num_classes,
        "backbone": cfg["stage1"]["backbone"], "mean": list(data.mean), "std": list(data.std),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LadcError(f"checkpoint {path} cannot be read ({type(e).__name__}): "
                        f"it is not a ladc checkpoint; use the run's {CHECKPOINT}") from None


def download_checkpoint(run_id: str) -> dict:
    """The last checkpoint of a stage-1 run, loaded with weights_only=True."""
    try:
        run = mlflow.get_run(run_id)
    except Exception:
        raise LadcError(f"run {run_id} does not exist in {mlflow.get_tracking_uri()}: "
                        f"pass the id of a stage-1 run (see the MLflow UI or `python train.py runs`)") from None
    check(run.data.tags.get("stage") == "stage1", f"run {run_id} is a {run.data.tags.get('stage', 'non-ladc')} "
                                                   f"run, not a stage-1 run: pass a stage-1 run id")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT)
    except Exception:
        raise LadcError(f"run {run_id} has no checkpoint ({CHECKPOINT}): it was killed before its first "
                        f"checkpoint; train a new one or resume it with --resume {run_id}") from None
    ckpt = load_checkpoint(path)
    ckpt["path"] = path
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


def run_name(cfg: dict) -> str:
    d = cfg["data"]
    imf = d.get("imbalance_factor")
    return f"stage1-{cfg['stage1']['backbone']}-{d['dataset']}-if{imf:g}-s{d.get('seed', 0)}" if imf else \
        f"stage1-{cfg['stage1']['backbone']}-{d['dataset']}-s{d.get('seed', 0)}"


def train_stage1(cfg: dict, resume_run_id: str | None = None, data: LTData | None = None,
                 progress: bool = True) -> str:
    """Train (or resume) a stage-1 run. Returns the MLflow run id."""
    tracking.setup_tracking()
    start_epoch, ckpt = 0, None
    if resume_run_id:
        ckpt = download_checkpoint(resume_run_id)
        cfg = json.loads(ckpt["config"])
        start_epoch = int(ckpt["epoch"])
    s = cfg["stage1"]
    validate_stage1(s)
    device = pick_device(s.get("device"))
    torch.manual_seed(int(s.get("seed", 0)))
    data = data if data is not None else build_dataset(cfg["data"])
    if ckpt is not None:
        check(ckpt["num_classes"] == data.num_classes, f"checkpoint is for {ckpt['num_classes']} classes, "
                                                      f"the data has {data.num_classes}")
        if start_epoch >= s["epochs"]:
            raise LadcError(f"run {resume_run_id} already finished all {s['epochs']} epochs: nothing to resume")
    model = model_from_checkpoint(ckpt) if ckpt else create_model(s["backbone"], data.num_classes)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        data.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"],
                                weight_decay=s["weight_decay"], nesterov=False)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])

    counts = data.counts.to(device)
    randaug = augment.GroupedRandAugment(s["randaug_num_ops"], s["randaug_magnitude"],
                                         group=s["randaug_group"]) if s["randaugment"] else None
    n = len(data.train_y)
    bs = s["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    amp = device.type == "cuda"
    exp = tracking.experiment_id(cfg["data"]["dataset"])
    tags = {"stage": "stage1", "dataset": cfg["data"]["dataset"], "backbone": s["backbone"],
            "imbalance_factor": str(cfg["data"].get("imbalance_factor")), "data_spec_key": data.spec_key(),
            **tracking.environment_tags(device)}
    with tracking.tracked_run(run_name(cfg), experiment=exp, run_id=resume_run_id, tags=tags) as run:
        if ckpt is None:
            mlflow.log_params(tracking.flatten({k: cfg[k] for k in ("data", "stage1")}))
            mlflow.log_params({"data.num_classes": data.num_classes, "data.train_counts": str(data.counts.tolist()),
                               "data.n_train": n, "data.n_val": len(data.val_y), "data.n_test": len(data.test_y)})
            mlflow.log_dict(data.spec, "data_spec.json")
            mlflow.log_dict(cfg, "config.json")
            for note in data.notes:
                print(f"note: {note}")
        else:
            print(f"resuming run {resume_run_id} after epoch {start_epoch}")
        tmpdir = Path(tempfile.mkdtemp(prefix="ladc-ckpt-"))
        bar = tqdm(range(start_epoch, s["epochs"]), desc=run_name(cfg), disable=not progress, unit="epoch",
                   initial=start_epoch, total=s["epochs"])
        reports = {}
        for epoch in bar:
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, device=device)
            tot_loss, tot_correct = 0.0, 0.0
            for it in range(steps_per_epoch):
                step = epoch * steps_per_epoch + it
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, steps_per_epoch, s)
                idx = perm[it * bs:(it + 1) * bs]
                loss, correct = train_step(model, optimizer, data.train_x[idx], data.train_y[idx], counts, s,
                                           randaug, data.mean, data.std, amp)
                tot_loss += loss.detach() * len(idx)
                tot_correct += correct
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            done = epoch + 1
            loss_v = float(tot_loss) / n
            if not math.isfinite(loss_v):
                raise LadcError(f"training loss became {loss_v} at epoch {done}: lower --lr or check the data")
            metrics = {"train_loss": loss_v, "train_acc": float(tot_correct) / n * 100, "lr": optimizer.param_groups[0]["lr"],
                       "throughput_img_s": n / dt, "epoch_time_s": dt}
            if done % s["eval_every"] == 0 or done == s["epochs"]:
                reports = evaluate(model, data, device)
                for split, rep in reports.items():
                    metrics.update(flat_metrics(rep, split))
            mlflow.log_metrics(metrics, step=done)
            bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{metrics['train_acc']:.1f}",
                            val=f"{metrics.get('val_top1', float('nan')):.1f}", ips=f"{n / dt:.0f}")
            if done % s["checkpoint_every"] == 0 or done == s["epochs"]:
                save_checkpoint(tmpdir / "last.pt", model, optimizer, done, cfg, data)
                mlflow.log_artifact(str(tmpdir / "last.pt"), "checkpoints")
        log_per_class(reports, data)
        mlflow.set_tag("epochs_done", str(s["epochs"]))
        return run.info.run_id


def log_per_class(reports: dict, data: LTData) -> None:
    """Per-class accuracy table (CSV) for each evaluated split."""
    import pandas as pd

    if not reports:
        return
    table = pd.DataFrame({"class": data.classes, "train_count": data.counts.tolist()})
    for split, rep in reports.items():
        table[f"{split}_acc"] = rep["per_class"].tolist()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "per_class_accuracy.csv"
        table.to_csv(p, index=False)
        mlflow.log_artifact(str(p), "results")
