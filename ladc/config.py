"""YAML experiment configs (experiments/<dataset>.yaml) with command-line overrides.

A config has sections `data`, `stage1`, `stage2`, `tune`. Overrides are `section.key=value`
strings (values parsed as YAML, so `2`, `0.1`, `[24, 27]`, `true` work).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import LadcError

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
SECTIONS = ("data", "stage1", "stage2", "tune")


def config_path(dataset: str) -> Path:
    return EXPERIMENTS / f"{dataset}.yaml"


def load_config(dataset: str | None = None, path: str | Path | None = None) -> dict:
    """Load `path`, or the default config of `dataset` (experiments/<dataset>.yaml)."""
    if path is None:
        if dataset is None:
            raise LadcError("no dataset given: pass --dataset NAME or --config FILE")
        path = config_path(dataset)
        if not path.exists():
            known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
            raise LadcError(f"unknown dataset '{dataset}': choose one of {', '.join(known)} "
                            f"(or pass --config FILE)")
    path = Path(path)
    if not path.exists():
        raise LadcError(f"config file {path} does not exist: pass an existing YAML file to --config")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for s in SECTIONS:
        cfg.setdefault(s, {})
    if dataset is not None:
        cfg["data"]["dataset"] = dataset
    return cfg


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Return a copy of cfg with `section.key=value` overrides applied; unknown keys are errors."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise LadcError(f"bad override '{item}': write it as section.key=value, e.g. stage1.epochs=2")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in cfg:
            raise LadcError(f"bad override '{item}': section must be one of {', '.join(SECTIONS)}")
        if name not in cfg[section]:
            raise LadcError(f"unknown setting '{key}': known {section} settings are "
                            f"{', '.join(sorted(cfg[section]))}")
        cfg[section][name] = _parse(value)
    return cfg


def _parse(value: str):
    """YAML scalar/list, with YAML 1.1's dot-less exponents (1e-5) read as numbers too."""
    v = yaml.safe_load(value)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def set_if_given(section: dict, **values) -> None:
    """Copy the CLI values that were given (not None) into a config section."""
    for k, v in values.items():
        if v is not None:
            section[k] = v


def scale_schedule(stage1: dict, epochs: int) -> None:
    """Shorten (or lengthen) a stage-1 recipe to `epochs`: milestones scale with it, warm-up is capped
    at a fifth of the run."""
    stage1["milestones"] = [max(1, round(m * epochs / stage1["epochs"])) for m in stage1["milestones"]]
    stage1["warmup_epochs"] = min(stage1["warmup_epochs"], epochs // 5)
    stage1["epochs"] = epochs
