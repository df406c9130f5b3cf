#!/usr/bin/env python
"""Stage-2 speed, same machine and run:
1. the calibrated sampler (GaussianBank) against a naive sampler that builds
   torch.distributions.MultivariateNormal per tail instance (target >= 50x at d = 64);
2. wall time of one default 30-epoch LADC + LWS-Plus fit on CIFAR-10-LT-sized features
   (12,406 x 64; target <= 3 s on the 2-core CPU).

  python benchmarks/stage2_speed.py [--draws 4000] [--features cache/features/KEY.pt]
"""

import argparse
import time

import torch
import yaml

from ladc import calibration as cal
from ladc.config import config_path
from ladc.data import longtail_counts
from ladc.features import gaussian_features, load_cached
from ladc.stage2 import fit_stage2


def synthetic_features(d=64, seed=0):
    """CIFAR-10-LT IF=100-sized features (12,406 x 64) with a head-biased stage-1 classifier."""
    return gaussian_features(longtail_counts(5000, 10, 100), d=d, seed=seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=4000, help="tail draws timed for the sampler comparison")
    ap.add_argument("--features", help="a cached feature file (cache/features/KEY.pt) instead of synthetic ones")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.features:
        from pathlib import Path
        fs = load_cached(Path(args.features), Path(args.features).stem)
        assert fs is not None, f"cannot read {args.features}"
    else:
        fs = synthetic_features()
    p = yaml.safe_load(config_path("cifar10_lt").read_text())["stage2"]
    x, y = fs.x["train"], fs.y["train"]
    C = fs.num_classes
    print(f"features {tuple(x.shape)}, threads {torch.get_num_threads()}")

    # 1. sampler against MultivariateNormal per instance
    means, covs, counts = cal.class_statistics(x, y, C)
    head = cal.head_classes(counts, p["head_fraction"])
    is_head = torch.zeros(C, dtype=torch.bool)
    is_head[head] = True
    xt = x[~is_head[y]]
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(xt), (args.draws,), generator=g)
    t = time.perf_counter()
    bank = cal.ladc_bank(xt, means[head], cal.psd_factor(covs[head]), counts[head], p["m"], p["alpha"], p["beta"])
    z = bank.sample(rows, generator=g)
    fast = time.perf_counter() - t
    mu, sig = cal.calibrate(xt[rows], means[head], covs[head], counts[head], p["m"], p["alpha"], p["beta"])
    t = time.perf_counter()
    naive = torch.stack([torch.distributions.MultivariateNormal(mu[j], sig[j]).sample() for j in range(len(rows))])
    slow = time.perf_counter() - t
    assert naive.shape == z.shape
    print(f"sampler, {args.draws} tail draws at d={x.shape[1]}: GaussianBank {fast * 1e3:.1f} ms (incl. set-up), "
          f"MultivariateNormal per instance {slow * 1e3:.1f} ms -> {slow / fast:.1f}x faster")

    # 2. a default 30-epoch LADC + LWS-Plus fit
    q = dict(p, method="ladc", classifier="lws_plus")
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        _, hist, rep, info = fit_stage2(fs, dict(q, seed=r), log=lambda *a: None)
        times.append(time.perf_counter() - t)
    print(f"30-epoch LADC + LWS-Plus fit on {tuple(x.shape)}: best {min(times):.2f} s, "
          f"median {sorted(times)[len(times) // 2]:.2f} s over {args.repeats} (test top-1 {rep['test']['top1']:.1f})")


if __name__ == "__main__":
    main()
