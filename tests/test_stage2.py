import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT
from ladc import calibration as cal
from ladc.data import longtail_counts
from ladc.errors import LadcError
from ladc.features import gaussian_features
from ladc.stage2 import Classifier, ClassifierSGD, fit_stage2, las_epsilons, soft_targets, validate_stage2


def params(**kw):
    p = yaml.safe_load((ROOT / "experiments" / "cifar10_lt.yaml").read_text())["stage2"]
    p.update(kw)
    return p


def gaussian_lt(seed=0, C=8, d=32, n_max=1000, imf=100, spread=0.35):
    """Long-tailed Gaussian classes with a head-biased stage-1 classifier."""
    return gaussian_features(longtail_counts(n_max, C, imf), d=d, spread=spread, mix=0.15, noise=0.5,
                             val_per_class=50, test_per_class=300, seed=seed, fit_steps=300)


@pytest.mark.parametrize("kind", ["crt", "lws", "lws_plus"])
@pytest.mark.parametrize("smooth", [False, True])
def test_head_sgd_matches_autograd_and_torch_sgd(kind, smooth):
    torch.manual_seed(0)
    C, d = 5, 7
    W, b = torch.randn(C, d), torch.randn(C)
    ours, ref = Classifier(kind, W, b), Classifier(kind, W, b)
    ref.load_state_dict(ours.state_dict())
    opt = ClassifierSGD(ours, momentum=0.9, weight_decay=5e-4)
    topt = torch.optim.SGD([q for q in ref.parameters() if q.requires_grad], lr=0.1, momentum=0.9,
                           weight_decay=5e-4)
    eps = las_epsilons(torch.tensor([100, 50, 20, 5, 2]), 0.3, 0.05) if smooth else None
    for step in range(5):
        x, y = torch.randn(16, d).relu(), torch.randint(0, C, (16,))
        t = soft_targets(y, C, eps)
        base = None if kind == "crt" else x @ W.T + b
        loss = opt.step(x, base, t, lr=0.1)
        logp = F.log_softmax(ref(x), 1)
        ref_loss = -(t * logp).sum(1).mean()
        topt.zero_grad()
        ref_loss.backward()
        topt.step()
        assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for (k, a), (_, r) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a, r, atol=1e-6), k


def test_las_targets_equal_mislas_loss():
    counts = torch.tensor([500, 100, 10])
    eps = las_epsilons(counts, 0.3, 0.0)
    assert eps[0] == pytest.approx(0.3) and eps[2] == pytest.approx(0.0)
    assert eps[1] == pytest.approx(0.3 * math.sin((100 - 10) * math.pi / (2 * 490)))
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    logp = F.log_softmax(logits, 1)
    e = eps[y]
    mislas = ((1 - e) * -logp[torch.arange(6), y] + e * -logp.mean(1)).mean()
    ours = -(soft_targets(y, 3, eps) * logp).sum(1).mean()
    assert float(ours) == pytest.approx(float(mislas), rel=1e-6)


def test_ladc_lws_plus_raises_few_shot_accuracy_over_ce():
    fs = gaussian_lt()
    _, _, ce, _ = fit_stage2(fs, params(method="ce", classifier="stage1"))
    _, hist, ladc, info = fit_stage2(fs, params(method="ladc", classifier="lws_plus", m=2, tau=1.2))
    assert info["num_head_classes"] >= 2 and len(hist) == 30
    assert ladc["test"]["few"] > ce["test"]["few"] + 10
    assert ladc["test"]["top1"] > ce["test"]["top1"]


@pytest.mark.parametrize("method,clf", [("cbs", "crt"), ("cbs", "lws"), ("las", "crt"), ("dc", "lws_plus"),
                                        ("ladc_avg", "lws_plus"), ("ladc", "lws"), ("ce", "lws_plus")])
def test_every_method_runs(method, clf):
    fs = gaussian_lt(C=5, d=8, n_max=300, imf=20)
    _, hist, rep, info = fit_stage2(fs, params(method=method, classifier=clf, m=1, epochs=3), log=lambda *a: None)
    stage1_pred = (fs.x["test"] @ fs.weight.T + fs.bias).argmax(1)
    stage1_acc = (stage1_pred == fs.y["test"]).float()
    if clf == "stage1":  # nothing to train: exactly the stage-1 classifier's predictions
        assert hist == [] and rep["test"]["top1"] == pytest.approx(float(stage1_acc.mean() * 100))
        return
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]  # it trains
    assert rep["test"]["top1"] > 20 + 4  # 5 classes: chance is 20%
    if method != "ce":  # every re-balancing method lifts the rarest class above the stage-1 classifier
        rarest = fs.y["test"] == 4
        assert rep["test"]["per_class"][4] > float(stage1_acc[rarest].mean() * 100) + 5


def test_no_tail_class_falls_back_to_cbs():
    fs = gaussian_lt(C=4, d=6, n_max=100, imf=1)
    msgs = []
    _, _, _, info = fit_stage2(fs, params(method="ladc", epochs=2, m=1), log=msgs.append)
    assert info["method_used"] == "cbs" and "falls back" in msgs[0]


@pytest.mark.parametrize("kw,msg", [({"m": 0}, "m 0"), ({"alpha": -0.1}, "alpha"), ({"beta": 0.0}, "beta"),
                                    ({"tau": -1.0}, "tau"), ({"head_fraction": 0.0}, "head_fraction"),
                                    ({"head_fraction": 1.5}, "head_fraction"), ({"method": "smote"}, "method"),
                                    ({"classifier": "mlp"}, "classifier"), ({"weighting": "x"}, "weighting")])
def test_out_of_range_hyperparameters(kw, msg):
    with pytest.raises(LadcError, match=msg):
        validate_stage2(params(**kw))


def test_m_larger_than_head_classes():
    fs = gaussian_lt(C=5, d=8, n_max=300, imf=20)
    heads = len(cal.head_classes(fs.counts))
    with pytest.raises(LadcError, match=f"only {heads} head classes"):
        fit_stage2(fs, params(method="ladc", m=heads + 1, epochs=1))


def test_nan_features_are_rejected():
    fs = gaussian_lt(C=4, d=6, n_max=100, imf=10)
    fs.x["val"][3, 2] = float("nan")
    with pytest.raises(LadcError, match="NaN/Inf"):
        fs.check_finite()
