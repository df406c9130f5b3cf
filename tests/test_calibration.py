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
