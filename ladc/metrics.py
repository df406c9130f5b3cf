"""Evaluation: top-1, many/medium/few-shot accuracy (Table 7 groups), per-class accuracy, confusion."""

from __future__ import annotations

import torch

MANY, FEW = 100, 20  # many: > 100 training images, medium: 20..100, few: < 20


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = target.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def shot_groups(train_counts) -> dict[str, torch.Tensor]:
    c = torch.as_tensor(train_counts)
    return {"many": c > MANY, "medium": (c >= FEW) & (c <= MANY), "few": c < FEW}


def accuracy_report(pred: torch.Tensor, target: torch.Tensor, train_counts) -> dict:
    """{'top1', 'many', 'medium', 'few' (percent; NaN for an empty group), 'per_class' [C], 'confusion'}.
    Group accuracy is the mean of its classes' accuracies (balanced test sets make both readings equal)."""
    C = len(train_counts)
    cm = confusion_matrix(pred, target, C)
    support = cm.sum(1).clamp(min=1)
    per_class = cm.diag().float() / support * 100
    has = cm.sum(1) > 0
    out = {"top1": float((pred.cpu() == target.cpu()).float().mean() * 100), "per_class": per_class,
           "confusion": cm}
    for name, mask in shot_groups(train_counts).items():
        m = mask & has
        out[name] = float(per_class[m].mean()) if m.any() else float("nan")
    return out


def flat_metrics(report: dict, prefix: str) -> dict[str, float]:
    """Scalar metrics for MLflow: {prefix}_top1, {prefix}_many, ... (NaN groups are left out)."""
    out = {}
    for k in ("top1", "many", "medium", "few"):
        v = report[k]
        if v == v:
            out[f"{prefix}_{k}"] = v
    return out
