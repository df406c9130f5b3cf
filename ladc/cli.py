"""The command lines of ladc: `train.py` (stage1, stage2, table, all, runs) and `tune.py`.

Every command resolves its config (experiments/<dataset>.yaml + flags + `--set section.key=value`) and
validates every argument, bound, name and storage location before any data, training or tracking I/O;
bad input is one line on stderr and exit code 2 (see ladc.errors.cli_main).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import SECTIONS, apply_overrides, load_config, scale_schedule, set_if_given
from .errors import check, cli_main
from .params import SearchSpace, Stage2Params, data_section, stage1_section

TRAIN_DOC = """Train LADC: stage 1 (backbone with Representation Enhancement), stage 2 (classifier re-balancing on
frozen features), or both. Every run is tracked in MLflow (default store: mlruns/mlflow.db).

  python train.py stage1 --dataset cifar10_lt --data-root data/cifar10-jpeg --epochs 30
  python train.py stage1 --resume RUN_ID
  python train.py stage2 --backbone-run RUN_ID --method ladc --classifier lws_plus
  python train.py table  --backbone-run RUN_ID          # every method of the paper's tables
  python train.py all    --dataset cifar10_lt --epochs 30
  python train.py runs   --stage stage1                # run ids, newest first
"""

TUNE_DOC = """Tune LADC's calibration hyperparameters (m, alpha, beta, tau) with Optuna on the cached features of a
trained backbone; every trial is a nested MLflow run; the best classifier is registered as
ladc-<dataset> and becomes @champion when it beats the current champion on validation accuracy.
Several processes may run the same command at once: they share the study (exactly --n-trials trials).

  python tune.py --dataset cifar10_lt                       # newest matching backbone, or train one first
  python tune.py --dataset cifar10_lt --n-trials 100 --study-name my-study   # rerun to resume
  python tune.py --dataset cifar10_lt --backbone-run RUN_ID --tau-range 0.8 1.6 --no-promote
"""

DATASETS_HELP = "cifar10_lt | cifar100_lt | imagefolder_lt | synthetic_lt (loads experiments/<dataset>.yaml)"


# ---------------------------------------------------------------- arguments

def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=DATASETS_HELP)
    g.add_argument("--config", help="a YAML config instead of experiments/<dataset>.yaml")
    g.add_argument("--data-root", help="folder with the data (torchvision CIFAR files or ImageFolder train/+test/)")
    g.add_argument("--imbalance-factor", type=float, help="n_max / n_min of the long-tailed subset (>= 1)")
    g.add_argument("--data-seed", type=int, help="seed of the long-tailed subset and validation split")


def add_set_arg(p: argparse.ArgumentParser, sections: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override any config value of {sections}, e.g. --set {sections.split()[0].rstrip(',')}.KEY=VALUE "
                        f"(repeatable)")


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
    g.add_argument("--checkpoint-minutes", type=float, help="also checkpoint whenever this many minutes passed")
    g.add_argument("--seed", type=int, help="training seed")
    g.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    g.add_argument("--precision", help="auto (default: bf16 where the CPU/GPU supports it, else fp32) | fp32 | bf16")


STAGE1_FLAGS = ("backbone", "epochs", "milestones", "lr", "batch_size", "eval_every", "checkpoint_minutes", "seed",
                "device", "precision", "dataset", "config", "data_root", "imbalance_factor", "data_seed")


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


def stage2_flags(args) -> dict:
    """The stage-2 values given on the command line (flags only)."""
    names = {"method": "method", "classifier": "classifier", "m": "m", "alpha": "alpha", "beta": "beta",
             "tau": "tau", "weighting": "weighting", "sampling": "sampling", "head_fraction": "head_fraction",
             "stage2_epochs": "epochs", "stage2_lr": "lr", "stage2_seed": "seed"}
    return {key: getattr(args, flag) for flag, key in names.items() if getattr(args, flag, None) is not None}


def only_sections(overrides: list[str], allowed: tuple, command: str) -> None:
    for item in overrides or []:
        section = item.split("=", 1)[0].split(".", 1)[0]
        check(section in allowed, f"--set {item}: `{command}` uses only {', '.join(allowed)} settings"
                                  + ("; the data and stage-1 recipe come from the backbone run" if
                                     "data" not in allowed else ""))


def resolve_config(args, sections=("data", "stage1")) -> dict:
    """experiments/<dataset>.yaml (or --config) + data/stage-1 flags + --set, typed and checked (no I/O
    beyond reading the YAML)."""
    check(args.dataset is not None or args.config is not None,
          "no dataset given: pass --dataset NAME (e.g. cifar10_lt) or --config FILE")
    cfg = load_config(args.dataset, args.config)
    set_if_given(cfg["data"], data_root=args.data_root, imbalance_factor=getattr(args, "imbalance_factor", None),
                 seed=getattr(args, "data_seed", None))
    s1 = cfg["stage1"]
    if getattr(args, "epochs", None) is not None and getattr(args, "milestones", None) is None and s1.get("epochs"):
        scale_schedule(s1, args.epochs)
    if hasattr(args, "backbone"):
        set_if_given(s1, backbone=args.backbone, epochs=args.epochs, milestones=args.milestones, lr=args.lr,
                     batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed, device=args.device,
                     checkpoint_minutes=args.checkpoint_minutes, precision=args.precision)
        if args.no_remix:
            s1["remix"] = False
        if args.no_randaugment:
            s1["randaugment"] = False
    cfg = apply_overrides(cfg, args.set)
    cfg["data"] = data_section(cfg["data"])
    if "stage1" in sections:
        cfg["stage1"] = stage1_section(cfg["stage1"])
    return cfg


def stage2_params(cfg_stage2: dict, args) -> Stage2Params:
    return Stage2Params.from_dict({**cfg_stage2, **stage2_flags(args)})


def precheck_stage2(args) -> None:
    """Type and range checks of the stage-2 flags and --set stage2.* before the backbone is fetched."""
    only_sections(args.set, ("stage2",), args.command)
    defaults = {s: {} for s in SECTIONS} | {"stage2": Stage2Params().as_dict()}
    stage2_params(apply_overrides(defaults, args.set)["stage2"], args)


def backbone_config(args, ckpt: dict) -> dict:
    """The config of stage 2 on a backbone: its dataset's YAML (or --config) + --set stage2.*."""
    dataset = json.loads(ckpt["config"])["data"]["dataset"]
    return apply_overrides(load_config(None if args.config else dataset, args.config), args.set)


# ---------------------------------------------------------------- train.py commands

def cmd_stage1(args) -> None:
    from . import tracking
    from .stage1 import train_stage1

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in STAGE1_FLAGS if getattr(args, k, None) is not None]
        given += ["--no-remix"] * args.no_remix + ["--no-randaugment"] * args.no_randaugment + ["--set"] * bool(args.set)
        check(not given, f"--resume continues run {args.resume} with its own recipe; {', '.join(given)} cannot change "
                         f"it: drop them, or start a new run without --resume")
        tracking.check_tracking_store()
        run_id = train_stage1({}, resume_run_id=args.resume)
    else:
        only_sections(args.set, ("data", "stage1"), "stage1")
        cfg = resolve_config(args)
        tracking.check_tracking_store()
        run_id = train_stage1(cfg)
    print(f"stage-1 run {run_id} finished")


def load_for_stage2(args):
    """Checks first, then the backbone checkpoint (downloaded once), the stage-2 params and the features."""
    from . import tracking
    from .checkpoints import download_checkpoint
    from .stage2_tracking import load_backbone

    precheck_stage2(args)
    tracking.check_tracking_store()
    tracking.setup_tracking()
    ckpt = download_checkpoint(args.backbone_run)
    p = stage2_params(backbone_config(args, ckpt)["stage2"], args)
    bb = load_backbone(args.backbone_run, args.data_root, args.cache_dir, p.device, ckpt=ckpt)
    return bb, p


def cmd_stage2(args) -> None:
    from .stage2_tracking import run_stage2

    bb, p = load_for_stage2(args)
    run_id, reports, _, info, _ = run_stage2(bb, p)
    t = reports["test"]
    print(f"stage-2 run {run_id} ({info['method_used']} + {p.classifier}): val top-1 {reports['val']['top1']:.2f}  "
          f"test top-1 {t['top1']:.2f}  " + "  ".join(f"{k} {t[k]:.2f}" if t[k] == t[k] else f"{k} n/a (no such class)"
                                                     for k in ("many", "medium", "few")))


def cmd_table(args) -> None:
    from .stage2_tracking import run_table

    check(args.seeds >= 1, f"--seeds {args.seeds} must be >= 1")
    bb, p = load_for_stage2(args)
    df = run_table(bb, p, seeds=list(range(args.seeds)), out=args.out)
    print(df.round(2).to_string(index=False))
    if args.out:
        print(f"written {args.out} and {args.out.rsplit('.', 1)[0]}.md")


def cmd_all(args) -> None:
    from . import tracking
    from .data import build_dataset
    from .stage1 import train_stage1
    from .stage2_tracking import load_backbone, run_stage2

    cfg = resolve_config(args)
    p = stage2_params(cfg["stage2"], args)
    tracking.check_tracking_store()
    data = build_dataset(cfg["data"])
    run_id = train_stage1(cfg, data=data)
    bb = load_backbone(run_id, None, args.cache_dir, p.device, data=data)  # no second decode
    _, reports, _, _, _ = run_stage2(bb, p)
    print(f"stage 1 run {run_id}; stage 2 test top-1 {reports['test']['top1']:.2f}")


def cmd_runs(args) -> None:
    import pandas as pd

    from .tracking import list_runs, setup_tracking

    print(f"tracking store: {setup_tracking()}")
    df = list_runs(args.dataset, args.stage, args.n)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False) if not df.empty else "no runs")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=TRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s1 = sub.add_parser("stage1", help="train a backbone (Remix + RandAugment), tracked in MLflow")
    add_data_args(s1)
    add_stage1_args(s1)
    add_set_arg(s1, "data and stage1")
    s1.add_argument("--resume", metavar="RUN_ID", help="continue a killed stage-1 run from its last checkpoint")
    s1.set_defaults(func=cmd_stage1)

    for name, helptext, func in (("stage2", "re-balance the classifier of a stage-1 run on its cached features",
                                  cmd_stage2),
                                 ("table", "run every method of the paper's tables on one backbone", cmd_table)):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--backbone-run", required=True, metavar="RUN_ID", help="the stage-1 MLflow run to build on")
        s.add_argument("--config", help="a YAML config for the stage-2 defaults instead of the dataset's")
        s.add_argument("--data-root", help="where the backbone's data now lives (when it moved)")
        add_set_arg(s, "stage2")
        if name == "table":
            s.add_argument("--seeds", type=int, default=1, help="stage-2 seeds per row (mean and std reported)")
            s.add_argument("--out", help="write the table here (CSV, and .md beside it)")
        add_stage2_args(s)
        s.set_defaults(func=func)

    al = sub.add_parser("all", help="stage 1 then stage 2 in one command")
    add_data_args(al)
    add_stage1_args(al)
    add_stage2_args(al)
    add_set_arg(al, "data, stage1 and stage2")
    al.set_defaults(func=cmd_all)

    rl = sub.add_parser("runs", help="list recent runs and their ids")
    rl.add_argument("--dataset")
    rl.add_argument("--stage", help="stage1 | stage2 | table | study | trial")
    rl.add_argument("-n", type=int, default=20)
    rl.set_defaults(func=cmd_runs)
    return p


@cli_main
def train_main(argv=None):
    args = train_parser().parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------- tune.py

def tune_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tune.py", description=TUNE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help=DATASETS_HELP)
    ap.add_argument("--config", help="a YAML config instead of experiments/<dataset>.yaml")
    ap.add_argument("--data-root", help="where the data lives (for training a backbone or extracting features)")
    ap.add_argument("--backbone-run", metavar="RUN_ID",
                    help="stage-1 run to tune on (default: the newest finished one for this data spec)")
    ap.add_argument("--backbone-epochs", type=int,
                    help="epochs of the stage-1 run trained when none exists (default: tune.backbone_epochs)")
    ap.add_argument("--fresh-backbone", action="store_true",
                    help="train a new backbone even when an interrupted one for this data spec can be continued")
    ap.add_argument("--n-trials", type=int, help="total finished trials of the study (default: tune.n_trials)")
    ap.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    ap.add_argument("--study-name", help="Optuna study name; an existing study is resumed (or joined)")
    ap.add_argument("--storage", help="Optuna storage: a .log journal file (default mlruns/optuna/journal.log) or "
                                      "an RDB URL such as postgresql://user:pw@host/db")
    ap.add_argument("--sampler-seed", type=int, default=0,
                    help="TPE seed of the process that creates the study (later processes derive their own)")
    ap.add_argument("--method", default=None, help="stage-2 method: ladc (default) | ladc_avg")
    ap.add_argument("--classifier", default=None, help="stage-2 classifier (default lws_plus)")
    for name in ("m", "alpha", "beta", "tau"):
        ap.add_argument(f"--{name}-range", type=int if name == "m" else float, nargs=2, metavar=("LOW", "HIGH"),
                        help=f"search bounds of {name} (default: tune.{name} in the config)")
    ap.add_argument("--stage2-epochs", type=int, help="stage-2 epochs per trial (paper: 30)")
    ap.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                    help="give the best model the champion alias when it beats the current one (default: on)")
    ap.add_argument("--cache-dir", default="cache/features", help="feature cache folder")
    add_set_arg(ap, "data, stage1, stage2 and tune")
    ap.add_argument("--quiet", action="store_true", help="no per-trial lines")
    return ap


def tune_spec(args, cfg: dict):
    from .tuning import StudySpec

    tcfg = cfg["tune"]
    set_if_given(tcfg, n_trials=args.n_trials, m=args.m_range, alpha=args.alpha_range, beta=args.beta_range,
                 tau=args.tau_range, backbone_epochs=args.backbone_epochs)
    p = Stage2Params.from_dict({**cfg["stage2"], **{k: v for k, v in {
        "method": args.method, "classifier": args.classifier, "epochs": args.stage2_epochs}.items() if v is not None}})
    n_trials = tcfg.get("n_trials")
    check(isinstance(n_trials, int) and not isinstance(n_trials, bool), f"--n-trials {n_trials!r} must be an integer")
    return StudySpec(n_trials=n_trials, space=SearchSpace.from_config(tcfg), params=p, name=args.study_name,
                     storage=args.storage, sampler_seed=args.sampler_seed, timeout=args.timeout,
                     promote=args.promote)


def run_tune(args) -> dict:
    from . import tracking

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    # 1. everything that needs no I/O
    if args.dataset or args.config:
        cfg = resolve_config(args, sections=("data", "stage1"))
    else:
        check(args.backbone_run, "no dataset given: pass --dataset NAME (e.g. cifar10_lt) or --backbone-run RUN_ID")
        only_sections(args.set, ("stage2", "tune"), "tune.py --backbone-run")
        cfg = None
    if args.backbone_epochs is not None:
        check(args.backbone_epochs >= 1, f"--backbone-epochs {args.backbone_epochs} must be >= 1")
    spec = tune_spec(args, cfg if cfg is not None else apply_overrides(load_config("synthetic_lt"), args.set))
    from .tuning import check_storage
    check_storage(args.storage, tracking.MLRUNS / "optuna")
    tracking.check_tracking_store()
    # 2. the backbone, found, given or trained
    uri = tracking.setup_tracking()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from .checkpoints import download_checkpoint
    from .stage2_tracking import load_backbone
    from .tuning import run_study

    ckpt = None
    if cfg is None:
        ckpt = download_checkpoint(args.backbone_run)
        cfg = backbone_config(args, ckpt)
        spec = tune_spec(args, cfg)
    backbone = args.backbone_run or tracking.latest_stage1_run(cfg["data"])
    data = None
    interrupted = None if backbone or args.fresh_backbone else tracking.interrupted_stage1_run(cfg["data"])
    if interrupted:
        from .stage1 import train_stage1
        log(f"continuing the interrupted backbone run {interrupted} for {cfg['data']['dataset']} "
            f"(--fresh-backbone starts a new one)")
        backbone = train_stage1({}, resume_run_id=interrupted, progress=not args.quiet)
    if backbone is None:
        s1 = cfg["stage1"]
        epochs = int(cfg["tune"].get("backbone_epochs", s1["epochs"]))
        if epochs != s1["epochs"]:
            scale_schedule(s1, epochs)
        log(f"no finished stage-1 run for {cfg['data']['dataset']} (IF {cfg['data'].get('imbalance_factor')}, seed "
            f"{cfg['data'].get('seed')}) in {uri}: training one for {epochs} epochs first (--backbone-epochs N to "
            f"shorten)")
        from .data import build_dataset
        from .stage1 import train_stage1
        data = build_dataset(cfg["data"])
        backbone = train_stage1(cfg, data=data, progress=not args.quiet)
    log(f"backbone run {backbone}")
    bb = load_backbone(backbone, args.data_root, args.cache_dir, spec.params.device, ckpt=ckpt, data=data,
                       progress=not args.quiet)
    return run_study(bb, spec, log=log)


@cli_main
def tune_main(argv=None) -> dict:
    return run_tune(tune_parser().parse_args(argv))


def run_script(entry, argv=None):
    """Run a CLI entry point from a script (`train.py`, `tune.py`) and exit 0 after it."""
    entry(sys.argv[1:] if argv is None else argv)
    sys.exit(0)
