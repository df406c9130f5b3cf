"""The MLflow model registry side of ladc: register a classifier as `ladc-<dataset>`, promote it to
the `champion` alias only when it beats the current champion on validation accuracy, list versions,
promote a given version, roll back.

  python -m ladc.registry list --dataset cifar10_lt
  python -m ladc.registry promote --dataset cifar10_lt --version 3
  python -m ladc.registry rollback --dataset cifar10_lt
"""

from __future__ import annotations

import argparse

import mlflow
import pandas as pd
from mlflow import MlflowClient

from .errors import LadcError, cli_main
from .tracking import setup_tracking

ALIAS = "champion"


def model_name(dataset: str) -> str:
    return f"ladc-{dataset}"


def versions(client: MlflowClient, name: str) -> list:
    """All versions of a registered model ([] when it does not exist)."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return []
    return client.search_model_versions(f"name = '{name}'")


def champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None


def register(model_uri: str, dataset: str, val_top1: float, test_top1: float, tags: dict, promote: bool = True):
    """Register model_uri as a new version of ladc-<dataset>; give it `champion` when its validation
    accuracy beats the current champion's. Returns (version, promoted, previous champion or None)."""
    client = MlflowClient()
    name = model_name(dataset)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(name, description=f"LADC classifiers for {dataset}: images [B, H, W, 3] "
                                                             f"of pixels 0..255 in; class ids, names, probabilities "
                                                             f"or logits out (params output=...)")
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another worker
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in {  # tags with the version, at once
        "val_top1": f"{val_top1:.4f}", "test_top1": f"{test_top1:.4f}", **tags}.items()})
    version = str(mv.version)
    current = champion(client, name)
    cur_val = float(current.tags.get("val_top1", "-inf")) if current else float("-inf")
    promoted = promote and val_top1 > cur_val
    if promoted:
        if current is not None:
            client.set_model_version_tag(name, version, "replaces_version", str(current.version))
            client.set_model_version_tag(name, version, "replaced_val_top1", f"{cur_val:.4f}")
        client.set_registered_model_alias(name, ALIAS, version)
    else:
        client.set_model_version_tag(name, version, "not_promoted_because",
                                     f"val_top1 {val_top1:.2f} <= champion v{current.version} {cur_val:.2f}"
                                     if current else "--no-promote")
    return version, promoted, current


def versions_table(dataset: str) -> pd.DataFrame:
    client = MlflowClient()
    name = model_name(dataset)
    try:
        rm = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise LadcError(f"no registered model {name}: run `python tune.py --dataset {dataset}` first") from None
    aliases = {}
    for alias, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        rows.append({"version": int(mv.version), "aliases": ",".join(aliases.get(str(mv.version), [])),
                     "val_top1": float(mv.tags.get("val_top1", "nan")), "test_top1": float(mv.tags.get("test_top1", "nan")),
                     "study": mv.tags.get("study", ""), "replaces": mv.tags.get("replaces_version", ""),
                     "run_id": mv.run_id})
    return pd.DataFrame(rows).sort_values("version", ascending=False)


def promote_version(dataset: str, version: int) -> None:
    client = MlflowClient()
    name = model_name(dataset)
    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise LadcError(f"{name} has no version {version}: see `python -m ladc.registry list --dataset {dataset}`") from None
    current = champion(client, name)
    if current is not None and str(current.version) != str(version):
        client.set_model_version_tag(name, str(version), "replaces_version", str(current.version))
    client.set_registered_model_alias(name, ALIAS, str(version))


def rollback(dataset: str) -> str:
    """Move `champion` back to the version the current champion replaced."""
    client = MlflowClient()
    name = model_name(dataset)
    current = champion(client, name)
    if current is None:
        raise LadcError(f"{name} has no champion to roll back")
    prev = current.tags.get("replaces_version")
    if not prev:
        raise LadcError(f"champion v{current.version} of {name} replaced no earlier version: nothing to roll back to")
    client.set_registered_model_alias(name, ALIAS, prev)
    client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    return prev


@cli_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ladc.registry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for c in ("list", "promote", "rollback"):
        s = sub.add_parser(c)
        s.add_argument("--dataset", required=True)
        if c == "promote":
            s.add_argument("--version", type=int, required=True)
    args = ap.parse_args(argv)
    from .data import DATASETS
    if args.dataset not in DATASETS:
        raise LadcError(f"unknown dataset '{args.dataset}': choose one of {', '.join(DATASETS)} "
                        f"(models are registered as ladc-<dataset>)")
    setup_tracking()
    if args.cmd == "list":
        print(versions_table(args.dataset).to_string(index=False))
    elif args.cmd == "promote":
        promote_version(args.dataset, args.version)
        print(f"{model_name(args.dataset)} v{args.version} is now @{ALIAS}")
    else:
        print(f"{model_name(args.dataset)} @{ALIAS} rolled back to v{rollback(args.dataset)}")


if __name__ == "__main__":
    main()
