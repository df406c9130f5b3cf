"""Command-line arguments shared by train.py and tune.py, and the config they resolve to."""

from __future__ import annotations

import argparse

from .config import apply_overrides, load_config, scale_schedule, set_if_given
from .errors import LadcError


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="cifar10_lt | cifar100_lt | imagefolder_lt | synthetic_lt "
                                     "(loads experiments/<dataset>.yaml)")
    g.add_argument("--config", help="a YAML config instead of experiments/<dataset>.yaml")
    g.add_argument("--data-root", help="folder with the data (torchvision CIFAR files or ImageFolder train/+test/)")
    g.add_argument("--imbalance-factor", type=float, help="n_max / n_min of the long-tailed subset (>= 1)")
    g.add_argument("--data-seed", type=int, help="seed of the long-tailed subset and validation split")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set stage1.remix_kappa=2 (repeatable)")


def add_stage1_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 1")
    g.add_argument("--backbone", help="resnet32 | resnet8 | resnet20 | resnet56 | resnet10 | resnet18 | resnet50")
    g.add_argument("--epochs", type=int, help="stage-1 epochs; milestones scale with it unless --milestones is given")
    g.add_argument("--milestones", type=int, nargs="+", help="epochs at which the lr is multiplied by lr_gamma")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--no-remix", action="store_true", help="turn Remix off (ablation)")
    g.add_argument("--no-randaugment", action="store_true", help="turn RandAugment off (ablation)")
    g.add_argument("--eval-every", type=int, help="evaluate on validation and test every k epochs")
    g.add_argument("--seed", type=int, help="training seed")
    g.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")


def resolve_config(args) -> dict:
    if args.dataset is None and args.config is None:
        raise LadcError("no dataset given: pass --dataset NAME (e.g. cifar10_lt) or --config FILE")
    cfg = load_config(args.dataset, args.config)
    set_if_given(cfg["data"], data_root=args.data_root, imbalance_factor=args.imbalance_factor, seed=args.data_seed)
    s1 = cfg["stage1"]
    if getattr(args, "epochs", None) is not None and args.milestones is None and s1.get("epochs"):
        scale_schedule(s1, args.epochs)
    if hasattr(args, "backbone"):
        set_if_given(s1, backbone=args.backbone, epochs=args.epochs, milestones=args.milestones, lr=args.lr,
                     batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed, device=args.device)
        if args.no_remix:
            s1["remix"] = False
        if args.no_randaugment:
            s1["randaugment"] = False
    return apply_overrides(cfg, args.set)
