"""Stage 1: train a backbone on the long-tailed set with Representation Enhancement
(Remix + RandAugment on top of crop/flip), tracked in MLflow, resumable from its checkpoints."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import augment, tracking
from .checkpoints import download_checkpoint, model_from_checkpoint, save_checkpoint
from .data import LTData, build_dataset
from .errors import REPORTED, LadcError, check
from .inference import evaluate, pick_device, use_bf16
from .metrics import flat_metrics
from .models import create_model
from .params import data_section, stage1_section


def lr_at(step: int, steps_per_epoch: int, s: dict) -> float:
    """Linear warm-up over warmup_epochs (per iteration), then step decay x lr_gamma at each milestone."""
    epoch = step / steps_per_epoch
    if epoch < s["warmup_epochs"]:
        return s["lr"] * (step + 1) / (s["warmup_epochs"] * steps_per_epoch)
    return s["lr"] * s["lr_gamma"] ** sum(epoch >= m for m in s["milestones"])


def train_step(model, optimizer, xb, yb, counts, s: dict, randaug, mean, std, bf16: bool):
    """One stage-1 step on a uint8 batch: crop/flip, RandAugment, normalise, Remix, forward, backward, SGD,
    channels_last, under bf16 autocast when `bf16`. Returns (loss, predictions matching the dominant label)."""
    xb = augment.random_crop_flip(xb, padding=s["crop_padding"])
    if randaug is not None:
        xb = randaug(xb)
    xb = augment.normalize(xb, mean, std).contiguous(memory_format=torch.channels_last)
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=bf16):
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


def run_name(cfg: dict) -> str:
    """What tells stage-1 runs of one experiment (= one dataset) apart comes first, so a truncated name in
    the UI still does: `stage1 e400 remix+ra s0 resnet32 if100` (training seed s, data seed d when it
    differs)."""
    d, s = cfg["data"], cfg["stage1"]
    aug = "+".join(k for k, on in (("remix", s.get("remix")), ("ra", s.get("randaugment"))) if on) or "plain"
    seed, dseed = s.get("seed", 0), d.get("seed", 0)
    imf = d.get("imbalance_factor")
    return (f"stage1 e{s['epochs']} {aug} s{seed}" + (f" d{dseed}" if dseed != seed else "")
            + f" {s['backbone']}" + (f" if{imf:g}" if imf else ""))


def resume_command(run_id: str) -> str:
    return f"python train.py stage1 --resume {run_id}"


def fmt_duration(seconds: float) -> str:
    h, m = divmod(int(seconds) // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min" if m else f"{int(seconds)} s"


def announce_duration(timing: dict, s: dict, epoch: int, it: int, steps_per_epoch: int, bs: int, device,
                      run_id: str, probe: int = 6) -> None:
    """After the first `probe` steps of this process, say how long the rest of the run will take on this
    device (measured, the first step excluded) and, for a long run, how to make it shorter."""
    timing["steps"] += 1
    if timing["steps"] == 2:
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing["t"] = time.perf_counter()
    if timing["steps"] != probe:
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - timing["t"]) / (probe - 2)
    left = (s["epochs"] * steps_per_epoch - (epoch * steps_per_epoch + it + 1)) * per_step
    mlflow.set_tag("estimated_duration", fmt_duration(left))
    msg = f"estimated time for the remaining {s['epochs'] - epoch} epochs on {device}: {fmt_duration(left)} " \
          f"({bs / per_step:.0f} img/s)"
    if left > 20 * 60:
        per_epoch = steps_per_epoch * per_step
        short = max(1, int(15 * 60 / per_epoch))
        msg += (f"; for a shorter run pass --epochs {short} (about 15 min here; tune.py: --backbone-epochs "
                f"{short}); Ctrl-C keeps a checkpoint, `python train.py stage1 --resume {run_id}` continues")
    tqdm.write(msg, file=sys.stderr)


def warn_if_near_chance(reports: dict, num_classes: int, epochs: int) -> None:
    """Say at the end of the run, not later, when the backbone learned next to nothing."""
    val = reports.get("val", {}).get("top1")
    chance = 100.0 / num_classes
    if val is not None and val < 1.5 * chance:
        msg = (f"validation top-1 {val:.1f}% is near chance ({chance:.1f}%) after {epochs} epochs: this backbone "
               f"learned little; train longer (--epochs) before building on it")
        mlflow.set_tag("warning", msg)
        print(f"warning: {msg}", file=sys.stderr)


def logged_steps(run_id: str, keys) -> dict[str, set]:
    """{metric: steps already logged} of a run (a resumed run never logs a step twice)."""
    client = mlflow.MlflowClient()
    return {k: {m.step for m in client.get_metric_history(run_id, k)} for k in keys}


def train_stage1(cfg: dict, resume_run_id: str | None = None, data: LTData | None = None,
                 progress: bool = True) -> str:
    """Train (or resume) a stage-1 run. Returns the MLflow run id. Checkpoints are written every
    `checkpoint_every` epochs, whenever `checkpoint_minutes` have passed since the last one, at the end,
    and on Ctrl-C / SIGTERM, so an interrupted run loses at most a few minutes."""
    tracking.setup_tracking()
    start_epoch, ckpt = 0, None
    if resume_run_id:
        ckpt = download_checkpoint(resume_run_id)
        cfg = json.loads(ckpt["config"])
        start_epoch = int(ckpt["epoch"])
    cfg = {**cfg, "data": data_section(dict(cfg["data"])), "stage1": stage1_section(cfg["stage1"])}
    s = cfg["stage1"]
    if ckpt is not None and start_epoch >= s["epochs"]:
        raise LadcError(f"run {resume_run_id} already finished all {s['epochs']} epochs: nothing to resume")
    device = pick_device(s.get("device"))
    torch.manual_seed(int(s.get("seed", 0)))
    data = data if data is not None else build_dataset(cfg["data"])
    if ckpt is not None:
        check(ckpt["num_classes"] == data.num_classes, f"checkpoint is for {ckpt['num_classes']} classes, "
                                                      f"the data has {data.num_classes}")
    model = model_from_checkpoint(ckpt) if ckpt else create_model(s["backbone"], data.num_classes)
    model = model.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
    if device.type == "cuda":
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
    if ckpt is None and s.get("min_steps", 0) > s["epochs"] * steps_per_epoch:
        from .config import scale_schedule
        epochs = math.ceil(s["min_steps"] / steps_per_epoch)
        data.notes.append(f"{n} training images give {steps_per_epoch} steps per epoch: {s['epochs']} epochs are fewer "
                          f"than stage1.min_steps {s['min_steps']}, so the run trains {epochs} epochs (milestones "
                          f"scaled with it)")
        scale_schedule(s, epochs)
    bf16 = use_bf16(s["precision"], device)
    exp = tracking.experiment_id(cfg["data"]["dataset"])
    tags = {"stage": "stage1", "dataset": cfg["data"]["dataset"], "backbone": s["backbone"],
            "imbalance_factor": str(cfg["data"].get("imbalance_factor")), "data_spec_key": data.spec_key(),
            "precision": "bf16" if bf16 else "fp32", **tracking.environment_tags(device)}
    with tracking.tracked_run(run_name(cfg), experiment=exp, run_id=resume_run_id, tags=tags) as run:
        run_id = run.info.run_id
        if ckpt is None:
            mlflow.log_params(tracking.flatten({k: cfg[k] for k in ("data", "stage1")}))
            mlflow.log_params({"data.num_classes": data.num_classes, "data.train_counts": str(data.counts.tolist()),
                               "data.n_train": n, "data.n_val": len(data.val_y), "data.n_test": len(data.test_y)})
            mlflow.log_dict(data.spec, "data_spec.json")
            tracking.log_dataset(data.spec, data.classes, data.counts.tolist(), data.spec_key())
            mlflow.log_dict(cfg, "config.json")
            for note in data.notes:
                print(f"note: {note}")
            seen = {}
        else:
            print(f"resuming run {run_id} after epoch {start_epoch}")
            seen = logged_steps(run_id, ("train_loss", "val_top1"))
        saved = {"epoch": start_epoch, "time": time.monotonic()}

        def checkpoint(epoch: int) -> None:  # the temp folder exists only while the file is written and logged
            with tempfile.TemporaryDirectory(prefix="ladc-ckpt-") as tmpdir:
                save_checkpoint(Path(tmpdir) / "last.pt", model, optimizer, epoch, cfg, data)
                mlflow.log_artifact(str(Path(tmpdir) / "last.pt"), "checkpoints")
            saved.update(epoch=epoch, time=time.monotonic())

        bar = tqdm(desc=run_name(cfg), disable=not progress, unit="step", initial=start_epoch * steps_per_epoch,
                   total=s["epochs"] * steps_per_epoch, dynamic_ncols=True)
        reports = {}
        done = start_epoch
        timing = {"t": None, "steps": 0}
        try:
            for epoch in range(start_epoch, s["epochs"]):
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
                                               randaug, data.mean, data.std, bf16)
                    tot_loss += loss.detach() * len(idx)
                    tot_correct += correct
                    bar.update(1)
                    announce_duration(timing, s, epoch, it, steps_per_epoch, bs, device, run_id)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                loss_v = float(tot_loss) / n
                if not math.isfinite(loss_v):
                    raise LadcError(f"training loss became {loss_v} at epoch {epoch + 1}: lower --lr or check the data")
                metrics = {"train_loss": loss_v, "train_acc": float(tot_correct) / n * 100,
                           "lr": optimizer.param_groups[0]["lr"], "throughput_img_s": n / dt, "epoch_time_s": dt}
                if (epoch + 1) % s["eval_every"] == 0 or epoch + 1 == s["epochs"]:
                    reports = evaluate(model, data, device, s["precision"])
                    for split, rep in reports.items():
                        metrics.update(flat_metrics(rep, split))
                # a resumed run re-trains the epochs after its checkpoint: steps logged before the kill stay
                metrics = {k: v for k, v in metrics.items() if epoch + 1 not in
                           seen.get("val_top1" if k.startswith(("val_", "test_")) else "train_loss", ())}
                if metrics:
                    mlflow.log_metrics(metrics, step=epoch + 1)
                done = epoch + 1  # trained, evaluated and logged: a checkpoint at `done` loses nothing
                post = {"epoch": f"{epoch + 1}/{s['epochs']}", "loss": f"{loss_v:.3f}",
                        "acc": f"{float(tot_correct) / n * 100:.1f}", "ips": f"{n / dt:.0f}"}
                if "val_top1" in metrics:
                    post["val"] = f"{metrics['val_top1']:.1f}"
                bar.set_postfix(post)
                if (done % s["checkpoint_every"] == 0 or done == s["epochs"]
                        or time.monotonic() - saved["time"] >= 60 * s["checkpoint_minutes"]):
                    checkpoint(done)
        except KeyboardInterrupt:
            if done > saved["epoch"]:
                checkpoint(done)
            print(f"\ninterrupted after epoch {done} of {s['epochs']}: run {run_id} is KILLED with a checkpoint at "
                  f"epoch {saved['epoch']}; continue it with: {resume_command(run_id)}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(REPORTED) from None
        log_results(run_id, reports, data)
        mlflow.set_tag("epochs_done", str(s["epochs"]))
        warn_if_near_chance(reports, data.num_classes, s["epochs"])
        return run_id


def log_results(run_id: str, reports: dict, data: LTData) -> None:
    """Per-class accuracy table, confusion matrix, per-class figure and learning curves of a stage-1 run."""
    from .plots import learning_curves_figure, log_accuracy_report, log_figure

    log_accuracy_report(reports, data.classes, data.counts.tolist())
    client = mlflow.MlflowClient()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
               for k in ("train_loss", "train_acc", "val_top1", "test_top1")}
    log_figure(learning_curves_figure(history), "plots/learning_curves.png")
