"""Typed, validated-once parameters: a config section (YAML + overrides) becomes a frozen dataclass
whose every value has the right type and range, or a one-line LadcError naming the key and the fix."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from .errors import LadcError, check

METHODS = ("ce", "cbs", "las", "dc", "ladc_avg", "ladc")
CLASSIFIERS = ("stage1", "crt", "lws", "lws_plus")
WEIGHTINGS = ("paper", "inverse")
SAMPLINGS = ("paper", "instance")
TUNED = ("m", "alpha", "beta", "tau")


def _typed(section: str, key: str, value, kind):
    """value as `kind` (int, float, str, list[int]), or a one-line error naming section.key."""
    where = f"{section}.{key}"
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise LadcError(f"{where} = {value!r} must be an integer: fix it in the config or with --set {where}=N")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LadcError(f"{where} = {value!r} must be a finite number: fix it in the config or with --set "
                            f"{where}=X")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise LadcError(f"{where} = {value!r} must be a name: fix it in the config or with --set {where}=NAME")
        return value
    if kind == "ints":
        if not isinstance(value, (list, tuple)):
            raise LadcError(f"{where} = {value!r} must be a list of integers, e.g. --set {where}=[10,20]")
        return tuple(_typed(section, key, v, int) for v in value)
    raise AssertionError(kind)


@dataclass(frozen=True)
class Stage2Params:
    """The `stage2` config section (see experiments/*.yaml), validated once by `from_dict`."""

    method: str = "ladc"
    classifier: str = "lws_plus"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple = (10, 20)
    lr_gamma: float = 0.1
    head_fraction: float = 0.6
    m: int = 2
    alpha: float = 0.1
    beta: float = 0.6
    tau: float = 1.2
    weighting: str = "paper"
    sampling: str = "instance"
    dc_alpha: float = 0.21
    dc_tukey: float = 0.5
    las_eps_head: float = 0.3
    las_eps_tail: float = 0.0
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Params":
        if isinstance(d, cls):
            return d
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        check(not unknown, f"unknown stage2 setting(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        kinds = {f.name: {"str": str, "int": int, "float": float, "tuple": "ints"}[f.type] for f in fields(cls)}
        p = cls(**{k: _typed("stage2", k, v, kinds[k]) for k, v in d.items()})
        p.check()
        return p

    def replace(self, **changes) -> "Stage2Params":
        return Stage2Params.from_dict({**self.as_dict(), **changes})

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def check(self, num_heads: int | None = None) -> None:
        """Ranges of every value; with num_heads, m against the number of head classes too."""
        check(self.method in METHODS, f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        check(self.classifier in CLASSIFIERS,
              f"unknown classifier '{self.classifier}': choose one of {', '.join(CLASSIFIERS)}")
        check(self.weighting in WEIGHTINGS, f"weighting '{self.weighting}' must be one of {', '.join(WEIGHTINGS)}")
        check(self.sampling in SAMPLINGS, f"sampling '{self.sampling}' must be one of {', '.join(SAMPLINGS)}")
        check(0 < self.head_fraction <= 1,
              f"head_fraction {self.head_fraction} is out of range: use a value in (0, 1]")
        check(self.m >= 1, f"m {self.m} is out of range: use an integer >= 1")
        if num_heads is not None:
            check(self.m <= num_heads, f"m {self.m} is out of range: there are only {num_heads} head classes, "
                                       f"use 1 <= m <= {num_heads} (or raise head_fraction)")
        check(self.alpha >= 0, f"alpha {self.alpha} is out of range: use alpha >= 0")
        check(self.beta > 0, f"beta {self.beta} is out of range: use beta > 0")
        check(self.tau >= 0, f"tau {self.tau} is out of range: use tau >= 0")
        check(self.epochs >= 0, f"stage-2 epochs {self.epochs} must be an integer >= 0")
        check(self.lr > 0, f"stage-2 lr {self.lr} must be > 0")
        check(self.batch_size > 0, f"stage-2 batch_size {self.batch_size} must be > 0")
        check(0 <= self.momentum < 1, f"stage-2 momentum {self.momentum} must be in [0, 1)")
        check(self.weight_decay >= 0, f"stage-2 weight_decay {self.weight_decay} must be >= 0")
        check(0 < self.lr_gamma <= 1, f"stage-2 lr_gamma {self.lr_gamma} must be in (0, 1]")
        check(self.dc_alpha >= 0, f"dc_alpha {self.dc_alpha} must be >= 0")
        check(0 < self.dc_tukey <= 1, f"dc_tukey {self.dc_tukey} must be in (0, 1]")
        check(0 <= self.las_eps_head <= 1 and 0 <= self.las_eps_tail <= 1,
              f"las_eps_head/las_eps_tail ({self.las_eps_head}, {self.las_eps_tail}) must be in [0, 1]")
        check_device(self.device, "stage2.device")


def check_device(name: str, where: str) -> None:
    ok = name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())
    check(ok, f"{where} '{name}' is not a device: use auto, cpu, cuda or cuda:N")


STAGE1_KINDS = {"backbone": str, "epochs": int, "batch_size": int, "lr": float, "momentum": float,
                "weight_decay": float, "warmup_epochs": int, "milestones": "ints", "lr_gamma": float,
                "crop_padding": int, "remix": bool, "remix_alpha": float, "remix_kappa": float, "remix_tau": float,
                "randaugment": bool, "randaug_num_ops": int, "randaug_magnitude": int, "randaug_group": int,
                "eval_every": int, "checkpoint_every": int, "checkpoint_minutes": float, "min_steps": int, "precision": str, "seed": int,
                "device": str}


def stage1_section(s: dict) -> dict:
    """The `stage1` section with every value typed and in range (a new dict)."""
    from .models import BACKBONES

    unknown = sorted(set(s) - set(STAGE1_KINDS))
    check(not unknown, f"unknown stage1 setting(s) {', '.join(unknown)}: known are {', '.join(sorted(STAGE1_KINDS))}")
    out = {}
    for k, v in s.items():
        kind = STAGE1_KINDS[k]
        if kind is bool:
            check(isinstance(v, bool), f"stage1.{k} = {v!r} must be true or false")
            out[k] = v
        else:
            out[k] = list(_typed("stage1", k, v, kind)) if kind == "ints" else _typed("stage1", k, v, kind)
    out.setdefault("checkpoint_minutes", 3.0)
    out.setdefault("min_steps", 0)
    out.setdefault("precision", "auto")
    check(out["backbone"] in BACKBONES, f"unknown backbone '{out['backbone']}': choose one of {', '.join(BACKBONES)}")
    check(out["epochs"] > 0, f"epochs {out['epochs']} must be a positive integer")
    check(out["lr"] > 0, f"lr {out['lr']} must be > 0")
    check(out["batch_size"] > 0, f"batch_size {out['batch_size']} must be > 0")
    check(out["warmup_epochs"] >= 0, f"warmup_epochs {out['warmup_epochs']} must be >= 0")
    check(0 < out["lr_gamma"] <= 1, f"lr_gamma {out['lr_gamma']} must be in (0, 1]")
    check(out["remix_alpha"] > 0, f"remix_alpha {out['remix_alpha']} must be > 0")
    check(out["eval_every"] >= 1, f"eval_every {out['eval_every']} must be >= 1")
    check(out["checkpoint_every"] >= 1, f"checkpoint_every {out['checkpoint_every']} must be >= 1")
    check(out["checkpoint_minutes"] > 0, f"checkpoint_minutes {out['checkpoint_minutes']} must be > 0")
    check(out["min_steps"] >= 0, f"min_steps {out['min_steps']} must be >= 0")
    check(out["precision"] in ("auto", "fp32", "bf16"), f"stage1.precision '{out['precision']}' must be auto (bf16 where "
                                                        f"the device supports it), fp32 or bf16")
    check_device(out["device"], "stage1.device")
    return out


def data_section(d: dict) -> dict:
    """Checks of the `data` section that need no data: the name, the imbalance factor, counts."""
    from .data import DATASETS

    name = d.get("dataset")
    check(name in DATASETS, f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    imf = d.get("imbalance_factor", 100)
    if imf is not None:
        check(isinstance(imf, (int, float)) and not isinstance(imf, bool) and imf >= 1,
              f"imbalance factor {imf} is out of range: use a number >= 1 (1 = balanced)")
    for k in ("seed", "val_per_class", "num_classes", "n_max", "image_size"):
        if k in d and d[k] is not None:
            v = _typed("data", k, d[k], int)
            check(v >= 0, f"data.{k} {v} is negative: use 0 or more")
    return d


@dataclass(frozen=True)
class SearchSpace:
    """Bounds {param: (low, high)} of a study over (m, alpha, beta, tau), checked once."""

    bounds: dict

    @classmethod
    def from_config(cls, tune_cfg: dict) -> "SearchSpace":
        space = {}
        for name in TUNED:
            b = tune_cfg.get(name)
            check(isinstance(b, (list, tuple)) and len(b) == 2,
                  f"search bounds for {name} must be [low, high], got {b!r}: use --{name}-range LOW HIGH")
            kind = int if name == "m" else float
            lo, hi = (_typed("tune", name, v, kind) for v in b)
            check(lo <= hi, f"empty search space: {name} low {lo} > high {hi}; give low <= high")
            space[name] = (lo, hi)
        check(space["m"][0] >= 1, f"m low {space['m'][0]} is out of range: m >= 1")
        check(space["alpha"][0] >= 0, f"alpha low {space['alpha'][0]} is out of range: alpha >= 0")
        check(space["beta"][0] > 0, f"beta low {space['beta'][0]} is out of range: beta > 0")
        check(space["tau"][0] >= 0, f"tau low {space['tau'][0]} is out of range: tau >= 0")
        check(any(lo < hi for lo, hi in space.values()),
              "empty search space: every parameter is fixed (low == high); widen at least one range")
        return cls(space)

    def for_heads(self, num_heads: int) -> "SearchSpace":
        """m's upper bound capped at the number of head classes (known once features are loaded)."""
        lo, hi = self.bounds["m"]
        check(lo <= num_heads, f"m low {lo} is out of range: there are only {num_heads} head classes")
        return SearchSpace({**self.bounds, "m": (lo, min(hi, num_heads))})

    def items(self):
        return self.bounds.items()

    def free(self) -> list[str]:
        return [k for k, (lo, hi) in self.bounds.items() if lo < hi]
