"""The calibration core of LADC: pure tensor functions (CPU or GPU, float32 or float64).

Equation numbers refer to the paper (Label-Aware Distribution Calibration, AAAI 2022).
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("paper", "inverse")
SAMPLINGS = ("paper", "instance")
_EPS = 1e-12


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class mean (eq. 2) and unbiased covariance (eq. 3). Returns (means [C,d], covs [C,d,d],
    counts [C]). A class with fewer than two instances gets a zero covariance."""
    N, d = features.shape
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, d, dtype=features.dtype, device=features.device)
    means.index_add_(0, labels, features)
    means = means / counts.clamp(min=1).unsqueeze(1).to(features.dtype)
    centered = features - means[labels]
    order = torch.argsort(labels, stable=True)
    covs = torch.zeros(num_classes, d, d, dtype=features.dtype, device=features.device)
    for c, chunk in enumerate(centered[order].split(counts.tolist())):  # one matmul per class
        if len(chunk) > 1:
            covs[c] = chunk.T @ chunk / (len(chunk) - 1)
    return means, covs, counts


def head_classes(counts, head_fraction: float = 0.6) -> torch.Tensor:
    """The most frequent classes that together hold at least `head_fraction` of the training
    instances (Implementation Details), as sorted class indices. The rest are tail classes. Classes tied
    with the last head class in count are head too, so a balanced set (IF = 1) has no tail class."""
    counts = torch.as_tensor(counts)
    order = torch.argsort(-counts, stable=True)
    cum = torch.cumsum(counts[order], 0).double()
    k = min(int(torch.searchsorted(cum, head_fraction * float(counts.sum()) - 1e-9)) + 1, len(counts))
    return torch.nonzero(counts >= counts[order[k - 1]]).flatten()


def sq_distances(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, H] of features to class means (eq. 4), without an [N, H, d] tensor."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ means.T + means.pow(2).sum(1)).clamp(min=0)


def neighbour_weights(features: torch.Tensor, head_means: torch.Tensor, head_counts: torch.Tensor, m: int,
                      weighting: str = "paper"):
    """The m nearest head classes of each feature by Euclidean distance (eqs. 4-5) and their weights
    (eq. 6). `paper`: w_i ∝ n_i ||mu_i - x||^2 as printed; `inverse`: w_i ∝ n_i / ||mu_i - x||^2.
    Returns (idx [N,m] into the head classes, w [N,m] summing to 1)."""
    dsel, idx = sq_distances(features, head_means).topk(m, dim=1, largest=False)
    n = head_counts.to(features.dtype)[idx]
    raw = n * dsel if weighting == "paper" else n / dsel.clamp(min=_EPS)
    total = raw.sum(1, keepdim=True)
    w = torch.where(total > 0, raw / total.clamp(min=_EPS), torch.full_like(raw, 1.0 / m))
    return idx, w


def calibrate(features: torch.Tensor, head_means: torch.Tensor, head_covs: torch.Tensor, head_counts: torch.Tensor,
              m: int, alpha: float, beta: float, weighting: str = "paper", n_s: int = 1):
    """Calibrated Gaussian of each tail instance (eqs. 4-12), mu_hat = the instance's feature.
    mu_0 = sum w_i mu_i, Sigma_0 = sum w_i^2 Sigma_i + alpha I (eq. 7);
    mu' = beta/(n_s+beta) mu_0 + n_s/(n_s+beta) mu_hat (eq. 11); Sigma' = beta/(n_s+beta) Sigma_0 (eq. 12).
    Returns (means [N,d], covs [N,d,d]); the sampler never builds the covariances."""
    idx, w = neighbour_weights(features, head_means, head_counts, m, weighting)
    d = features.shape[1]
    eye = torch.eye(d, dtype=features.dtype, device=features.device)
    sigma0 = torch.einsum("nk,nkij->nij", w * w, head_covs[idx]) + alpha * eye
    return posterior_mean(features, head_means, idx, w, beta, n_s), beta / (n_s + beta) * sigma0


def posterior_mean(mu_hat, head_means, idx, w, beta: float, n_s: int = 1) -> torch.Tensor:
    """mu' = beta/(n_s+beta) mu_0 + n_s/(n_s+beta) mu_hat with mu_0 = sum_i w_i mu_i (eqs. 7, 11)."""
    mu0 = torch.einsum("nk,nkd->nd", w, head_means[idx])
    return beta / (n_s + beta) * mu0 + n_s / (n_s + beta) * mu_hat


def class_probabilities(counts, tau: float, reading: str = "paper") -> torch.Tensor:
    """Class sampling probabilities of eq. (13). `paper`: P_i ∝ n_1 / n_i^tau as printed;
    `instance`: eq. (13) as a per-instance weight, so class i is drawn ∝ n_i * n_1 / n_i^tau = n_1 n_i^(1-tau)
    (tau = 1: class-balanced, tau = 0: instance-balanced)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    n1 = n.max()
    p = n1 / n.pow(tau)
    if reading == "instance":
        p = p * n
    p = torch.where(n > 0, p, torch.zeros_like(p))
    return p / p.sum()


def psd_factor(covs: torch.Tensor) -> torch.Tensor:
    """F with F F^T = Sigma for each (possibly singular) covariance [.., d, d], via a clamped
    eigendecomposition in float64 (Cholesky fails on the rank-deficient covariances that dead ReLU
    dimensions or fewer instances than dimensions give)."""
    c64 = covs.double()
    c64 = 0.5 * (c64 + c64.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(c64)
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)).to(covs.dtype)


class GaussianBank:
    """One Gaussian per row t, N(mean_t, s^2 (sum_k c_tk^2 Sigma_{h_tk} + iso^2 I + const^2 11^T)),
    sampled exactly as z = mean_t + s (sum_k c_tk F_{h_tk} e_k + iso e_0 + const e_1 1) with independent
    standard normals, F F^T = Sigma. Nothing per-row of size d x d is ever built."""

    def __init__(self, means, comp_idx, comp_coef, factors, scale: float, iso: float = 0.0, const: float = 0.0):
        self.means, self.comp_idx, self.comp_coef, self.factors = means, comp_idx, comp_coef, factors
        self.scale, self.iso, self.const = float(scale), float(iso), float(const)

    def __len__(self):
        return len(self.means)

    def sample(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        R, (K, d) = len(rows), (self.comp_idx.shape[1], self.means.shape[1])
        dev, dt = self.means.device, self.means.dtype
        hid = self.comp_idx[rows].reshape(-1)
        e = torch.randn(R * K, d, device=dev, dtype=dt, generator=generator)
        out = torch.empty_like(e)
        for h in torch.unique(hid).tolist():  # one matmul per head class, not per sample
            sel = hid == h
            out[sel] = e[sel] @ self.factors[h].T
        noise = (out * self.comp_coef[rows].reshape(-1, 1)).view(R, K, d).sum(1)
        if self.iso:
            noise += self.iso * torch.randn(R, d, device=dev, dtype=dt, generator=generator)
        if self.const:
            noise += self.const * torch.randn(R, 1, device=dev, dtype=dt, generator=generator)
        return self.means[rows] + self.scale * noise


def ladc_bank(mu_hat, head_means, head_factors, head_counts, m, alpha, beta, weighting="paper", n_s=1):
    """GaussianBank of eqs. (4)-(12) for each row of mu_hat (a tail instance's feature for LADC,
    its class mean for LADC-average): coefficients w_i on F_i give sum w_i^2 Sigma_i, iso sqrt(alpha)."""
    idx, w = neighbour_weights(mu_hat, head_means, head_counts, m, weighting)
    means = posterior_mean(mu_hat, head_means, idx, w, beta, n_s)
    return GaussianBank(means, idx, w, head_factors, scale=math.sqrt(beta / (n_s + beta)), iso=math.sqrt(alpha))


def dc_bank(x, head_means, head_factors, k, alpha):
    """Few-shot DC (Yang et al. 2021) per instance: the k nearest head classes by distance, mean =
    mean of their means and x, covariance = mean of their covariances + alpha on every entry."""
    idx = sq_distances(x, head_means).topk(k, dim=1, largest=False).indices
    means = (head_means[idx].sum(1) + x) / (k + 1)
    coef = torch.full(idx.shape, 1.0 / math.sqrt(k), dtype=x.dtype, device=x.device)
    return GaussianBank(means, idx, coef, head_factors, scale=1.0, const=math.sqrt(alpha))
