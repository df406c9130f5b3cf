"""Long-tailed datasets held as decoded uint8 tensors.

Every dataset returns an `LTData`: uint8 images [N, 3, H, W] and int64 labels for the long-tailed
train set, a validation split that is not the test set, and the (balanced) test set.
Images are decoded once; augmentation happens batched on tensors (`ladc.augment`).
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LadcError, check

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DATASETS = ("cifar10_lt", "cifar100_lt", "imagefolder_lt", "synthetic_lt")
DEFAULT_ROOT = "./data"


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile of LDAM-DRW: n_c = int(n_max * (1/IF) ** (c / (C - 1)))."""
    check(imbalance_factor >= 1, f"imbalance factor {imbalance_factor} is below 1: use a value >= 1 (1 = balanced)")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1.0))) for c in range(num_classes)]


@dataclass
class LTData:
    """Decoded long-tailed dataset. `spec` records what defines it (logged with every run)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    spec: dict
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self.train_y.cpu(), minlength=self.num_classes)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "LTData":
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def splits(self):
        return {"val": (self.val_x, self.val_y), "test": (self.test_x, self.test_y)}

    def spec_key(self) -> str:
        """Stable hash of the data spec: keys feature caches."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- subset selection

def select_longtail(labels: np.ndarray, counts: list[int], seed: int, val_per_class: int):
    """Per-class seeded subset as LDAM-DRW (one RandomState(seed), shuffle each class in label order,
    keep the first n_c). Validation = the next `val_per_class` images the subset left out. A class
    with too few left-outs (the largest class keeps all its images) moves its last images from the
    subset to validation, so validation stays class-balanced and disjoint from training.
    Returns (train_idx, val_idx, notes)."""
    rng = np.random.RandomState(seed)
    train_idx, val_idx, notes = [], [], []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        check(len(idx) >= n_c, f"class {c} has {len(idx)} images, fewer than the {n_c} the profile asks for: "
                               f"lower the imbalance factor's n_max or use the data as it is")
        v = val_per_class
        if n_c + v <= len(idx):
            train_idx.append(idx[:n_c])
            val_idx.append(idx[n_c:n_c + v])
        else:
            n_keep = max(len(idx) - v, 1)
            v = len(idx) - n_keep
            train_idx.append(idx[:n_keep])
            val_idx.append(idx[n_keep:])
            notes.append(f"class {c} ({n_c} images in the long-tailed profile) uses every image it has, so its "
                         f"{n_c - n_keep} validation images come out of its training share: it trains on "
                         f"{n_keep} (data.val_per_class: 0 keeps the exact reference subset, without validation)")
    return np.concatenate(train_idx), np.concatenate(val_idx), notes


def holdout_split(labels: np.ndarray, num_classes: int, seed: int, val_fraction: float):
    """Seeded per-class hold-out (data used as it is): max(1, round(f * n_c)) per class with n_c >= 2."""
    rng = np.random.RandomState(seed)
    train_idx, val_idx = [], []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        v = max(1, int(round(val_fraction * len(idx)))) if len(idx) >= 2 else 0
        val_idx.append(idx[:v])
        train_idx.append(idx[v:])
    return np.concatenate(train_idx), np.concatenate(val_idx)


# ----------------------------------------------------------------------------- raw sources

def _decode_files(paths: list[Path], image_size: int | None) -> torch.Tensor:
    """Decode image files once into a uint8 [N, 3, S, S] tensor (resize+center-crop when sized)."""
    from PIL import Image
    from tqdm import tqdm

    out = None
    for i, p in enumerate(tqdm(paths, desc="decode", leave=False, disable=None if len(paths) >= 2000 else True)):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    w, h = im.size
                    s = image_size / min(w, h)
                    im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BILINEAR)
                    w, h = im.size
                    l, t = (w - image_size) // 2, (h - image_size) // 2
                    im = im.crop((l, t, l + image_size, t + image_size))
                arr = np.array(im)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, garbage or unsupported files
            raise LadcError(f"image {p} cannot be decoded ({type(e).__name__}: {str(e)[:80]}): "
                            f"replace or delete the file") from None
        if out is None:
            out = torch.empty((len(paths), 3, arr.shape[0], arr.shape[1]), dtype=torch.uint8)
        check(arr.shape[:2] == tuple(out.shape[2:]),
              f"{p} is {arr.shape[1]}x{arr.shape[0]}, others are {out.shape[3]}x{out.shape[2]}: "
              f"set data.image_size to resize every image to one size")
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return out


class ImageFolderSource:
    """A `train/` + `test/` ImageFolder tree, listed lazily: only the files selected are decoded."""

    EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

    def __init__(self, root: Path):
        self.root = Path(root)
        self.classes = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        check(len(self.classes) > 0, f"{self.root / 'train'} has no class folders: "
                                     f"lay out images as train/<class>/<image> and test/<class>/<image>")
        test_classes = sorted(d.name for d in (self.root / "test").iterdir() if d.is_dir())
        check(test_classes == self.classes, f"{self.root}: test/ classes differ from train/ classes: "
                                           f"give both the same class folders")

    def listing(self, split: str):
        files, labels = [], []
        for c, name in enumerate(self.classes):
            fs = sorted(p for p in (self.root / split / name).iterdir() if p.suffix.lower() in self.EXT)
            files += fs
            labels += [c] * len(fs)
        return files, np.asarray(labels, dtype=np.int64)


def _find_cifar(root: Path, num_classes: int):
    """Return ('torchvision', path) or ('imagefolder', path) for a CIFAR data root, or None."""
    batches = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / batches).is_dir():
        return "torchvision", root
    candidates = [root, root / f"cifar{num_classes}-jpeg", root / f"cifar{num_classes}"]
    for c in candidates:
        if (c / "train").is_dir() and (c / "test").is_dir():
            return "imagefolder", c
    return None


def _cifar_torchvision(root: Path, num_classes: int, train: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    ds = cls(str(root), train=train, download=False)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return x, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def _download_cifar(root: Path, num_classes: int) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as e:  # offline, proxy, disk: one clear message
        raise LadcError(
            f"CIFAR-{num_classes} is not in {root} and could not be downloaded ({type(e).__name__}): "
            f"put torchvision's cifar-{num_classes} files there, or an ImageFolder tree with train/ and test/ "
            f"(e.g. `tar -xJf ../shared/data/cifar10-jpeg.tar.xz -C data`), and pass --data-root") from None
    finally:
        socket.setdefaulttimeout(old)


def load_cifar(num_classes: int, data_root: str | Path, imbalance_factor: float, seed: int,
               val_per_class: int) -> LTData:
    root = Path(data_root)
    name = f"cifar{num_classes}_lt"
    found = _find_cifar(root, num_classes) if root.is_dir() else None
    if found is None:
        if not root.exists() and str(data_root) != DEFAULT_ROOT:
            raise LadcError(f"data root {root} does not exist: pass the folder that holds CIFAR-{num_classes} "
                            f"(torchvision files or an ImageFolder train/ + test/ tree) to --data-root")
        if root.is_dir() and any(root.iterdir()) and str(data_root) != DEFAULT_ROOT:
            raise LadcError(f"data root {root} holds neither torchvision's CIFAR-{num_classes} files nor an "
                            f"ImageFolder tree with train/ and test/: point --data-root at one of those")
        _download_cifar(root, num_classes)
        found = _find_cifar(root, num_classes)
    kind, path = found
    n_max = 5000 if num_classes == 10 else 500
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    if kind == "torchvision":
        x, y, classes = _cifar_torchvision(path, num_classes, True)
        tx, ty, _ = _cifar_torchvision(path, num_classes, False)
        tr, va, notes = select_longtail(y, counts, seed, val_per_class)
        train_x, train_y, val_x, val_y = x[tr], y[tr], x[va], y[va]
    else:
        src = ImageFolderSource(path)
        if num_classes == 10:
            check(src.classes == CIFAR10_CLASSES,
                  f"{path} holds classes {src.classes[:4]}..., not CIFAR-10's {CIFAR10_CLASSES[:4]}...: "
                  f"point --data-root at a CIFAR-10 ImageFolder tree")
        check(len(src.classes) == num_classes, f"{path} holds {len(src.classes)} classes, CIFAR-{num_classes} "
                                                f"has {num_classes}: point --data-root at a CIFAR-{num_classes} tree")
        files, y = src.listing("train")
        tfiles, ty = src.listing("test")
        tr, va, notes = select_longtail(y, counts, seed, val_per_class)
        train_x, val_x = _decode_files([files[i] for i in tr], 32), _decode_files([files[i] for i in va], 32)
        train_y, val_y = y[tr], y[va]
        tx = _decode_files(tfiles, 32)
        classes = src.classes
    spec = dict(dataset=name, imbalance_factor=float(imbalance_factor), seed=int(seed),
                val_per_class=int(val_per_class), source=kind,
                train_counts=np.bincount(train_y, minlength=num_classes).tolist(), profile_counts=counts)
    return LTData(train_x, torch.as_tensor(train_y), val_x, torch.as_tensor(val_y), tx, torch.as_tensor(ty),
                  list(classes), spec, notes=notes)


def load_imagefolder(data_root: str | Path, imbalance_factor: float | None, seed: int, val_per_class: int,
                     val_fraction: float, image_size: int) -> LTData:
    root = Path(data_root)
    check(root.is_dir(), f"data root {root} does not exist: pass an ImageFolder tree with train/ and test/ "
                         f"to --data-root")
    check((root / "train").is_dir() and (root / "test").is_dir(),
          f"{root} has no train/ and test/ folders: lay it out as train/<class>/<image>, test/<class>/<image>")
    src = ImageFolderSource(root)
    files, y = src.listing("train")
    tfiles, ty = src.listing("test")
    C = len(src.classes)
    notes = []
    if imbalance_factor is None:
        tr, va = holdout_split(y, C, seed, val_fraction)
        counts = None
        have = np.bincount(y[tr], minlength=C)
        empty = [src.classes[c] for c in range(C) if have[c] == 0]
        check(not empty, f"{root / 'train'}: class(es) {', '.join(empty)} have no training images (after the "
                         f"validation split): add images or remove the folder(s)")
    else:
        avail = np.bincount(y, minlength=C)
        counts = longtail_counts(int(avail.max()), C, imbalance_factor)
        order = np.argsort(-avail, kind="stable")
        check(min(counts) >= 1, f"{root}: imbalance factor {imbalance_factor} leaves the smallest class "
                                f"{min(counts)} images (the largest has {int(avail.max())}): lower --imbalance-factor")
        check((avail[order] >= np.asarray(counts)).all(),
              f"{root}: some class has fewer images than the long-tailed profile needs: "
              f"set data.imbalance_factor to null to use the data as it is")
        # classes keep their labels; the profile is assigned by class size (largest class gets n_max)
        prof = np.zeros(C, dtype=np.int64)
        prof[order] = counts
        tr, va, notes = select_longtail(y, prof.tolist(), seed, val_per_class)
        counts = prof.tolist()
    spec = dict(dataset="imagefolder_lt", root=str(root.resolve()), imbalance_factor=imbalance_factor,
                seed=int(seed), val_per_class=int(val_per_class), val_fraction=float(val_fraction),
                image_size=int(image_size), train_counts=np.bincount(y[tr], minlength=C).tolist(),
                profile_counts=counts)
    return LTData(_decode_files([files[i] for i in tr], image_size), torch.as_tensor(y[tr]),
                  _decode_files([files[i] for i in va], image_size), torch.as_tensor(y[va]),
                  _decode_files(tfiles, image_size), torch.as_tensor(ty), src.classes, spec,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), notes=notes)


def make_synthetic(num_classes: int = 5, n_max: int = 200, imbalance_factor: float = 10, image_size: int = 16,
                   val_per_class: int = 20, test_per_class: int = 50, seed: int = 0, noise: float = 40.0) -> LTData:
    """A small long-tailed image set that trains in seconds: each class is a smooth colour pattern
    (fixed by class id), each image that pattern plus pixel noise and a random brightness shift."""
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    g_cls = torch.Generator().manual_seed(1234)  # patterns never depend on the split seed
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g_cls) * 200 + 28
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)
    g = torch.Generator().manual_seed(seed)

    def draw(per_class):
        ys = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(per_class)])
        x = templates[ys] + noise * torch.randn(len(ys), 3, image_size, image_size, generator=g)
        x = x + 30 * torch.randn(len(ys), 1, 1, 1, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8), ys

    train_x, train_y = draw(counts)
    val_x, val_y = draw([val_per_class] * num_classes)
    test_x, test_y = draw([test_per_class] * num_classes)
    spec = dict(dataset="synthetic_lt", imbalance_factor=float(imbalance_factor), seed=int(seed),
                n_max=n_max, image_size=image_size, val_per_class=val_per_class,
                train_counts=counts, profile_counts=counts)
    return LTData(train_x, train_y, val_x, val_y, test_x, test_y, [f"class{c}" for c in range(num_classes)],
                  spec, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def build_dataset(cfg: dict) -> LTData:
    """Dataset factory from the `data` config section; every class must keep a training image."""
    data = _build(cfg)
    empty = [data.classes[c] for c, n in enumerate(data.counts.tolist()) if n == 0]
    check(not empty, f"class(es) {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''} get no training "
                     f"image with imbalance factor {cfg.get('imbalance_factor')} and val_per_class "
                     f"{cfg.get('val_per_class', 100)}: lower --imbalance-factor, lower data.val_per_class or add images")
    return data


def _build(cfg: dict) -> LTData:
    from .params import data_section

    data_section(cfg)  # the name, the imbalance factor, the counts
    name = cfg.get("dataset")
    imf = cfg.get("imbalance_factor", 100)
    seed = int(cfg.get("seed", 0))
    vpc = int(cfg.get("val_per_class", 100))
    check(vpc >= 0, f"val_per_class {vpc} is negative: use 0 or more")
    root = cfg.get("data_root", DEFAULT_ROOT)
    if name == "cifar10_lt":
        return load_cifar(10, root, imf, seed, vpc)
    if name == "cifar100_lt":
        return load_cifar(100, root, imf, seed, vpc)
    if name == "imagefolder_lt":
        return load_imagefolder(root, imf, seed, vpc, float(cfg.get("val_fraction", 0.1)),
                                int(cfg.get("image_size", 64)))
    return make_synthetic(num_classes=int(cfg.get("num_classes", 5)), n_max=int(cfg.get("n_max", 200)),
                          imbalance_factor=imf, image_size=int(cfg.get("image_size", 16)),
                          val_per_class=vpc, seed=seed)
