"""The calibration core of LADC: pure tensor functions (CPU or GPU, float32 or float64).

Equation numbers refer to the paper (Label-Aware Distribution Calibration, AAAI 2022).
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("paper", "inverse")
SAMPLINGS = ("paper", "instance")
_EPS = 1e-12


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class mean (eq. 2) and counts: (means [C,d], counts [C]). No covariance is built."""
    N, d = features.shape
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, d, dtype=features.dtype, device=features.device)
    means.index_add_(0, labels, features)
    return means / counts.clamp(min=1).unsqueeze(1).to(features.dtype), counts


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class mean (eq. 2) and unbiased covariance (eq. 3). Returns (means [C,d], covs [C,d,d],
    counts [C]). A class with fewer than two instances gets a zero covariance. Builds C d x d
    matrices: at d = 2048 use class_means + class_factors instead."""
    N, d = features.shape
    means, counts = class_means(features, labels, num_classes)
    centered = features - means[labels]
    order = torch.argsort(labels, stable=True)
    covs = torch.zeros(num_classes, d, d, dtype=features.dtype, device=features.device)
    for c, chunk in enumerate(centered[order].split(counts.tolist())):  # one matmul per class
        if len(chunk) > 1:
            covs[c] = chunk.T @ chunk / (len(chunk) - 1)
    return means, covs, counts


def class_factors(features: torch.Tensor, labels: torch.Tensor, classes, means: torch.Tensor | None = None,
                  how: str = "auto"):
    """Means (eq. 2) and covariance factors F_c with F_c F_c^T = Sigma_c, the unbiased covariance of
    eq. (3), of the requested classes only, one class at a time (no [C, d, d] tensor).

    `lowrank` (auto when n_c <= d, i.e. rank Sigma_c <= n_c - 1 < d): F_c = X_c^T / sqrt(n_c - 1) from
    the centred features X_c [n_c, d], width r_c = n_c (stored as a transposed view of X_c);
    `eigh` (auto when n_c > d): the clamped-eigh factor (psd_factor) of that class's d x d covariance,
    width d. A class with fewer than two instances gets a zero covariance: width 0.
    `means` [C, d] (e.g. from class_means) is used when given, so the factors are centred on them.
    Returns (means [len(classes), d], factors: list of [d, r_c] tensors)."""
    if how not in ("auto", "lowrank", "eigh"):
        raise ValueError(f"how must be one of auto, lowrank, eigh, not {how!r}")
    classes = torch.as_tensor(classes, device=labels.device).long()
    N, d = features.shape
    C = int(max(int(labels.max()) + 1 if N else 0, int(classes.max()) + 1 if len(classes) else 0))
    if means is None:
        means, _ = class_means(features, labels, C)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=C)
    offsets = (torch.cumsum(counts, 0) - counts).tolist()
    counts = counts.tolist()
    factors = []
    for c in classes.tolist():  # one head class at a time: peak memory is the factors themselves
        n = counts[c]
        if n < 2:
            factors.append(features.new_zeros(d, 0))
            continue
        xc = features[order[offsets[c]:offsets[c] + n]].sub_(means[c])  # a copy: centred in place
        if how == "lowrank" or (how == "auto" and n <= d):
            factors.append(xc.div_(math.sqrt(n - 1)).T)
        else:
            factors.append(psd_factor(xc.T @ xc / (n - 1)))
    return means[classes], factors


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
                      weighting: str = "paper", block: int = 1 << 24):
    """The m nearest head classes of each feature by Euclidean distance (eqs. 4-5) and their weights
    (eq. 6). `paper`: w_i ∝ n_i ||mu_i - x||^2 as printed; `inverse`: w_i ∝ n_i / ||mu_i - x||^2.
    Returns (idx [N,m] into the head classes, w [N,m] summing to 1). Rows are processed in blocks of
    about `block` distances, so no [N, H] matrix is held at once."""
    rows = max(1, block // max(1, len(head_means)))
    idx, w = [], []
    for xb in features.split(rows):
        dsel, ib = sq_distances(xb, head_means).topk(m, dim=1, largest=False)
        n = head_counts.to(features.dtype)[ib]
        raw = n * dsel if weighting == "paper" else n / dsel.clamp(min=_EPS)
        total = raw.sum(1, keepdim=True)
        w.append(torch.where(total > 0, raw / total.clamp(min=_EPS), torch.full_like(raw, 1.0 / m)))
        idx.append(ib)
    if not idx:
        return (torch.zeros(0, m, dtype=torch.long, device=features.device),
                features.new_zeros(0, m))
    return torch.cat(idx), torch.cat(w)


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
    """mu' = beta/(n_s+beta) mu_0 + n_s/(n_s+beta) mu_hat with mu_0 = sum_i w_i mu_i (eqs. 7, 11).
    Summed over the m neighbours one at a time: no [N, m, d] tensor."""
    mu0 = torch.zeros_like(mu_hat)
    for k in range(idx.shape[1]):
        mu0.addcmul_(w[:, k:k + 1], head_means[idx[:, k]])
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
    standard normals, F F^T = Sigma (eqs. 7, 12 for LADC). Nothing per-row of size d x d is ever built.

    `factors`: a tensor [H, d, r] (e.g. psd_factor's [H, d, d], or low-rank factors padded with zero
    columns), or a sequence of H tensors [d, r_h] of different widths (class_factors); e_k is drawn with
    the width of its factor, so Cov(z) is exact for any width. Rows are sampled in blocks of about
    `block` elements per temporary, so memory does not grow with R * m * d."""

    block = 1 << 25

    def __init__(self, means, comp_idx, comp_coef, factors, scale: float, iso: float = 0.0, const: float = 0.0):
        self.means, self.comp_idx, self.comp_coef, self.factors = means, comp_idx, comp_coef, factors
        self.scale, self.iso, self.const = float(scale), float(iso), float(const)
        self.ragged = not torch.is_tensor(factors)
        self.widths = [f.shape[-1] for f in factors] if self.ragged else [factors.shape[-1]] * len(factors)

    def __len__(self):
        return len(self.means)

    def _components(self, hid: torch.Tensor, generator) -> torch.Tensor:
        """F_{h_j} e_j for each component j (rows of [len(hid), d]), one matmul per head class."""
        n, d = len(hid), self.means.shape[1]
        dev, dt = self.means.device, self.means.dtype
        e = None if self.ragged else torch.randn(n, self.widths[0], device=dev, dtype=dt, generator=generator)
        perm = torch.argsort(hid, stable=True)
        sizes = torch.bincount(hid, minlength=len(self.widths)).tolist()
        out_sorted = torch.zeros(n, d, device=dev, dtype=dt)
        start = 0
        for h, k in enumerate(sizes):
            if k == 0:
                continue
            seg = slice(start, start + k)
            start += k
            f = self.factors[h]
            if f.shape[-1] == 0:
                continue
            eh = (torch.randn(k, f.shape[-1], device=dev, dtype=dt, generator=generator) if self.ragged
                  else e[perm[seg]])
            torch.matmul(eh, f.T, out=out_sorted[seg])
        out = torch.empty_like(out_sorted)
        out[perm] = out_sorted
        return out

    def sample(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        R, (K, d) = len(rows), (self.comp_idx.shape[1], self.means.shape[1])
        dev, dt = self.means.device, self.means.dtype
        z = self.means[rows]
        step = max(1, self.block // (K * max(d, max(self.widths, default=0), 1)))
        for b in range(0, R, step):
            rb = rows[b:b + step]
            noise = self._components(self.comp_idx[rb].reshape(-1), generator)
            noise = (noise * self.comp_coef[rb].reshape(-1, 1)).view(len(rb), K, d).sum(1)
            if self.iso:
                noise += self.iso * torch.randn(len(rb), d, device=dev, dtype=dt, generator=generator)
            if self.const:
                noise += self.const * torch.randn(len(rb), 1, device=dev, dtype=dt, generator=generator)
            z[b:b + step] += self.scale * noise
        return z


def ladc_bank(mu_hat, head_means, head_factors, head_counts, m, alpha, beta, weighting="paper", n_s=1):
    """GaussianBank of eqs. (4)-(12) for each row of mu_hat (a tail instance's feature for LADC,
    its class mean for LADC-average): coefficients w_i on F_i give sum w_i^2 Sigma_i, iso sqrt(alpha).
    head_factors: [H, d, r] or a list of [d, r_h] (class_factors)."""
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
