#!/usr/bin/env python
"""Stage 2 at ImageNet-LT / iNaturalist-2018 scale (d = 2048): peak memory and time of building the LADC
sampler and running one stage-2 epoch (fit_stage2, LADC + LWS-Plus, epochs = 1), with the low-rank head
factors (class_factors, eq. 3 from the centred features) and, where it fits under --cap-gib, the old
path (class_statistics' [C, d, d] covariances + psd_factor's eigh per head class).

Class-count profiles (--profile):
  exponential  ladc.data.longtail_counts: n_c = n_max (n_min/n_max)^(c/(C-1)).
               ImageNet-LT: 1,000 classes, 1,280 -> 5 (229,853 train instances: twice Table 1's);
               iNat 2018:   8,142 classes, 1,000 -> 2 (1,303,811: three times Table 1's).
  table1       the same end points with a stretched exponent, n_c = n_max (n_min/n_max)^((c/(C-1))^g),
               g fitted so the total matches Table 1 (ImageNet-LT 115,846; iNat 2018 437,513).
Features are synthetic and cheap: ReLU(class mean + shared rank-64 noise + isotropic noise); the stage-1
classifier is the nearest-class-mean rule (W = class means, b = -|mu|^2 / 2, over a temperature that
gives logits of std ~2). Val/test: ImageNet-LT 20/50
per class, iNat 3/3 per class.

Each (scale, path) runs in its own child process, so each peak is its own: peak resident set
(ru_maxrss; VmHWM is reset after the features are made where the kernel allows, so the figure is the
stage-2 peak including the resident features) or torch.cuda.max_memory_allocated on a GPU.

  python benchmarks/stage2_scale.py --scale imagenet_lt|inat2018|both [--profile exponential|table1]
         [--device cpu|cuda] [--dtype float32|float64] [--dim 2048] [--cap-gib 12] [--paths new,old]
         [--epoch fit|batched]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ladc import calibration as cal  # noqa: E402
from ladc import stage2  # noqa: E402
from ladc.data import longtail_counts  # noqa: E402
from ladc.features import FeatureSet  # noqa: E402

SCALES = {  # classes, n_max, n_min, Table-1 train total, val/class, test/class
    "imagenet_lt": (1000, 1280, 5, 115_846, 20, 50),
    "inat2018": (8142, 1000, 2, 437_513, 3, 3),
}
GIB = 1 << 30


def class_counts(scale: str, profile: str) -> list[int]:
    C, n_max, n_min, total, _, _ = SCALES[scale]
    if profile == "exponential":
        return longtail_counts(n_max, C, n_max / n_min)

    def counts(g):
        return [max(n_min, int(n_max * (n_min / n_max) ** ((c / (C - 1)) ** g))) for c in range(C)]

    lo, hi = 0.05, 1.0  # smaller g: faster early decay, fewer instances
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(counts(mid)) < total else (lo, mid)
    return counts(0.5 * (lo + hi))


def make_features(scale, profile, d, dtype, device, seed=0) -> FeatureSet:
    """Cheap synthetic features, written block by block into preallocated tensors."""
    C, *_, val_pc, test_pc = SCALES[scale]
    counts = class_counts(scale, profile)
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(C, d, generator=g) * 0.5 + 0.3
    basis = torch.randn(64, d, generator=g) * (0.6 / 8)  # shared rank-64 noise
    scales = 0.5 + torch.rand(C, generator=g)            # per-class noise level

    def draw(cs):
        y = torch.repeat_interleave(torch.arange(C), torch.as_tensor(cs))
        x = torch.empty(len(y), d, dtype=dtype)
        for i in range(0, len(y), 16384):
            yb = y[i:i + 16384]
            xb = mus[yb] + scales[yb, None] * (torch.randn(len(yb), 64, generator=g) @ basis
                                               + 0.2 * torch.randn(len(yb), d, generator=g))
            x[i:i + 16384] = xb.relu_()
        return x.to(device), y.to(device)

    (xtr, ytr), (xv, yv), (xt, yt) = draw(counts), draw([val_pc] * C), draw([test_pc] * C)
    W, _ = cal.class_means(xtr, ytr, C)   # nearest-class-mean stage-1 classifier, logits scaled to std ~2
    b = -0.5 * W.pow(2).sum(1)
    temp = float((xtr[::97] @ W.T + b).std(1).mean()) / 2
    W, b = W / temp, b / temp
    return FeatureSet({"train": xtr, "val": xv, "test": xt}, {"train": ytr, "val": yv, "test": yt},
                      W, b, [str(c) for c in range(C)], {"key": f"synthetic-{scale}-{profile}-{seed}"})


def old_class_factors(features, labels, classes, means=None, how="auto"):
    """The pre-change path, for comparison: all C covariances [C, d, d] (class_statistics), then
    psd_factor's float64 eigh of the head ones ([H, d, d] factors)."""
    C = int(labels.max()) + 1
    m, covs, _ = cal.class_statistics(features, labels, C)
    classes = torch.as_tensor(classes, device=labels.device)
    return m[classes], cal.psd_factor(covs[classes])


def estimate_gib(scale, profile, d, itemsize, path, epoch="fit") -> float:
    """Rough peak: resident features and their stage-2 copies, plus the path's covariances/factors."""
    C, *_, val_pc, test_pc = SCALES[scale]
    counts = torch.tensor(class_counts(scale, profile))
    N = int(counts.sum())
    head = cal.head_classes(counts, 0.6)
    row = d * itemsize
    feats = (N + C * (val_pc + test_pc)) * row
    # sorted copy, bank means + tail features, one epoch's draw and its clone, frozen logits and targets
    work = 4.5 * N * row + (2 * N * C * 4 if epoch == "fit" else 0)
    if path == "new":
        extra = int(counts[head].clamp(max=d).sum()) * row
    else:
        extra = C * d * d * itemsize + len(head) * d * d * (2 * itemsize + 32)
    return (feats + work + extra) / GIB


def rss_now_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    with open("/proc/self/status") as f:  # VmHWM honours a reset via clear_refs; ru_maxrss does not
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset_peak(device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batched_epoch(fs: FeatureSet, p: dict):
    """One stage-2 epoch as fit_stage2 runs it (build_sampler, one draw of N, HeadSGD steps on the frozen
    logits), with the logits and targets made per batch instead of as [N, C] tensors (at iNat scale
    those two are 2 N C 4 bytes = 28 GiB), and the test split evaluated in batches."""
    x = fs.x["train"]
    gen = torch.Generator(device=x.device).manual_seed(int(p.get("seed", 0)))
    sampler, info = stage2.build_sampler(fs, p, lambda *a: None)
    head = stage2.Head(p["classifier"], fs.weight, fs.bias).to(x.device)
    opt = stage2.HeadSGD(head, p["momentum"], p["weight_decay"])
    n, bs, C = len(fs.y["train"]), p["batch_size"], fs.num_classes
    xe, ye = sampler.draw(n, gen)
    tot = torch.zeros((), device=x.device)
    for i in range(0, n, bs):
        xb = xe[i:i + bs]
        with torch.no_grad():
            base = None if head.kind == "crt" else xb @ head.weight.T + head.bias
        tb = stage2.soft_targets(ye[i:i + bs], C, None)
        tot += opt.step(xb, base, tb, p["lr"]) * len(tb)
    del xe, ye
    top1 = float((stage2.predict_head(head, fs.x["test"]) == fs.y["test"]).float().mean() * 100)
    return [{"loss": float(tot) / n, "val_top1": float("nan")}], {"test": {"top1": top1}}


def worker(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t = time.perf_counter()
    fs = make_features(args.scale, args.profile, args.dim, dtype, device)
    gen_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    base = rss_now_gib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / GIB
    was_reset = reset_peak(device)
    import yaml
    p = yaml.safe_load((ROOT / "experiments" / "cifar100_lt.yaml").read_text())["stage2"]
    p.update(method="ladc", classifier="lws_plus", epochs=1)
    timings = {}
    if args.path == "old":
        cal.class_factors = old_class_factors
        cal.GaussianBank.block = 1 << 62  # and the old one-block sampler (e, F e for every draw at once)
    orig_build = stage2.build_sampler

    def timed_build(fs_, p_, log=print):
        t0 = time.perf_counter()
        sampler, info = orig_build(fs_, p_, log)
        timings["build_s"] = time.perf_counter() - t0
        draw = sampler.draw

        def timed_draw(n, generator=None):
            t1 = time.perf_counter()
            out = draw(n, generator)
            timings["draw_s"] = time.perf_counter() - t1
            return out
        sampler.draw = timed_draw
        timings["heads"] = info["num_head_classes"]
        return sampler, info

    stage2.build_sampler = timed_build
    t = time.perf_counter()
    if args.epoch == "fit":
        _, hist, rep, info = stage2.fit_stage2(fs, p, log=lambda *a: None)
    else:
        hist, rep = batched_epoch(fs, p)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t
    counts = fs.counts
    return {"scale": args.scale, "path": args.path, "N": int(counts.sum()), "C": len(counts), "d": args.dim,
            "heads": timings["heads"], "gen_s": gen_s, "build_s": timings["build_s"], "draw_s": timings["draw_s"],
            "epoch_total_s": total, "base_gib": base, "peak_gib": peak_gib(device), "peak_reset": was_reset,
            "loss": hist[0]["loss"], "val_top1": hist[0]["val_top1"], "test_top1": rep["test"]["top1"],
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["imagenet_lt", "inat2018", "both"], default="imagenet_lt")
    ap.add_argument("--profile", choices=["exponential", "table1"], default="exponential")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--cap-gib", type=float, default=12.0, help="skip a path whose estimated peak exceeds this")
    ap.add_argument("--paths", default="new,old")
    ap.add_argument("--epoch", choices=["fit", "batched"], default="fit",
                    help="fit: ladc.stage2.fit_stage2 with epochs=1 (holds [N, C] logits and targets); "
                         "batched: build_sampler + one draw + the HeadSGD updates, logits per batch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="new", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    scales = list(SCALES) if args.scale == "both" else [args.scale]
    itemsize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    print(f"stage 2 at scale: profile {args.profile}, d={args.dim}, {args.dtype} on {args.device}, "
          f"epoch {args.epoch}, cap {args.cap_gib} GiB, {torch.get_num_threads()} threads")
    for scale in scales:
        counts = class_counts(scale, args.profile)
        head = cal.head_classes(counts, 0.6)
        hc = torch.tensor(counts)[head]
        print(f"\n{scale}: {len(counts)} classes, {sum(counts):,} train instances ({counts[0]} -> {counts[-1]}), "
              f"{len(head)} head classes (n {int(hc.min())}..{int(hc.max())}); head factors "
              f"{int(hc.clamp(max=args.dim).sum()):,} columns vs {len(head) * args.dim:,} full-rank")
        for path in args.paths.split(","):
            est = estimate_gib(scale, args.profile, args.dim, itemsize, path, args.epoch)
            if est > args.cap_gib:
                covs = len(counts) * args.dim ** 2 * itemsize / GIB
                print(f"  {path:3s}: SKIPPED, estimated peak {est:.1f} GiB > cap {args.cap_gib} GiB"
                      + (f" (the [C, d, d] covariances alone are {covs:.1f} GiB)" if path == "old" else ""))
                continue
            cmd = [sys.executable, __file__, "--worker", "--path", path, "--scale", scale, "--profile", args.profile,
                   "--device", args.device, "--dtype", args.dtype, "--dim", str(args.dim), "--epoch", args.epoch]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  {path:3s}: FAILED (exit {proc.returncode}; estimated {est:.1f} GiB)\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(lines[-1][7:])
            kind = "peak RSS" if args.device == "cpu" else "CUDA max allocated"
            print(f"  {path:3s}: {kind} {r['peak_gib']:.2f} GiB (features resident {r['base_gib']:.2f} GiB, "
                  f"estimate {est:.1f}); build_sampler {r['build_s']:.1f} s, epoch draw {r['draw_s']:.1f} s, "
                  f"one epoch incl. build + head updates + eval {r['epoch_total_s']:.1f} s "
                  f"(features made in {r['gen_s']:.1f} s); loss {r['loss']:.3f}, test top-1 {r['test_top1']:.1f}"
                  + ("" if r["peak_reset"] else " [peak includes feature generation]"))


if __name__ == "__main__":
    main()
