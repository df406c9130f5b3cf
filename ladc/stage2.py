"""Stage 2: re-balance the classifier on frozen features.

Methods (how an epoch of training features is drawn):
  ce        instance-balanced real features (the stage-1 distribution)
  cbs       class-balanced sampling of real features
  las       class-balanced sampling + label-aware smoothing (MiSLAS)
  dc        eq. (13) class sampling; tail classes from few-shot DC's calibrated Gaussians
  ladc_avg  eq. (13); tail classes from LADC's calibration of the tail *class* mean
  ladc      eq. (13); head classes from real features, tail classes from each tail instance's
            calibrated Gaussian (eqs. 4-12)
Classifiers: stage1 (the stage-1 linear layer as it is), crt (re-initialised linear layer),
lws (learned per-class scale f), lws_plus (eq. 14: f_i * logit_i + g_i).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import calibration as cal
from .errors import LadcError
from .features import FeatureSet
from .metrics import accuracy_report
from .params import CLASSIFIERS, METHODS, Stage2Params  # noqa: F401 (re-exported)

CALIBRATED = ("dc", "ladc_avg", "ladc")


class Classifier(nn.Module):
    """Stage-2 classifier on features. `power` != 1 applies a Tukey transform first (DC with cRT)."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.kind = kind
        C, d = weight.shape
        if kind == "crt":
            self.linear = nn.Linear(d, C)
        else:
            self.register_buffer("weight", weight.clone())
            self.register_buffer("bias", bias.clone())
        if kind in ("lws", "lws_plus"):
            self.f = nn.Parameter(torch.ones(C))
        if kind == "lws_plus":
            self.g = nn.Parameter(torch.zeros(C))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.kind == "crt":
            return self.linear(feats)
        logits = feats @ self.weight.T + self.bias
        if self.kind == "lws":
            return self.f * logits
        if self.kind == "lws_plus":
            return self.f * logits + self.g  # eq. (14)
        return logits


def validate_stage2(p, num_heads: int | None = None) -> Stage2Params:
    """Stage2Params from a dict (typed and range-checked); with num_heads, m is checked against it."""
    p = Stage2Params.from_dict(p)
    if num_heads is not None:
        p.check(num_heads)
    return p


def validate_for_features(p: Stage2Params, counts) -> None:
    """The check that needs the data: m against the number of head classes (when there is a tail)."""
    counts = torch.as_tensor(counts).cpu()
    head = cal.head_classes(counts, p.head_fraction)
    if p.method in CALIBRATED and len(head) < int((counts > 0).sum()):
        p.check(len(head))


def las_epsilons(counts: torch.Tensor, eps_head: float, eps_tail: float) -> torch.Tensor:
    """MiSLAS: eps_i = eps_tail + (eps_head - eps_tail) sin((n_i - n_K) pi / (2 (n_1 - n_K)))."""
    n = counts.double()
    n1, nk = n.max(), n.min()
    if n1 == nk:
        return torch.full_like(n, eps_head).float()
    return (eps_tail + (eps_head - eps_tail) * torch.sin((n - nk) * math.pi / (2 * (n1 - nk)))).float()


def soft_targets(y: torch.Tensor, num_classes: int, eps: torch.Tensor | None) -> torch.Tensor:
    """One-hot targets, or MiSLAS' label-aware smoothed ones: (1 - eps_y) onehot + eps_y / C, so that
    -sum t log p = (1 - eps_y) NLL + eps_y mean_j(-log p_j)."""
    t = F.one_hot(y, num_classes).float()
    if eps is None:
        return t
    e = eps[y].unsqueeze(1)
    return (1 - e) * t + e / num_classes


class ClassifierSGD:
    """SGD with momentum and weight decay (torch.optim.SGD's update rule) for the linear stage-2 classifiers,
    with the gradients of the soft-target cross-entropy written out: dL/dlogits = (softmax - t) / B.
    No autograd graph per step: a 30-epoch fit is a few thousand tiny updates."""

    def __init__(self, clf: Classifier, momentum: float, weight_decay: float):
        self.clf, self.momentum, self.wd = clf, momentum, weight_decay
        self.params = [q for q in clf.parameters() if q.requires_grad]
        self.bufs = [torch.zeros_like(q) for q in self.params]

    def grads(self, x: torch.Tensor, base: torch.Tensor | None, t: torch.Tensor):
        h = self.clf
        logits = h.linear(x) if h.kind == "crt" else (h.f * base + h.g if h.kind == "lws_plus" else h.f * base)
        logp = F.log_softmax(logits, 1)
        loss = -(t * logp).sum(1).mean()
        d = (logp.exp() - t) / len(t)
        if h.kind == "crt":
            return loss, [d.T @ x, d.sum(0)]
        gf = (d * base).sum(0)
        return loss, [gf, d.sum(0)] if h.kind == "lws_plus" else [gf]

    @torch.no_grad()
    def step(self, x, base, t, lr: float) -> torch.Tensor:
        loss, grads = self.grads(x, base, t)
        for q, g, buf in zip(self.params, grads, self.bufs):
            g = g + self.wd * q
            buf.mul_(self.momentum).add_(g)
            q.sub_(lr * buf)
        return loss


@dataclass
class EpochSampler:
    """Draws one epoch of (feature, label) pairs: class c with probability probs[c], then a random
    instance of c; rows of tail classes are replaced by a draw from `bank` (their calibrated
    Gaussian) when a bank is given. Everything is batched over the epoch."""

    x_sorted: torch.Tensor        # train features sorted by class
    y_sorted: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor
    bank: cal.GaussianBank | None = None
    tail_row: torch.Tensor | None = None   # sorted index -> bank row (-1 for head instances)
    transform_back: float = 1.0            # DC: samples live in Tukey space; map back with x^(1/power)
    offsets: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def draw(self, n: int, generator: torch.Generator | None = None):
        dev = self.x_sorted.device
        c = torch.multinomial(self.probs.to(dev), n, replacement=True, generator=generator)
        u = torch.rand(n, device=dev, generator=generator)
        r = self.offsets[c] + torch.minimum((u * self.counts[c]).long(), self.counts[c] - 1)
        x = self.x_sorted[r].clone()
        if self.bank is not None:
            rows = self.tail_row[r]
            synth = rows >= 0
            if synth.any():
                z = self.bank.sample(rows[synth], generator=generator)
                if self.transform_back != 1.0:
                    z = z.clamp(min=0).pow(1.0 / self.transform_back)
                x[synth] = z.to(x.dtype)
        return x, self.y_sorted[r]


def build_sampler(fs: FeatureSet, p: Stage2Params | dict, log=print) -> tuple[EpochSampler, dict]:
    """The epoch sampler of a method, and info (head classes, fallback) to log."""
    p = Stage2Params.from_dict(p)
    x, y = fs.x["train"], fs.y["train"]
    C = fs.num_classes
    counts = torch.bincount(y, minlength=C).to(x.device)
    order = torch.argsort(y, stable=True)
    xs, ys = x[order], y[order]
    head = cal.head_classes(counts.cpu(), p.head_fraction).to(x.device)
    is_head = torch.zeros(C, dtype=torch.bool, device=x.device)
    is_head[head] = True
    info = {"num_head_classes": len(head), "head_classes": head.tolist(), "method_used": p.method}
    method = p.method
    if method in CALIBRATED and bool(is_head[counts > 0].all()):
        log(f"note: no tail class with head_fraction {p.head_fraction} (every class is head): "
            f"{method} falls back to class-balanced sampling (cbs)")
        method = info["method_used"] = "cbs"
    if method in CALIBRATED:
        p.check(len(head))
    if method == "ce":
        probs = counts.double() / counts.sum()
    elif method in ("cbs", "las"):
        probs = (counts > 0).double() / (counts > 0).sum()
    else:
        probs = cal.class_probabilities(counts.cpu(), p.tau, p.sampling).to(x.device)
    sampler = EpochSampler(xs, ys, counts, probs)
    if method not in CALIBRATED:
        return sampler, info
    tail_mask = ~is_head[ys]
    tail_row = torch.full((len(ys),), -1, dtype=torch.long, device=x.device)
    tail_row[tail_mask] = torch.arange(int(tail_mask.sum()), device=x.device)
    xt = xs[tail_mask]
    if method == "dc":
        power = p.dc_tukey
        xp = xs.clamp(min=0).pow(power)
        means, _ = cal.class_means(xp, ys, C)
        _, factors = cal.class_factors(xp, ys, head, means)  # per head class, no [C, d, d] (eq. 3)
        bank = cal.dc_bank(xp[tail_mask], means[head], factors, min(p.m, len(head)), p.dc_alpha)
        sampler.transform_back = power
    else:
        means, _ = cal.class_means(xs, ys, C)
        if method == "ladc_avg":
            mu_hat = means[ys[tail_mask]]
        else:
            mu_hat = xt
        _, factors = cal.class_factors(xs, ys, head, means)  # per head class, no [C, d, d] (eq. 3)
        bank = cal.ladc_bank(mu_hat, means[head], factors, counts[head], p.m, p.alpha, p.beta,
                             p.weighting)
    sampler.bank, sampler.tail_row = bank, tail_row
    return sampler, info


@torch.no_grad()
def predict_classifier(clf: Classifier, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    clf.eval()
    return torch.cat([clf(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def fit_stage2(fs: FeatureSet, p: Stage2Params | dict, on_epoch=None, log=print):
    """Train a stage-2 classifier on cached features (a dict `p` is validated first). `on_epoch(epoch, metrics)` is called after every epoch
    (validation accuracy for pruning); a true return value stops training there (info["stopped_at"]).
    Returns (classifier, history, reports, info)."""
    p = Stage2Params.from_dict(p)
    torch.manual_seed(int(p.seed))
    gen = torch.Generator(device=fs.x["train"].device).manual_seed(int(p.seed))
    t0 = time.perf_counter()
    sampler, info = build_sampler(fs, p, log)
    clf = Classifier(p.classifier, fs.weight, fs.bias).to(fs.x["train"].device)
    counts = fs.counts.to(fs.x["train"].device)
    eps = las_epsilons(counts, p.las_eps_head, p.las_eps_tail) if info["method_used"] == "las" else None
    C = fs.num_classes
    opt = ClassifierSGD(clf, p.momentum, p.weight_decay)
    epochs = p.epochs if opt.params else 0
    n, bs = len(fs.y["train"]), p.batch_size
    history = []
    val_x, val_y = fs.x["val"], fs.y["val"]
    for epoch in range(1, epochs + 1):
        lr = p.lr * p.lr_gamma ** sum(epoch > m for m in p.milestones)
        clf.train()
        xe, ye = sampler.draw(n, gen)
        te = soft_targets(ye, C, eps)
        with torch.no_grad():
            base = None if clf.kind == "crt" else xe @ clf.weight.T + clf.bias  # frozen logits, once
        tot = torch.zeros((), device=xe.device)
        for i in range(0, n, bs):
            tb = te[i:i + bs]
            tot += opt.step(xe[i:i + bs], None if base is None else base[i:i + bs], tb, lr) * len(tb)
        loss_v = float(tot) / n
        if not math.isfinite(loss_v):
            raise LadcError(f"stage-2 loss became {loss_v} at epoch {epoch}: lower the stage-2 lr")
        val_acc = float((predict_classifier(clf, val_x) == val_y).float().mean() * 100)
        rec = {"epoch": epoch, "loss": loss_v, "lr": lr, "val_top1": val_acc}
        history.append(rec)
        if on_epoch is not None and on_epoch(epoch, rec):
            info["stopped_at"] = epoch
            break
    info["fit_seconds"] = time.perf_counter() - t0
    counts_l = fs.counts.tolist()
    reports = {s: accuracy_report(predict_classifier(clf, fs.x[s]), fs.y[s], counts_l) for s in ("val", "test")}
    return clf, history, reports, info
