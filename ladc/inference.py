"""Device choice and batched inference of a backbone on uint8 images (evaluation, feature extraction)."""

from __future__ import annotations

import torch

from . import augment
from .errors import check
from .metrics import accuracy_report


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        dev = torch.device(name)
        check(dev.type != "cuda" or torch.cuda.is_available(),
              f"device {name} was asked for but CUDA is not available here: use --device cpu (or auto)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def evaluate(model, data, device) -> dict:
    """Accuracy reports (top-1, many/medium/few, per class) on the validation and test splits."""
    counts = data.counts.tolist()
    reports = {}
    for split, (x, y) in data.splits().items():
        if len(y) == 0:
            continue
        pred = predict(model, x, data.mean, data.std, device).argmax(1)
        reports[split] = accuracy_report(pred, y, counts)
    return reports
