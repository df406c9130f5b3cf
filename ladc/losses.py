"""Long-tail training losses, the baselines of LADC Table 5 (pure functions of logits, labels, counts).

- `ce`: plain cross-entropy.
- `cb`: class-balanced softmax cross-entropy (Cui et al., CVPR 2019).
- `bsce`: balanced softmax cross-entropy (Ren et al., NeurIPS 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LadcError, check

LOSSES = ("ce", "cb", "bsce")


def _counts(counts, device=None) -> torch.Tensor:
    c = torch.as_tensor(counts, dtype=torch.float64, device=device).flatten()
    check(c.numel() > 0 and bool((c > 0).all()),
          "class counts must be positive for every class: drop empty classes or give each at least one example")
    return c


def class_balanced_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. (2019): w_c = (1 - beta) / (1 - beta^{n_c}) (inverse effective number),
    normalised so that sum_c w_c = C. float32 [C]."""
    check(0 <= beta < 1, f"beta {beta} is out of range: use 0 <= beta < 1 (e.g. 0.9999)")
    n = _counts(counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * n.numel()).float()


def class_balanced_ce(logits: torch.Tensor, y: torch.Tensor, counts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced softmax CE: mean over the batch of w_{y_i} * CE_i.

    Reduction as in Cui et al.'s official code (tf.losses.softmax_cross_entropy with per-example
    weights w_y, default SUM_BY_NONZERO_WEIGHTS): divided by the batch size, NOT by the batch's
    weight sum as `F.cross_entropy(weight=w)` would."""
    w = class_balanced_weights(counts, beta).to(logits.device)
    return (w[y] * F.cross_entropy(logits.float(), y, reduction="none")).mean()


def balanced_softmax_ce(logits: torch.Tensor, y: torch.Tensor, counts) -> torch.Tensor:
    """Balanced softmax CE (Ren et al. 2020): CE on logits + log n_c, batch mean."""
    log_prior = _counts(counts, logits.device).log().to(torch.float32)
    return F.cross_entropy(logits.float() + log_prior, y)


def make_loss(name: str, counts=None, beta: float = 0.9999):
    """Loss by name -> callable(logits, y) -> scalar. `counts`: training examples per class."""
    if name not in LOSSES:
        raise LadcError(f"unknown loss '{name}': choose one of {', '.join(LOSSES)}")
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits.float(), y)
    check(counts is not None, f"loss '{name}' needs the training counts per class: pass counts")
    if name == "cb":
        class_balanced_weights(counts, beta)  # validate now, not at the first batch
        return lambda logits, y: class_balanced_ce(logits, y, counts, beta)
    _counts(counts)
    return lambda logits, y: balanced_softmax_ce(logits, y, counts)
