#!/usr/bin/env python
"""Stage-1 training-loop throughput against the bare model's forward+backward on pre-made tensors,
same machine, same run. Prints images/s and the ratio (target on CPU: crop/flip/Remix >= 0.85).

  python benchmarks/stage1_throughput.py [--steps 15] [--batch 128] [--backbone resnet32]
"""

import argparse
import time

import torch
import torch.nn.functional as F
import yaml

from ladc.augment import GroupedRandAugment
from ladc.config import config_path
from ladc.models import create_model
from ladc.inference import pick_device, use_bf16
from ladc.stage1 import train_step


def timed(fn, steps, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--backbone", default="resnet32")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = pick_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    s = yaml.safe_load(config_path("cifar10_lt").read_text())["stage1"]
    bf16 = use_bf16("auto", dev)
    torch.manual_seed(0)
    model = create_model(args.backbone, 10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    B = args.batch
    images = torch.randint(0, 256, (B * 4, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (B * 4,), device=dev)
    counts = torch.tensor([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], device=dev)
    x_ready = torch.randn(B, 3, 32, 32, device=dev)
    y_ready = labels[:B]
    i = {"k": 0}

    def bare(channels_last: bool, use_bf16_: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def step():
            model.to(memory_format=fmt)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16_):
                loss = F.cross_entropy(model(x_ready.contiguous(memory_format=fmt)).float(), y_ready)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def loop(cfg, randaug):
        def step():
            model.to(memory_format=torch.channels_last)
            k = i["k"] = (i["k"] + 1) % 4
            idx = torch.arange(k * B, (k + 1) * B, device=dev)
            train_step(model, opt, images[idx], labels[idx], counts, cfg, randaug, (0.49, 0.48, 0.45),
                       (0.2, 0.2, 0.2), bf16)
        return step

    ra = GroupedRandAugment(s["randaug_num_ops"], s["randaug_magnitude"], group=s["randaug_group"])
    default = "bf16 channels_last" if bf16 else "fp32 channels_last"
    configs = {
        "bare fwd+bwd fp32 NCHW (baseline)": bare(False, False),
        "bare fwd+bwd fp32 channels_last": bare(True, False),
        "bare fwd+bwd bf16 channels_last": bare(True, True),
        f"loop ({default}): crop/flip + Remix": loop({**s, "remix": True}, None),
        f"loop ({default}): crop/flip + Remix + RandAugment": loop({**s, "remix": True}, ra),
    }
    print(f"device {dev}, backbone {args.backbone}, batch {B}, {args.steps} timed steps each, "
          f"threads {torch.get_num_threads()}, precision auto -> {'bf16' if bf16 else 'fp32'} "
          f"(bf16 supported here: {bf16})")
    base, ips_of = None, {}
    for name, fn in configs.items():
        dt = timed(fn, args.steps, args.warmup, sync)
        ips = ips_of[name] = args.steps * B / dt
        base = base or ips
        print(f"{name:55s} {ips:9.1f} img/s   ratio {ips / base:.3f}")
    default_bare = ips_of["bare fwd+bwd bf16 channels_last" if bf16 else "bare fwd+bwd fp32 channels_last"]
    full = ips_of[f"loop ({default}): crop/flip + Remix + RandAugment"]
    print(f"full loop / bare compute in the default precision: {full / default_bare:.3f} (target >= 0.85); "
          f"full loop / fp32 NCHW bare: {full / base:.3f}")


if __name__ == "__main__":
    main()
