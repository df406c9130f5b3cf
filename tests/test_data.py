import subprocess

import numpy as np
import pytest
import torch

from conftest import SHARED_CIFAR
from ladc.data import build_dataset, longtail_counts, make_synthetic, select_longtail
from ladc.errors import LadcError


def test_cifar10_if100_counts_exact():
    assert longtail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("n_max,C,imf,total", [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431), (5000, 10, 200, 11203),
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573), (500, 100, 200, 9502)])
def test_reference_totals(n_max, C, imf, total):
    counts = longtail_counts(n_max, C, imf)
    assert sum(counts) == total
    assert counts[0] == n_max and counts == sorted(counts, reverse=True)


def test_imbalance_factor_below_one_is_an_error():
    with pytest.raises(LadcError, match="imbalance factor"):
        longtail_counts(500, 10, 0.5)


def test_select_longtail_exact_without_validation():
    labels = np.repeat(np.arange(4), 100)
    counts = longtail_counts(100, 4, 10)
    tr, va, notes = select_longtail(labels, counts, seed=0, val_per_class=0)
    assert np.bincount(labels[tr]).tolist() == counts and len(va) == 0 and notes == []


def test_validation_is_balanced_and_disjoint():
    labels = np.repeat(np.arange(4), 100)
    counts = longtail_counts(100, 4, 10)
    tr, va, notes = select_longtail(labels, counts, seed=0, val_per_class=10)
    assert set(tr).isdisjoint(va)
    assert np.bincount(labels[va]).tolist() == [10] * 4
    # the largest class keeps all its images in the profile, so 10 of them move to validation
    assert np.bincount(labels[tr]).tolist() == [90] + counts[1:]
    assert len(notes) == 1 and "class 0" in notes[0]


def test_subset_is_seeded():
    labels = np.repeat(np.arange(3), 50)
    a = select_longtail(labels, [50, 20, 5], 0, 5)[0]
    b = select_longtail(labels, [50, 20, 5], 0, 5)[0]
    c = select_longtail(labels, [50, 20, 5], 1, 5)[0]
    assert (a == b).all() and not (np.sort(a) == np.sort(c)).all()


def test_synthetic_dataset():
    d = make_synthetic(num_classes=5, n_max=200, imbalance_factor=10)
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (3, 16, 16)
    assert d.counts.tolist() == longtail_counts(200, 5, 10)
    assert d.val_y.bincount().tolist() == [20] * 5 and d.test_y.bincount().tolist() == [50] * 5


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(LadcError, match="does not exist"):
        build_dataset({"dataset": "cifar10_lt", "data_root": str(tmp_path / "nope")})


def test_wrong_layout_is_a_clear_error(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(LadcError, match="neither"):
        build_dataset({"dataset": "cifar10_lt", "data_root": str(tmp_path)})


def test_imagefolder_with_other_classes_is_rejected(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cats").mkdir(parents=True)
    with pytest.raises(LadcError, match="CIFAR-10"):
        build_dataset({"dataset": "cifar10_lt", "data_root": str(tmp_path)})


def test_unknown_dataset():
    with pytest.raises(LadcError, match="unknown dataset"):
        build_dataset({"dataset": "mnist_lt"})


def test_imagefolder_lt_on_a_small_tree(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", [40, 30, 12]), ("test", [5, 5, 5])):
        for c, k in enumerate(n):
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(k):
                Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = build_dataset({"dataset": "imagefolder_lt", "data_root": str(tmp_path), "imbalance_factor": 4,
                          "val_per_class": 2, "image_size": 16})
    assert data.train_x.shape[1:] == (3, 16, 16)
    assert data.counts.tolist() == [38, 20, 10]  # profile [40, 20, 10]; class 0 gives 2 to validation
    as_is = build_dataset({"dataset": "imagefolder_lt", "data_root": str(tmp_path), "imbalance_factor": None,
                           "val_fraction": 0.1, "image_size": 16})
    assert as_is.counts.tolist() == [36, 27, 11] and as_is.val_y.bincount().tolist() == [4, 3, 1]


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 copy not present")
def test_real_cifar10_lt_from_shared_copy(tmp_path):
    subprocess.run(["tar", "-xJf", str(SHARED_CIFAR), "-C", str(tmp_path)], check=True)
    data = build_dataset({"dataset": "cifar10_lt", "data_root": str(tmp_path / "cifar10-jpeg"),
                          "imbalance_factor": 100, "seed": 0, "val_per_class": 0})
    assert data.counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert data.test_x.shape == (10000, 3, 32, 32) and data.test_x.dtype == torch.uint8
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"
