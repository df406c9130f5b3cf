"""The calibration core against plain one-instance-at-a-time float64 computations of eqs. (2)-(13)."""


import numpy as np
import pytest
import torch

from ladc import calibration as cal
from ladc.data import longtail_counts


def rand_problem(seed=0, C=6, d=5, n=(40, 30, 20, 8, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n)])
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64) + 2 * torch.randn(C, d, generator=g,
                                                                                    dtype=torch.float64)[y]
    return x, y


def test_class_statistics_match_numpy():
    x, y = rand_problem()
    means, covs, counts = cal.class_statistics(x, y, 6)
    for c in range(6):
        xc = x[y == c].numpy()
        assert np.allclose(means[c].numpy(), xc.mean(0))
        assert np.allclose(covs[c].numpy(), np.cov(xc, rowvar=False, ddof=1))
    assert counts.tolist() == [40, 30, 20, 8, 5, 3]


def test_head_classes_rule():
    assert cal.head_classes(longtail_counts(5000, 10, 100)).tolist() == [0, 1]
    counts = longtail_counts(500, 100, 100)
    head = cal.head_classes(counts).tolist()
    s = sorted((counts[i] for i in head), reverse=True)
    total = sum(counts)
    assert sum(s) >= 0.6 * total > sum(s[:-1])
    assert cal.head_classes([5, 50, 10], 0.6).tolist() == [1]  # unsorted counts: the most frequent first
    assert cal.head_classes([10, 10, 10], 0.6).tolist() == [0, 1, 2]  # ties: a balanced set has no tail
    assert cal.head_classes([10, 10, 5, 5], 0.5).tolist() == [0, 1]


def plain_calibrate(x, means, covs, counts, m, alpha, beta, weighting):
    """Eqs. (4)-(12) for one instance, written out with loops."""
    d = len(x)
    dist = [float(((means[i] - x) ** 2).sum()) for i in range(len(means))]
    S = sorted(range(len(means)), key=lambda i: dist[i])[:m]
    if weighting == "paper":
        raw = [counts[i] * dist[i] for i in S]
    else:
        raw = [counts[i] / dist[i] for i in S]
    w = [r / sum(raw) for r in raw]
    mu0 = sum(w[k] * means[i] for k, i in enumerate(S))
    sig0 = sum(w[k] ** 2 * covs[i] for k, i in enumerate(S)) + alpha * torch.eye(d, dtype=torch.float64)
    mu = beta / (1 + beta) * mu0 + 1 / (1 + beta) * x
    return mu, beta / (1 + beta) * sig0


@pytest.mark.parametrize("weighting", ["paper", "inverse"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_calibrate_matches_plain_loop(weighting, m):
    x, y = rand_problem(seed=m)
    means, covs, counts = cal.class_statistics(x, y, 6)
    head = torch.tensor([0, 1, 2])
    tail_x = x[y >= 3]
    mu, sig = cal.calibrate(tail_x, means[head], covs[head], counts[head], m, alpha=0.15, beta=0.7,
                            weighting=weighting)
    for j in range(len(tail_x)):
        pm, ps = plain_calibrate(tail_x[j], means[head], covs[head], counts[head].tolist(), m, 0.15, 0.7, weighting)
        assert torch.allclose(mu[j], pm, atol=1e-10) and torch.allclose(sig[j], ps, atol=1e-10)


def test_calibrate_float32_on_the_same_inputs():
    x, y = rand_problem(seed=3)
    means, covs, counts = cal.class_statistics(x, y, 6)
    head = torch.tensor([0, 1, 2])
    mu64, sig64 = cal.calibrate(x[y >= 3], means[head], covs[head], counts[head], 2, 0.1, 0.6)
    mu32, sig32 = cal.calibrate(x[y >= 3].float(), means[head].float(), covs[head].float(), counts[head], 2, 0.1, 0.6)
    assert mu32.dtype == torch.float32 and torch.allclose(mu32.double(), mu64, atol=1e-4)
    assert torch.allclose(sig32.double(), sig64, atol=1e-4)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.2, 2.0])
def test_class_probabilities_eq13(tau):
    counts = [500, 120, 40, 9, 2]
    n1 = max(counts)
    plain = [n1 / n ** tau for n in counts]
    got = cal.class_probabilities(counts, tau, "paper")
    assert np.allclose(got.numpy(), np.array(plain) / sum(plain))
    inst = [n * n1 / n ** tau for n in counts]
    got = cal.class_probabilities(counts, tau, "instance")
    assert np.allclose(got.numpy(), np.array(inst) / sum(inst))
    if tau == 1.0:
        assert np.allclose(got.numpy(), 0.2)


def test_psd_factor_of_singular_covariance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, generator=g, dtype=torch.float64)
    cov = a.T @ a  # rank 3 in 8 dimensions: Cholesky fails
    with pytest.raises(Exception):
        torch.linalg.cholesky(cov)
    f = cal.psd_factor(cov)
    assert torch.allclose(f @ f.T, cov, atol=1e-10)


def empirical(samples):
    mean = samples.mean(0)
    c = samples - mean
    return mean, c.T @ c / (len(samples) - 1)


def test_ladc_sampler_matches_calibrated_gaussian():
    x, y = rand_problem(seed=5, d=4)
    means, covs, counts = cal.class_statistics(x, y, 6)
    head = torch.tensor([0, 1, 2])
    tail_x = x[y >= 3]
    mu, sig = cal.calibrate(tail_x, means[head], covs[head], counts[head], 2, 0.2, 0.8)
    bank = cal.ladc_bank(tail_x, means[head], cal.psd_factor(covs[head]), counts[head], 2, 0.2, 0.8)
    j = 4
    n = 200_000
    z = bank.sample(torch.full((n,), j), generator=torch.Generator().manual_seed(1))
    em, ec = empirical(z)
    se = torch.sqrt(torch.diagonal(sig[j]) / n)
    assert torch.all((em - mu[j]).abs() < 5 * se)
    assert torch.allclose(ec, sig[j], atol=0.03 * float(sig[j].abs().max()))


def test_dc_sampler_covariance():
    x, y = rand_problem(seed=6, d=3)
    means, covs, _ = cal.class_statistics(x, y, 6)
    head = torch.tensor([0, 1, 2])
    q = x[y == 5][:1]
    bank = cal.dc_bank(q, means[head], cal.psd_factor(covs[head]), 2, 0.21)
    d2 = ((means[head] - q) ** 2).sum(1)
    near = d2.argsort()[:2]
    want_mu = (means[head][near].sum(0) + q[0]) / 3
    want_cov = covs[head][near].mean(0) + 0.21
    z = bank.sample(torch.zeros(200_000, dtype=torch.long), generator=torch.Generator().manual_seed(2))
    em, ec = empirical(z)
    assert torch.allclose(bank.means[0], want_mu)
    assert torch.allclose(ec, want_cov, atol=0.03 * float(want_cov.abs().max()))


def test_epoch_sampler_class_frequencies_follow_eq13():
    from ladc.stage2 import EpochSampler

    counts = torch.tensor([300, 100, 30, 10])
    y = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(len(y), 3)
    probs = cal.class_probabilities(counts, 1.2, "paper")
    s = EpochSampler(x, y, counts, probs)
    n = 100_000
    _, ys = s.draw(n, torch.Generator().manual_seed(0))
    freq = torch.bincount(ys, minlength=4).double() / n
    se = torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() < 5 * se + 1e-9)


# --- d = 2048 scale: low-rank head factors and mixed-width banks ---------------------------------------------


def test_class_factors_reproduce_eq3_covariance_one_class_at_a_time():
    d = 10
    x, y = rand_problem(seed=7, C=5, d=d, n=(4, 30, 11, 10, 1))  # n < d, n > d, n = d + 1, n = d, n = 1
    classes = [0, 1, 2, 3, 4]
    means, factors = cal.class_factors(x, y, classes)
    for c, f in zip(classes, factors):
        xc = x[y == c]
        n = len(xc)
        assert torch.allclose(means[c], xc.mean(0), atol=1e-12)
        want_width = 0 if n < 2 else (n if n <= d else d)  # low rank iff n_c - 1 < d
        assert f.shape == (d, want_width)
        want = torch.cov(xc.T, correction=1) if n > 1 else torch.zeros(d, d, dtype=x.dtype)
        assert torch.allclose(f @ f.T, want, atol=1e-10), c
    assert torch.linalg.matrix_rank(factors[0] @ factors[0].T) == 3  # rank n_c - 1
    _, forced = cal.class_factors(x, y, [1], how="lowrank")  # n > d still exact, width n
    assert forced[0].shape == (d, 30) and torch.allclose(forced[0] @ forced[0].T, torch.cov(x[y == 1].T))
    _, sub = cal.class_factors(x, y, torch.tensor([2]))  # only the requested classes
    assert len(sub) == 1 and torch.allclose(sub[0] @ sub[0].T, torch.cov(x[y == 2].T), atol=1e-10)


def bank_covariance_one_row(bank, t):
    """s^2 (sum_k c_k^2 F_k F_k^T + iso^2 I + const^2 11^T) of row t, written out."""
    d = bank.means.shape[1]
    cov = bank.iso ** 2 * torch.eye(d, dtype=torch.float64) + bank.const ** 2 * torch.ones(d, d, dtype=torch.float64)
    for k in range(bank.comp_idx.shape[1]):
        f = bank.factors[int(bank.comp_idx[t, k])]
        cov = cov + float(bank.comp_coef[t, k]) ** 2 * (f @ f.T)
    return bank.scale ** 2 * cov


@pytest.mark.parametrize("layout", ["list", "padded"])
def test_mixed_width_bank_is_exact(layout):
    g = torch.Generator().manual_seed(11)
    d = 5
    widths = [2, 7, 0, 4]  # rank-2, over-complete, zero and rank-4 covariances
    factors = [torch.randn(d, r, generator=g, dtype=torch.float64) for r in widths]
    sigmas = [f @ f.T for f in factors]
    if layout == "padded":  # [H, d, r_max] with zero columns
        pad = torch.zeros(len(widths), d, max(widths), dtype=torch.float64)
        for h, f in enumerate(factors):
            pad[h, :, :f.shape[1]] = f
        factors = pad
    means = torch.randn(3, d, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 1], [3, 2], [1, 3]])
    coef = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.9]], dtype=torch.float64)
    bank = cal.GaussianBank(means, idx, coef, factors, scale=0.8, iso=0.3, const=0.2)
    full = cal.GaussianBank(means, idx, coef, cal.psd_factor(torch.stack(sigmas)), scale=0.8, iso=0.3, const=0.2)
    n = 200_000
    rows = torch.arange(3).repeat_interleave(n)  # every row in one call: the per-head-class grouping is exercised
    z = bank.sample(rows, generator=torch.Generator().manual_seed(3)).view(3, n, d)
    for t in range(3):
        want = bank_covariance_one_row(bank, t)
        # the same Gaussian as the full-rank (d x d eigh) bank of the same covariances, eqs. (7), (12)
        assert torch.allclose(want, bank_covariance_one_row(full, t), atol=1e-10)
        want_by_formula = 0.64 * (sum(float(coef[t, k]) ** 2 * sigmas[int(idx[t, k])] for k in range(2))
                                  + 0.09 * torch.eye(d, dtype=torch.float64) + 0.04)
        assert torch.allclose(want, want_by_formula, atol=1e-10)
        em, ec = empirical(z[t])
        # 5 standard errors: Var(mean_i) = S_ii / n; Var(cov_ij) = (S_ii S_jj + S_ij^2) / n for Gaussian data
        sd = torch.diagonal(want)
        assert torch.all((em - means[t]).abs() < 5 * torch.sqrt(sd / n))
        assert torch.all((ec - want).abs() < 5 * torch.sqrt((sd[:, None] * sd[None, :] + want ** 2) / n))


def test_bank_blocks_and_legacy_stream():
    """An [H, d, d] bank whose draw fits in one block consumes the generator exactly as the pre-block
    sampler did (e [R*m, d] first, then the iso normals), so seeded runs reproduce."""
    x, y = rand_problem(seed=5, d=4)
    means, covs, counts = cal.class_statistics(x, y, 6)
    head = torch.tensor([0, 1, 2])
    f = cal.psd_factor(covs[head])
    bank = cal.ladc_bank(x[y >= 3], means[head], f, counts[head], 2, 0.2, 0.8)
    rows = torch.tensor([0, 3, 3, 1, 5, 2, 0])
    z = bank.sample(rows, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the pre-block algorithm, written out
    e = torch.randn(len(rows) * 2, 4, generator=g, dtype=torch.float64)
    hid = bank.comp_idx[rows].reshape(-1)
    out = torch.stack([f[h] @ e[j] for j, h in enumerate(hid.tolist())])
    noise = (out * bank.comp_coef[rows].reshape(-1, 1)).view(len(rows), 2, 4).sum(1)
    noise += bank.iso * torch.randn(len(rows), 4, generator=g, dtype=torch.float64)
    assert torch.allclose(z, bank.means[rows] + bank.scale * noise, atol=1e-12)


def test_bank_small_blocks_same_distribution(monkeypatch):
    x, y = rand_problem(seed=8, d=3)
    means, factors = cal.class_factors(x, y, [0, 1, 2])
    _, counts = cal.class_means(x, y, 6)
    bank = cal.ladc_bank(x[y >= 3], means, factors, counts[:3], 2, 0.2, 0.8)
    monkeypatch.setattr(cal.GaussianBank, "block", 97 * 2 * 3)  # 97 rows per block
    n = 50_000
    z = bank.sample(torch.full((n,), 2), generator=torch.Generator().manual_seed(0))
    want = bank_covariance_one_row(bank, 2)
    em, ec = empirical(z)
    sd = torch.diagonal(want)
    assert torch.all((em - bank.means[2]).abs() < 5 * torch.sqrt(sd / n))
    assert torch.all((ec - want).abs() < 5 * torch.sqrt((sd[:, None] * sd[None, :] + want ** 2) / n))


@pytest.mark.parametrize("method", ["ladc", "ladc_avg", "dc"])
def test_build_sampler_low_rank_matches_full_covariance_path(method, monkeypatch):
    """d = 256 with head classes of n < d: the sampler of build_sampler equals the one the class_statistics +
    psd_factor path built (same means, neighbours, weights and per-row covariance), and builds no d x d."""
    import yaml

    from conftest import ROOT
    from ladc.features import gaussian_features
    from ladc.stage2 import build_sampler

    d, C = 256, 6
    counts = longtail_counts(200, C, 20)  # [200, 109, 60, 32, 18, 10]: heads 200 and 109 < d
    fs = gaussian_features(counts, d=d, val_per_class=2, test_per_class=2, seed=1, fit_steps=1)
    fs.x["train"] = fs.x["train"].double()
    p = yaml.safe_load((ROOT / "experiments" / "cifar10_lt.yaml").read_text())["stage2"]
    p.update(method=method, m=2)

    def forbidden(*a, **k):
        raise AssertionError("a d x d covariance path was used")

    with monkeypatch.context() as mp:
        mp.setattr(cal, "class_statistics", forbidden)
        mp.setattr(cal, "psd_factor", forbidden)
        sampler, info = build_sampler(fs, p, log=lambda *a: None)
    bank = sampler.bank
    head = torch.tensor(info["head_classes"])
    assert head.tolist() == [0, 1] and all(f.shape == (d, counts[h]) for h, f in zip(head.tolist(), bank.factors))

    # the previous path, as build_sampler wrote it before
    x, y = fs.x["train"], fs.y["train"]
    order = torch.argsort(y, stable=True)
    xs, ys = x[order], y[order]
    tail = ~torch.isin(ys, head)
    if method == "dc":
        xp = xs.clamp(min=0).pow(p["dc_tukey"])
        means, covs, _ = cal.class_statistics(xp, ys, C)
        old = cal.dc_bank(xp[tail], means[head], cal.psd_factor(covs[head]), 2, p["dc_alpha"])
    else:
        means, covs, cnt = cal.class_statistics(xs, ys, C)
        mu_hat = means[ys[tail]] if method == "ladc_avg" else xs[tail]
        old = cal.ladc_bank(mu_hat, means[head], cal.psd_factor(covs[head]), cnt[head], 2, p["alpha"], p["beta"],
                            p["weighting"])
    assert torch.equal(bank.comp_idx, old.comp_idx)
    assert torch.allclose(bank.comp_coef, old.comp_coef, atol=1e-12)
    assert torch.allclose(bank.means, old.means, atol=1e-10)
    assert (bank.scale, bank.iso, bank.const) == (old.scale, old.iso, old.const)
    for h in range(len(head)):
        f_new, f_old = bank.factors[h], old.factors[h]
        tol = 1e-9 * float(covs[head[h]].abs().max())
        assert torch.allclose(f_new @ f_new.T, f_old @ f_old.T, atol=tol)
        assert torch.allclose(f_new @ f_new.T, covs[head[h]], atol=tol)
    for t in (0, len(bank) // 2, len(bank) - 1):
        assert torch.allclose(bank_covariance_one_row(bank, t), bank_covariance_one_row(old, t), atol=1e-9)
    xe, ye = sampler.draw(500, torch.Generator().manual_seed(0))
    assert xe.shape == (500, d) and torch.isfinite(xe).all()
