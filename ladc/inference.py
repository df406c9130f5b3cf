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


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off: a CUDA device with bf16, or a CPU with AVX-512 BF16 or AMX (elsewhere the
    CPU emulates bf16 and runs several times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """`auto`: bf16 where the device supports it (see bf16_supported), else fp32; `fp32`; `bf16`."""
    check(precision in ("auto", "fp32", "bf16"), f"precision '{precision}' must be auto, fp32 or bf16")
    return bf16_supported(device) if precision == "auto" else precision == "bf16"


@torch.no_grad()
def predict(model, x_uint8: torch.Tensor, mean, std, device, batch_size: int = 1024, features: bool = False,
            precision: str = "auto"):
    """Logits (or penultimate features) for uint8 images, batched, model in eval mode, channels_last."""
    model.eval()
    outs = []
    amp = use_bf16(precision, device)
    for i in range(0, len(x_uint8), batch_size):
        xb = augment.normalize(x_uint8[i:i + batch_size].to(device, non_blocking=True), mean, std)
        xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model.features(xb) if features else model(xb)
        outs.append(out.float())
    return torch.cat(outs)


def evaluate(model, data, device, precision: str = "auto") -> dict:
    """Accuracy reports (top-1, many/medium/few, per class) on the validation and test splits."""
    counts = data.counts.tolist()
    reports = {}
    for split, (x, y) in data.splits().items():
        if len(y) == 0:
            continue
        pred = predict(model, x, data.mean, data.std, device, precision=precision).argmax(1)
        reports[split] = accuracy_report(pred, y, counts)
    return reports
