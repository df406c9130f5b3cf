"""Feature cache: penultimate features of a frozen stage-1 backbone (eval mode, no augmentation) for the
train, validation and test splits, stored once per (checkpoint content, data spec) and reused only
when both match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import model_from_checkpoint
from .data import build_dataset
from .errors import LadcError, check
from .inference import pick_device, predict

CACHE_VERSION = 1
DEFAULT_CACHE = Path("cache/features")
SPLITS = ("train", "val", "test")


@dataclass
class FeatureSet:
    """Features and labels of the three splits, the stage-1 classifier (W, b), and the metadata."""

    x: dict          # split -> [N, d] float32
    y: dict          # split -> [N] int64
    weight: torch.Tensor
    bias: torch.Tensor
    classes: list
    meta: dict
    path: str = ""

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self.y["train"].cpu(), minlength=self.num_classes)

    def to(self, device) -> "FeatureSet":
        self.x = {k: v.to(device) for k, v in self.x.items()}
        self.y = {k: v.to(device) for k, v in self.y.items()}
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def check_finite(self) -> None:
        for split, x in self.x.items():
            bad = (~torch.isfinite(x)).sum().item()
            check(bad == 0, f"{split} features hold {bad} NaN/Inf values: the backbone diverged; "
                            f"retrain stage 1 (e.g. with a lower --lr)")


def cache_key(checkpoint_sha: str, data_cfg: dict) -> str:
    """Key of a feature cache: the checkpoint's content hash and the data spec that defines the splits."""
    spec = {k: v for k, v in sorted(data_cfg.items())}
    if "data_root" in spec and spec["data_root"] is not None:
        spec["data_root"] = str(Path(spec["data_root"]).resolve())
    payload = json.dumps({"v": CACHE_VERSION, "ckpt": checkpoint_sha, "data": spec}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_cached(path: Path, key: str) -> FeatureSet | None:
    """The cached features at path when they exist, load, and carry `key`; else None (recompute)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        if meta.get("key") != key:
            return None
        return FeatureSet({s: blob[f"{s}_x"] for s in SPLITS}, {s: blob[f"{s}_y"] for s in SPLITS},
                          blob["weight"], blob["bias"], meta["classes"], meta, str(path))
    except Exception:
        return None  # stale or broken: recomputed and overwritten


def extract(model, data, device) -> tuple[dict, dict]:
    xs, ys = {}, {}
    for split, (x, y) in {"train": (data.train_x, data.train_y), **data.splits()}.items():
        xs[split] = predict(model, x, data.mean, data.std, device, features=True).float().cpu()
        ys[split] = y.cpu().long()
    return xs, ys


def get_features(ckpt: dict, data_cfg: dict, cache_dir: str | Path = DEFAULT_CACHE, device=None,
                 data=None, progress: bool = True) -> FeatureSet:
    """Load the features for (checkpoint, data spec) from the cache, or extract and store them.
    The dataset is built only when extraction is needed (or `data`, already decoded, is used)."""
    sha = ckpt["sha256"]
    key = cache_key(sha, data_cfg)
    path = Path(cache_dir) / f"{key}.pt"
    fs = load_cached(path, key)
    if fs is not None:
        return fs
    device = device or pick_device()
    data = data if data is not None else build_dataset(data_cfg)
    model = model_from_checkpoint(ckpt, data.num_classes).to(device)
    if progress:
        print(f"extracting features -> {path}")
    xs, ys = extract(model, data, device)
    meta = {"key": key, "checkpoint_sha": sha, "data": data_cfg, "data_spec": data.spec, "classes": data.classes,
            "mean": list(data.mean), "std": list(data.std), "backbone": ckpt["backbone"],
            "image_shape": list(data.image_shape)}
    blob = {f"{s}_{k}": v for s in SPLITS for k, v in (("x", xs[s]), ("y", ys[s]))}
    blob.update(weight=model.classifier.weight.detach().float().cpu(),
                bias=model.classifier.bias.detach().float().cpu(), meta=json.dumps(meta, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{torch.randint(0, 1 << 30, ()).item()}")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: concurrent readers never see half a file
    return FeatureSet(xs, ys, blob["weight"], blob["bias"], data.classes, meta, str(path))


def require_features(fs: FeatureSet) -> FeatureSet:
    if len(fs.y["val"]) == 0:
        raise LadcError("the validation split is empty: stage 2 selects on it; set data.val_per_class > 0")
    return fs


def gaussian_features(counts: list[int], d: int = 64, spread: float = 0.5, mix: float = 0.1, noise: float = 0.0,
                      val_per_class: int = 100, test_per_class: int = 1000, seed: int = 0,
                      fit_steps: int = 100) -> FeatureSet:
    """A synthetic FeatureSet for tests and benchmarks: long-tailed Gaussian classes in a ReLU feature
    space, with a stage-1 linear classifier fitted on the imbalanced train split (so it favours the head,
    as a real backbone's does)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    C = len(counts)
    mus = torch.randn(C, d, generator=g) * spread
    A = torch.randn(C, d, d, generator=g) * mix

    def draw(cs):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(cs)])
        x = mus[y] + torch.einsum("nij,nj->ni", A[y], torch.randn(len(y), d, generator=g))
        return (x + noise * torch.randn(len(y), d, generator=g)).relu(), y

    (xtr, ytr), (xv, yv), (xt, yt) = draw(counts), draw([val_per_class] * C), draw([test_per_class] * C)
    W = torch.zeros(C, d, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=0.1, momentum=0.9)
    for _ in range(fit_steps):
        loss = F.cross_entropy(xtr @ W.T + b, ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return FeatureSet({"train": xtr, "val": xv, "test": xt}, {"train": ytr, "val": yv, "test": yt},
                      W.detach(), b.detach(), [str(c) for c in range(C)], {"key": f"synthetic-{seed}"})
