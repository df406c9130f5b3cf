import pytest
import torch

from ladc.augment import GroupedRandAugment, random_crop_flip, remix_batch, remix_label_weights, remix_loss
from ladc.errors import LadcError
from ladc.models import create_model


def test_resnet32_parameter_count_and_feature_split():
    m = create_model("resnet32", 10)
    assert sum(p.numel() for p in m.parameters()) == 464154
    x = torch.randn(2, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (2, 64)
    assert torch.allclose(m.classifier(f), m(x))


def test_torchvision_resnet10_features():
    m = create_model("resnet10", 7)
    assert m.features(torch.randn(2, 3, 64, 64)).shape == (2, 512) and m(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_backbone():
    with pytest.raises(LadcError, match="unknown backbone"):
        create_model("vgg16", 10)


def test_remix_label_rule_hand_made_pairs():
    n_i = torch.tensor([300, 300, 100, 10, 10, 100, 100])
    n_j = torch.tensor([100, 100, 300, 100, 100, 100, 50])
    lam = torch.tensor([0.3, 0.7, 0.8, 0.8, 0.3, 0.3, 0.4])
    got = remix_label_weights(lam, n_i, n_j, kappa=3, tau=0.5)
    # i much larger & lam < tau -> 0 ; i much larger & lam >= tau -> lam ; i much smaller & 1-lam < tau -> 1
    # i much smaller & 1-lam >= tau -> lam ; ratio inside (1/3, 3) -> lam
    assert got.tolist() == pytest.approx([0.0, 0.7, 1.0, 1.0, 0.3, 0.3, 0.4])


def test_remix_batch_mixes_and_loss_weights():
    x = torch.randn(8, 3, 4, 4)
    y = torch.arange(8) % 4
    counts = torch.tensor([1000, 100, 10, 1])
    torch.manual_seed(0)
    xm, yi, yj, lam_y = remix_batch(x, y, counts)
    torch.manual_seed(0)  # the same draws again: the permutation, then lambda ~ Beta(1, 1)
    perm = torch.randperm(8)
    lam = float(torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample())
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(8))
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm]) and (yi == y).all() and (yj == y[perm]).all()
    assert torch.allclose(lam_y, remix_label_weights(torch.tensor(lam), counts[y], counts[y[perm]]))
    logits = torch.randn(8, 4)
    ce_i = torch.nn.functional.cross_entropy(logits, yi, reduction="none")
    ce_j = torch.nn.functional.cross_entropy(logits, yj, reduction="none")
    assert remix_loss(logits, yi, yj, lam_y) == pytest.approx(float((lam_y * ce_i + (1 - lam_y) * ce_j).mean()))


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # each output is one of the 5x5x2 windows of its own padded image
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any((out[i] == w).all() or (out[i] == w.flip(-1)).all() for w in windows)
    same = random_crop_flip(x, padding=0)
    assert all((same[i] == x[i]).all() or (same[i] == x[i].flip(-1)).all() for i in range(16))


def test_grouped_randaugment_keeps_shape_and_dtype():
    torch.manual_seed(0)
    x = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8)
    out = GroupedRandAugment(group=16)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    changed = [(o != i).any().item() for o, i in zip(out.split(16), x.split(16))]
    assert sum(changed) >= 3, changed  # not a no-op (a group may draw Identity twice, rarely)
    # within a group every image got the same ops; groups draw their own
    same = GroupedRandAugment(group=64)
    torch.manual_seed(1)
    a = same(x)
    torch.manual_seed(1)
    b = torch.cat([same.op(x)])
    assert torch.equal(a, b)
