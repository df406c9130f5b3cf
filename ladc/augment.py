"""Batched augmentation on uint8 image tensors, and Remix (Chou et al. 2020).

All functions take a whole batch [B, 3, H, W] and work on its device; nothing loops per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, an independent draw per image."""
    B, C, H, W = x.shape
    dev = x.device
    xp = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (B, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (B, 1), device=dev, generator=generator)
    flip = torch.rand(B, 1, device=dev, generator=generator) < 0.5
    rows = oy + torch.arange(H, device=dev)                       # [B, H]
    cols = ox + torch.arange(W, device=dev)                       # [B, W]
    cols = torch.where(flip, ox + (W - 1) - torch.arange(W, device=dev), cols)
    b = torch.arange(B, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class GroupedRandAugment:
    """torchvision RandAugment applied per group of `group` images: each group draws its own ops and
    magnitudes, so a batch sees B/group independent policies while the work stays batched."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, group: int = 16):
        from torchvision.transforms import v2

        self.op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)
        self.group = max(1, int(group))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.op(chunk) for chunk in x.split(self.group)])


def remix_label_weights(lam: torch.Tensor, n_i: torch.Tensor, n_j: torch.Tensor,
                        kappa: float = 3.0, tau: float = 0.5) -> torch.Tensor:
    """Remix label weight lambda_y for each pair (x_i, x_j) mixed as lam*x_i + (1-lam)*x_j:
    0 if n_i/n_j >= kappa and lam < tau; 1 if n_i/n_j <= 1/kappa and 1-lam < tau; else lam."""
    lam = torch.as_tensor(lam, dtype=torch.float32, device=n_i.device).expand(n_i.shape)
    ratio = n_i.float() / n_j.float()
    out = lam.clone()
    out = torch.where((ratio >= kappa) & (lam < tau), torch.zeros_like(out), out)
    out = torch.where((ratio <= 1.0 / kappa) & (1 - lam < tau), torch.ones_like(out), out)
    return out


def remix_batch(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, alpha: float = 1.0, kappa: float = 3.0,
                tau: float = 0.5, generator: torch.Generator | None = None):
    """Mix a float batch with a random permutation of itself. One lambda ~ Beta(alpha, alpha) per batch
    (as the reference); per-sample label weights by `remix_label_weights`.
    Returns (mixed x, y_i, y_j, lambda_y [B])."""
    B = x.shape[0]
    perm = torch.randperm(B, device=x.device, generator=generator)
    g = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = float(g.sample())  # global CPU RNG, seeded per run (Beta takes no Generator)
    xm = lam * x + (1 - lam) * x[perm]
    yj = y[perm]
    lam_y = remix_label_weights(torch.tensor(lam), counts[y], counts[yj], kappa, tau)
    return xm, y, yj, lam_y


def remix_loss(logits: torch.Tensor, yi: torch.Tensor, yj: torch.Tensor, lam_y: torch.Tensor) -> torch.Tensor:
    """lambda_y * CE(x, y_i) + (1 - lambda_y) * CE(x, y_j), averaged over the batch."""
    ce_i = F.cross_entropy(logits, yi, reduction="none")
    ce_j = F.cross_entropy(logits, yj, reduction="none")
    return (lam_y * ce_i + (1 - lam_y) * ce_j).mean()


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x_uint8.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x_uint8.device).view(1, -1, 1, 1) * 255.0
    return (x_uint8.float() - m) / s
