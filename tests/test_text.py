"""Text groundwork: tokenisation, THUCNews-LT / text-file loading, text backbones, CB and BSCE losses."""

import math
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from ladc.data import longtail_counts
from ladc.errors import LadcError
from ladc.losses import balanced_softmax_ce, class_balanced_ce, class_balanced_weights, make_loss
from ladc.text_data import (PAD, SPACE, UNK, TextLTData, Vocab, load_embeddings, load_textfile_lt,
                            load_thucnews_lt, load_vocab, tokenize)
from ladc.text_models import TextCNN, create_text_model

SHARED_THUCNEWS = ROOT.parent / "shared" / "data" / "thucnews"
FILLER = "abcdefghijklmnop"
MARKERS = ["ABCD", "EFGH", "IJKL", "MNOP"]  # class c's lines carry its own marker characters


def _lines(n_per_class, seed, label=lambda c: str(c)):
    """Synthetic `text<TAB>label` lines: random filler characters plus 3 markers of the class."""
    rng = np.random.RandomState(seed)
    out = []
    for c, n in enumerate(n_per_class):
        for _ in range(n):
            chars = list(rng.choice(list(FILLER), rng.randint(6, 20))) + list(rng.choice(list(MARKERS[c]), 3))
            rng.shuffle(chars)
            out.append("".join(chars) + "\t" + label(c))
    return out


def _write_set(root, pool=(60, 60, 60, 60), test=(20, 20, 20, 20), classes=True, label=lambda c: str(c)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n".join(_lines(pool, 0, label)) + "\n", encoding="utf-8")
    (root / "test.txt").write_text("\n".join(_lines(test, 1, label)) + "\n", encoding="utf-8")
    if classes:
        (root / "class.txt").write_text("\n".join(f"cls{c}" for c in range(len(pool))), encoding="utf-8")
    return root


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- tokenisation

def test_tokenize_unknown_space_cut_and_pad(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join([SPACE, "新", "闻", "a", UNK, PAD]) + "\n", encoding="utf-8")
    v = load_vocab(tmp_path / "vocab.txt")
    assert (len(v), v.unk_id, v.pad_id) == (6, 4, 5)
    ids = tokenize(["新 闻x", "a" * 40, ""], v, max_len=32)
    assert ids.dtype == torch.int64 and ids.shape == (3, 32)
    assert ids[0, :5].tolist() == [1, 0, 2, 4, 5] and (ids[0, 4:] == 5).all()  # x -> UNK, then PAD
    assert (ids[1] == 3).all()  # cut at 32
    assert (ids[2] == 5).all()  # empty line: all PAD
    assert tokenize("闻a", v, max_len=4).tolist() == [2, 3, 5, 5]  # one string -> [max_len]


def test_tokenize_is_fast():
    v = Vocab([chr(0x4E00 + i) for i in range(4000)] + [SPACE, UNK, PAD])
    rng = np.random.RandomState(0)
    lines = ["".join(chr(0x4E00 + k) for k in rng.randint(0, 4200, rng.randint(5, 34))) for _ in range(10_000)]
    t = time.perf_counter()
    ids = tokenize(lines, v)
    assert time.perf_counter() - t < 0.5
    ref = [v.index.get(ch, v.unk_id) for ch in lines[7][:32]]
    assert ids[7, :len(ref)].tolist() == ref


# ----------------------------------------------------------------------------- data sets

def test_textfile_longtail_counts_and_validation(tmp_path):
    d = load_textfile_lt(_write_set(tmp_path / "set"), imbalance_factor=10, seed=0, val_per_class=5, max_len=16)
    profile = longtail_counts(60, 4, 10)
    assert isinstance(d, TextLTData) and d.classes == ["cls0", "cls1", "cls2", "cls3"]
    # class 0 keeps its whole pool in the profile: its last 5 lines move to validation
    assert d.counts.tolist() == [55] + profile[1:] and len(d.notes) == 2 and "class 0" in d.notes[0]
    assert d.val_y.bincount().tolist() == [5] * 4 and d.test_y.bincount().tolist() == [20] * 4
    assert d.train_x.dtype == torch.int64 and d.token_len == 16 and d.test_x.shape == (80, 16)
    assert d.vocab.tokens[-2:] == [UNK, PAD] and d.embeddings is None
    assert d.spec["train_counts"] == d.counts.tolist() and d.spec["profile_counts"] == profile
    assert d.spec["imbalance_factor"] == 10.0 and d.spec["max_len"] == 16
    # no train line is also a validation line (rows are distinct by construction of the split)
    again = load_textfile_lt(tmp_path / "set", imbalance_factor=10, seed=0, val_per_class=5, max_len=16)
    other = load_textfile_lt(tmp_path / "set", imbalance_factor=10, seed=1, val_per_class=5, max_len=16)
    assert torch.equal(d.train_x, again.train_x) and not torch.equal(d.train_x, other.train_x)


def test_textfile_as_is_with_names(tmp_path):
    root = _write_set(tmp_path / "named", pool=(40, 20, 10, 5), classes=False, label=lambda c: f"topic{c}")
    d = load_textfile_lt(root, imbalance_factor=None, seed=0, val_fraction=0.2)
    assert d.classes == ["topic0", "topic1", "topic2", "topic3"]
    assert d.counts.tolist() == [32, 16, 8, 4] and d.val_y.bincount().tolist() == [8, 4, 2, 1]
    assert d.spec["imbalance_factor"] is None and d.spec["profile_counts"] is None


@pytest.mark.skipif(not SHARED_THUCNEWS.is_dir(), reason="shared THUCNews copy not present")
def test_real_thucnews_counts():
    d = load_thucnews_lt(SHARED_THUCNEWS, imbalance_factor=100, seed=0, val_per_class=0)
    assert d.counts.tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10] and len(d.train_y) == 2478
    assert d.test_x.shape == (10000, 32) and d.vocab_size == 4762 and d.pad_id == 4761
    assert d.embeddings.shape == (4762, 200) and d.classes[0] == "finance"
    v = load_thucnews_lt(SHARED_THUCNEWS, imbalance_factor=100, seed=0, val_per_class=100)
    assert v.counts.tolist() == [900, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert v.val_y.bincount().tolist() == [100] * 10 and v.spec["train_counts"][0] == 900


# ----------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("name,dim", [("textcnn", 768), ("textrnn", 256), ("transformer", 256)])
def test_backbone_features_and_classifier(name, dim):
    torch.manual_seed(0)
    emb = torch.randn(50, 200)
    m = create_text_model(name, 7, 50, embeddings=emb, pad_id=49).eval()
    assert torch.equal(m.embedding.weight.detach(), emb) and m.embedding.weight.requires_grad
    x = torch.randint(0, 49, (5, 32))
    x[0, 3:] = 49
    x[1] = 49  # an empty line
    f = m.features(x)
    assert f.shape == (5, dim) and m.feature_dim == dim and torch.isfinite(f).all()
    assert m.classifier.in_features == dim and m.classifier.out_features == 7
    assert torch.allclose(m(x), m.classifier(f), atol=1e-6)
    if name != "textcnn":  # pads are masked: extra trailing pads change nothing
        longer = torch.cat([x, torch.full((5, 6), 49)], 1)
        assert torch.allclose(m.features(longer), f, atol=1e-5)


def test_backbone_errors():
    with pytest.raises(LadcError, match="textcnn, textrnn, transformer") as e:
        create_text_model("bert", 3, 10)
    _one_line(e)
    with pytest.raises(LadcError, match=r"\[10, 8\]") as e:
        create_text_model("textcnn", 3, 12, embeddings=torch.zeros(10, 8))
    _one_line(e)


def test_textcnn_learns_synthetic_text(tmp_path):
    torch.manual_seed(0)
    d = load_textfile_lt(_write_set(tmp_path / "s", pool=(60, 60, 60, 60)), imbalance_factor=2,
                         val_per_class=0, max_len=24)
    m = TextCNN(4, d.vocab_size, embed_dim=16, pad_id=d.pad_id, maps=32)  # the textcnn, narrowed for speed
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    loss_fn = make_loss("bsce", d.counts)
    t = time.perf_counter()
    for _ in range(4):
        m.train()
        for idx in torch.randperm(len(d.train_y)).split(32):
            opt.zero_grad()
            loss_fn(m(d.train_x[idx]), d.train_y[idx]).backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(d.test_x).argmax(1) == d.test_y).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.25
    assert time.perf_counter() - t < 20


# ----------------------------------------------------------------------------- losses

LOGITS = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]]
LABELS = [0, 2, 1]
COUNTS = [100, 10, 1]


def _ce_one(logits, t):
    return math.log(sum(math.exp(v) for v in logits)) - logits[t]


def test_class_balanced_weights_by_hand():
    # beta 0.9: raw (1 - b) / (1 - b^n) = 0.1000027, 0.1535340, 1.0; scaled to sum 3
    w = class_balanced_weights(COUNTS, beta=0.9)
    assert torch.allclose(w, torch.tensor([0.2393292, 0.3674420, 2.3932288]), atol=1e-6)
    assert abs(w.sum().item() - 3) < 1e-5
    assert torch.allclose(class_balanced_weights(COUNTS, beta=0.0), torch.ones(3))  # beta 0: plain CE


def test_cb_and_bsce_against_hand_computation():
    logits, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    w = [0.2393292360, 0.3674419731, 2.3932287909]
    cb = sum(w[t] * _ce_one(l, t) for l, t in zip(LOGITS, LABELS)) / len(LABELS)
    bs = sum(_ce_one([v + math.log(n) for v, n in zip(l, COUNTS)], t) for l, t in zip(LOGITS, LABELS)) / len(LABELS)
    assert abs(cb - 0.2893031664) < 1e-8 and abs(bs - 1.4739187283) < 1e-8
    assert abs(class_balanced_ce(logits, y, COUNTS, beta=0.9).item() - cb) < 1e-5
    assert abs(balanced_softmax_ce(logits, y, COUNTS).item() - bs) < 1e-5
    assert abs(make_loss("cb", COUNTS, beta=0.9)(logits, y).item() - cb) < 1e-5
    assert abs(make_loss("bsce", torch.tensor(COUNTS))(logits, y).item() - bs) < 1e-5
    ce = sum(_ce_one(l, t) for l, t in zip(LOGITS, LABELS)) / 3
    assert abs(make_loss("ce", COUNTS)(logits, y).item() - ce) < 1e-5
    assert abs(balanced_softmax_ce(logits, y, [7, 7, 7]).item() - ce) < 1e-5  # equal counts: plain CE


def test_loss_errors():
    with pytest.raises(LadcError, match="ce, cb, bsce") as e:
        make_loss("focal", COUNTS)
    _one_line(e)
    with pytest.raises(LadcError, match="positive"):
        make_loss("bsce", [5, 0, 1])


# ----------------------------------------------------------------------------- bad input

def test_missing_file(tmp_path):
    root = _write_set(tmp_path / "m")
    (root / "test.txt").unlink()
    with pytest.raises(LadcError, match="test.txt is missing") as e:
        load_textfile_lt(root)
    _one_line(e)
    with pytest.raises(LadcError, match="dev.txt is missing"):
        load_thucnews_lt(tmp_path / "m")


def test_line_without_tab_names_file_and_line(tmp_path):
    root = _write_set(tmp_path / "t")
    lines = (root / "train.txt").read_text(encoding="utf-8").split("\n")
    lines[2] = lines[2].replace("\t", " ")
    (root / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(LadcError, match=r"train\.txt:3: no TAB") as e:
        load_textfile_lt(root)
    _one_line(e)


def test_unknown_label_and_empty_class(tmp_path):
    root = _write_set(tmp_path / "u")
    lines = (root / "test.txt").read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\tsports"
    (root / "test.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(LadcError, match=r"test\.txt:2: unknown label 'sports'") as e:
        load_textfile_lt(root)
    _one_line(e)
    root = _write_set(tmp_path / "e")
    (root / "class.txt").write_text("a\nb\nc\nd\ne\n", encoding="utf-8")  # class 'e' has no lines
    with pytest.raises(LadcError, match="class 'e' has no training lines"):
        load_textfile_lt(root)


def test_embeddings_of_wrong_shape(tmp_path):
    np.savez(tmp_path / "embedding_x.npz", embeddings=np.zeros((10, 8), dtype=np.float32))
    assert load_embeddings(tmp_path / "embedding_x.npz", 10).shape == (10, 8)
    with pytest.raises(LadcError, match=r"\[10, 8\].*12 tokens") as e:
        load_embeddings(tmp_path / "embedding_x.npz", 12)
    _one_line(e)
    np.savez(tmp_path / "other.npz", weights=np.zeros((12, 8), dtype=np.float32))
    with pytest.raises(LadcError, match="no key 'embeddings'"):
        load_embeddings(tmp_path / "other.npz", 12)
    # a vocabulary that does not match the data folder's embedding file
    root = _write_set(tmp_path / "v")
    (root / "vocab.txt").write_text("\n".join(list(FILLER) + [UNK, PAD]), encoding="utf-8")
    np.savez(root / "embedding_small.npz", embeddings=np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(LadcError, match="embedding_small.npz holds embeddings of shape"):
        load_textfile_lt(root, imbalance_factor=10)
