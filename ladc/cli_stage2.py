"""train.py sub-commands for stage 2: `stage2`, `table`, `all`."""

from __future__ import annotations

import argparse

from .config import apply_overrides, load_config, set_if_given


def add_stage2_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 2 (defaults from experiments/<dataset>.yaml)")
    g.add_argument("--method", help="ce | cbs | las | dc | ladc_avg | ladc")
    g.add_argument("--classifier", help="stage1 | crt | lws | lws_plus")
    g.add_argument("--m", type=int, help="number of nearest head classes (1 <= m <= #head classes)")
    g.add_argument("--alpha", type=float, help="dispersion added to Sigma_0 (>= 0), eq. 7")
    g.add_argument("--beta", type=float, help="prior confidence (> 0), eqs. 11-12")
    g.add_argument("--tau", type=float, help="sampling temperature (>= 0), eq. 13")
    g.add_argument("--weighting", help="eq. 6: paper (as printed) | inverse")
    g.add_argument("--sampling", help="eq. 13: paper (class probabilities) | instance (per-instance weights)")
    g.add_argument("--head-fraction", type=float, help="share of training instances held by head classes, (0, 1]")
    g.add_argument("--stage2-epochs", type=int, help="stage-2 epochs (paper: 30)")
    g.add_argument("--stage2-lr", type=float, help="stage-2 learning rate")
    g.add_argument("--stage2-seed", type=int, help="stage-2 seed")
    g.add_argument("--cache-dir", default="cache/features", help="feature cache folder (default cache/features)")


def stage2_params(args, cfg: dict) -> dict:
    p = cfg["stage2"]
    set_if_given(p, method=args.method, classifier=args.classifier, m=args.m, alpha=args.alpha, beta=args.beta,
                 tau=args.tau, weighting=args.weighting, sampling=args.sampling, head_fraction=args.head_fraction,
                 epochs=args.stage2_epochs, lr=args.stage2_lr, seed=args.stage2_seed)
    return p


def backbone_config(args) -> dict:
    """Config for stage 2 on a backbone run: the dataset's YAML (from the run's data spec) + overrides."""
    from .stage1 import download_checkpoint
    from .tracking import setup_tracking
    import json

    setup_tracking()
    ckpt = download_checkpoint(args.backbone_run)
    dataset = json.loads(ckpt["config"])["data"]["dataset"]
    cfg = load_config(None if args.config else dataset, args.config)
    return apply_overrides(cfg, args.set)


def cmd_stage2(args) -> None:
    from .stage2_run import run_stage2

    p = stage2_params(args, backbone_config(args))
    run_id, reports, _, info, _ = run_stage2(args.backbone_run, p, data_root=args.data_root, cache_dir=args.cache_dir)
    t = reports["test"]
    print(f"stage-2 run {run_id} ({info['method_used']} + {p['classifier']}): val top-1 {reports['val']['top1']:.2f}  "
          f"test top-1 {t['top1']:.2f}  many {t['many']:.2f}  medium {t['medium']:.2f}  few {t['few']:.2f}")


def cmd_table(args) -> None:
    from .stage2_run import run_table

    p = stage2_params(args, backbone_config(args))
    seeds = list(range(args.seeds))
    df = run_table(args.backbone_run, p, data_root=args.data_root, cache_dir=args.cache_dir, seeds=seeds, out=args.out)
    print(df.round(2).to_string(index=False))
    if args.out:
        print(f"written {args.out} and {args.out.rsplit('.', 1)[0]}.md")


def cmd_all(args) -> None:
    from .stage1 import train_stage1
    from .stage2_run import run_stage2
    from .cli_common import resolve_config

    cfg = resolve_config(args)
    run_id = train_stage1(cfg)
    p = stage2_params(args, cfg)
    _, reports, _, _, _ = run_stage2(run_id, p, data_root=None, cache_dir=args.cache_dir)
    print(f"stage 1 run {run_id}; stage 2 test top-1 {reports['test']['top1']:.2f}")


def add_commands(sub, add_data_args, add_stage1_args) -> None:
    s2 = sub.add_parser("stage2", help="re-balance the classifier of a stage-1 run on its cached features")
    s2.add_argument("--backbone-run", required=True, metavar="RUN_ID", help="the stage-1 MLflow run to build on")
    s2.add_argument("--config", help="a YAML config instead of the dataset's default")
    s2.add_argument("--data-root", help="where the backbone's data now lives (when it moved)")
    s2.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    add_stage2_args(s2)
    s2.set_defaults(func=cmd_stage2)

    tb = sub.add_parser("table", help="run every method of the paper's tables on one backbone")
    tb.add_argument("--backbone-run", required=True, metavar="RUN_ID")
    tb.add_argument("--config")
    tb.add_argument("--data-root")
    tb.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    tb.add_argument("--seeds", type=int, default=1, help="stage-2 seeds per row (mean reported)")
    tb.add_argument("--out", help="write the table here (CSV, and .md beside it)")
    add_stage2_args(tb)
    tb.set_defaults(func=cmd_table)

    al = sub.add_parser("all", help="stage 1 then stage 2 in one command")
    add_data_args(al)
    add_stage1_args(al)
    add_stage2_args(al)
    al.set_defaults(func=cmd_all)
