"""Long-tailed text classification data: THUCNews-LT and user text files.

Headlines are tokenised character by character through a vocabulary (line i of `vocab.txt` = token
id i, as in the reference code of 649453932/Chinese-Text-Classification-Pytorch that the LADC paper
names for its THUCNews experiments) and padded / cut to `max_len` ids. The long-tailed training set
uses the exponential profile and the seeded per-class subset of the image sets (`ladc.data`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import LTData, holdout_split, longtail_counts, select_longtail
from .errors import LadcError, check

UNK, PAD, SPACE = "<UNK>", "<PAD>", "<SPACE>"
THUCNEWS_ROOT = "./data/thucnews"


# ----------------------------------------------------------------------------- vocabulary

class Vocab:
    """Token list (id = position) with a vectorised character -> id lookup.
    `<SPACE>` stands for " "; every other entry is one character, except `<UNK>` and `<PAD>`."""

    def __init__(self, tokens: list[str], source: str = "vocabulary"):
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        for special in (UNK, PAD):
            check(special in self.index, f"{source} has no {special} entry: add a line '{special}' "
                                         f"(the embedding row for it must match its line)")
        self.unk_id, self.pad_id = self.index[UNK], self.index[PAD]
        chars, ids = [], []
        for i, t in enumerate(self.tokens):
            ch = " " if t == SPACE else t
            if len(ch) == 1 and ord(ch) != 0:
                chars.append(ord(ch))
                ids.append(i)
        order = np.argsort(chars, kind="stable")
        self._codes = np.asarray(chars, dtype=np.uint32)[order]
        self._ids = np.asarray(ids, dtype=np.int64)[order]

    def __len__(self) -> int:
        return len(self.tokens)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Unicode code points (0 = padding) -> token ids."""
        if len(self._codes) == 0:
            out = np.full(codes.shape, self.unk_id, dtype=np.int64)
        else:
            pos = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
            out = np.where(self._codes[pos] == codes, self._ids[pos], self.unk_id)
        return np.where(codes == 0, self.pad_id, out)


def load_vocab(path: str | Path) -> Vocab:
    """One token a line, line i = token id i (`<SPACE>` for " ", plus `<UNK>` and `<PAD>`)."""
    path = Path(path)
    check(path.is_file(), f"vocabulary {path} is missing: give one token a line (line i = id i), "
                          f"or leave it out to build a character vocabulary from the training text")
    tokens = [t.rstrip("\r") for t in path.read_text(encoding="utf-8-sig").split("\n")]
    if tokens and tokens[-1] == "":
        tokens.pop()
    for i, t in enumerate(tokens, 1):
        check(t != "", f"{path}:{i}: empty line: every line must hold one token (write a space as {SPACE})")
    dup = [t for t, n in Counter(tokens).items() if n > 1]
    if dup:
        raise LadcError(f"{path}: token {dup[0]!r} appears twice: keep one line per token")
    return Vocab(tokens, str(path))


def build_vocab(texts: list[str]) -> Vocab:
    """Character vocabulary from training text, most frequent first (ties by character),
    then `<UNK>` and `<PAD>`, as the reference code builds its vocabulary."""
    freq = Counter(ch for t in texts for ch in t if ch != "\x00")
    chars = sorted(freq, key=lambda ch: (-freq[ch], ch))
    return Vocab([SPACE if ch == " " else ch for ch in chars] + [UNK, PAD], "built vocabulary")


def tokenize(text: str | list[str], vocab: Vocab, max_len: int = 32) -> torch.Tensor:
    """Character ids, cut to / padded with `<PAD>` up to `max_len`: int64 [N, max_len] ([max_len]
    for one string). Unknown characters -> `<UNK>`. A NUL character counts as padding."""
    check(max_len >= 1, f"max_len {max_len} is below 1: use a positive token length")
    single = isinstance(text, str)
    lines = [text] if single else list(text)
    if not lines:
        return torch.empty((0, max_len), dtype=torch.int64)
    # fixed-width UCS-4 strings: numpy cuts each line to max_len and zero-fills the rest
    codes = np.asarray(lines, dtype=f"<U{max_len}").view(np.uint32).reshape(len(lines), max_len)
    ids = torch.from_numpy(vocab.lookup(codes))
    return ids[0] if single else ids


# ----------------------------------------------------------------------------- files

def _read_labelled(path: Path) -> tuple[list[str], list[str], list[int]]:
    """`text<TAB>label` lines -> (texts, raw labels, line numbers); blank lines are skipped.
    Each line is split at its last TAB; text and label are stripped of surrounding whitespace."""
    check(path.is_file(), f"{path} is missing: give one 'text<TAB>label' line per example")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LadcError(f"{path} is not UTF-8 (byte {e.start}): save it as UTF-8 text") from None
    texts, labels, lines = [], [], []
    for i, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        text, tab, label = line.rstrip("\r\n").rpartition("\t")
        text = text.strip()
        check(tab == "\t", f"{path}:{i}: no TAB between text and label: write the line as text<TAB>label")
        label = label.strip()
        check(label != "", f"{path}:{i}: empty label after the TAB: write the line as text<TAB>label")
        texts.append(text)
        labels.append(label)
        lines.append(i)
    check(texts, f"{path} holds no 'text<TAB>label' lines: fill it or point data_root at another folder")
    return texts, labels, lines


def _read_classes(path: Path) -> list[str]:
    names = [n.strip() for n in path.read_text(encoding="utf-8-sig").split("\n")]
    while names and names[-1] == "":
        names.pop()
    for i, n in enumerate(names, 1):
        check(n != "", f"{path}:{i}: empty class name: write one class name a line (line i = label i)")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise LadcError(f"{path}: class name '{dup[0]}' appears twice: keep one line per class")
    check(names, f"{path} lists no classes: write one class name a line (line i = label i)")
    return names


def _encode_labels(path: Path, raw: list[str], lines: list[int], classes: list[str]) -> np.ndarray:
    """Raw labels -> class ids. A label of digits is an id into `classes`; otherwise a class name."""
    name_to_id = {n: i for i, n in enumerate(classes)}
    out = np.empty(len(raw), dtype=np.int64)
    for k, (lab, ln) in enumerate(zip(raw, lines)):
        if lab.isdigit() and int(lab) < len(classes):
            out[k] = int(lab)
        elif lab in name_to_id:
            out[k] = name_to_id[lab]
        else:
            raise LadcError(f"{path}:{ln}: unknown label '{lab}': use a class name or an id 0..{len(classes) - 1} "
                            f"({len(classes)} classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return out


def _infer_classes(raw: list[str]) -> list[str]:
    """Classes without class.txt: ids 0..max when every label is an integer, else sorted names."""
    if all(lab.isdigit() for lab in raw):
        return [str(i) for i in range(max(int(lab) for lab in raw) + 1)]
    return sorted(set(raw))


def load_embeddings(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Pre-trained token embeddings from an npz with key `embeddings`: float32 [vocab_size, d],
    row i = token i (THUCNews: Tencent AI Lab character vectors, Li et al. 2018, [4762, 200])."""
    path = Path(path)
    check(path.is_file(), f"embeddings {path} are missing: give an npz with key 'embeddings' [vocab, dim] "
                          f"or leave embeddings out")
    try:
        with np.load(path) as z:
            check("embeddings" in z.files, f"{path} has no key 'embeddings' (keys: {', '.join(z.files)}): "
                                           f"save the matrix as np.savez(path, embeddings=matrix)")
            emb = np.asarray(z["embeddings"])
    except LadcError:
        raise
    except Exception as e:  # not a zip / corrupt file
        raise LadcError(f"{path} is not a readable npz ({type(e).__name__}): save it with "
                        f"np.savez(path, embeddings=matrix)") from None
    check(emb.ndim == 2 and emb.shape[0] == vocab_size,
          f"{path} holds embeddings of shape {list(emb.shape)}, the vocabulary has {vocab_size} tokens: "
          f"give a [{vocab_size}, dim] matrix whose row i is token i of vocab.txt")
    check(np.issubdtype(emb.dtype, np.floating) and np.isfinite(emb).all(),
          f"{path}: embeddings must be finite floats: replace NaN/inf rows")
    return torch.from_numpy(emb.astype(np.float32))


def _find_embeddings(root: Path, embeddings) -> Path | None:
    """`embeddings`: "auto" (the one embedding*.npz in root, if any), None/False (none), or a path."""
    if embeddings is None or embeddings is False:
        return None
    if embeddings != "auto":
        p = Path(embeddings)
        return p if p.is_absolute() or p.exists() else root / p
    found = sorted(root.glob("embedding*.npz"))
    check(len(found) <= 1, f"{root} holds several embedding files ({', '.join(f.name for f in found)}): "
                           f"pick one with embeddings='<file>'")
    return found[0] if found else None


# ----------------------------------------------------------------------------- dataset

@dataclass
class TextLTData(LTData):
    """`LTData` for text: x tensors are int64 token ids [N, max_len]; `vocab` maps ids to tokens and
    `embeddings` is the pre-trained [vocab_size, d] matrix or None. mean/std are unused."""

    vocab: Vocab | None = None
    embeddings: torch.Tensor | None = None

    @property
    def token_len(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id


def _longtail_split(path: Path, y: np.ndarray, C: int, classes: list[str], imbalance_factor, seed: int,
                    val_per_class: int, val_fraction: float, n_max: int | None):
    """Train / validation indices of the pool `y`: a seeded long-tailed subset (profile assigned by
    class size, the largest pool class gets n_max) or, with imbalance_factor None, a seeded hold-out."""
    avail = np.bincount(y, minlength=C)
    empty = [classes[c] for c in range(C) if avail[c] == 0]
    if empty:
        raise LadcError(f"{path}: class '{empty[0]}' has no training lines: add lines for it or drop it "
                        f"from class.txt")
    if imbalance_factor is None:
        tr, va = holdout_split(y, C, seed, val_fraction)
        return tr, va, [], None
    check(isinstance(imbalance_factor, (int, float)) and imbalance_factor >= 1,
          f"imbalance factor {imbalance_factor} is out of range: use a number >= 1 (1 = balanced) or None")
    top = int(avail.max()) if n_max is None else int(n_max)
    counts = longtail_counts(top, C, imbalance_factor)
    check(counts[-1] >= 1, f"imbalance factor {imbalance_factor} leaves the smallest class with "
                           f"{counts[-1]} lines (n_max {top}): lower the imbalance factor")
    order = np.argsort(-avail, kind="stable")
    prof = np.zeros(C, dtype=np.int64)
    prof[order] = counts
    for c in range(C):
        check(avail[c] >= prof[c], f"{path}: class '{classes[c]}' has {avail[c]} lines, the long-tailed "
                                   f"profile needs {prof[c]}: lower n_max or set imbalance_factor to None")
    tr, va, notes = select_longtail(y, prof.tolist(), seed, val_per_class)
    return tr, va, [n.replace(" images", " lines") for n in notes], prof.tolist()


def _assemble(name: str, root: Path, train_path: Path, texts, y, test_texts, test_y, classes, vocab,
              emb_path, tr, va, notes, profile, extra: dict, max_len: int) -> TextLTData:
    C = len(classes)
    train_counts = np.bincount(y[tr], minlength=C)
    empty = [classes[c] for c in range(C) if train_counts[c] == 0]
    if empty:
        raise LadcError(f"{train_path}: class '{empty[0]}' ends up with no training lines: add lines for it")
    if vocab is None:
        vocab = build_vocab([texts[i] for i in tr])
        notes = notes + [f"no vocab.txt: built a {len(vocab)}-token character vocabulary from the training lines"]
    emb = load_embeddings(emb_path, len(vocab)) if emb_path is not None else None
    pick = lambda idx: tokenize([texts[i] for i in idx], vocab, max_len)  # noqa: E731
    spec = dict(dataset=name, root=str(root.resolve()), **extra, max_len=int(max_len), vocab_size=len(vocab),
                embeddings=emb_path.name if emb_path is not None else None,
                train_counts=train_counts.tolist(), profile_counts=profile)
    return TextLTData(pick(tr), torch.as_tensor(y[tr]), pick(va), torch.as_tensor(y[va]),
                      tokenize(test_texts, vocab, max_len), torch.as_tensor(test_y), list(classes), spec,
                      mean=(0.0,), std=(1.0,), notes=list(notes), vocab=vocab, embeddings=emb)


def load_textfile_lt(data_root: str | Path, imbalance_factor: float | None = 100, seed: int = 0,
                     val_per_class: int = 100, max_len: int = 32, val_fraction: float = 0.1,
                     n_max: int | None = None, embeddings="auto", train_file: str = "train.txt",
                     test_file: str = "test.txt") -> TextLTData:
    """A user's `train.txt` / `test.txt` of `text<TAB>label` lines (label = id or class name).

    Optional in `data_root`: `class.txt` (line i = name of label i), `vocab.txt` (else a character
    vocabulary is built from the training lines), `embedding*.npz` (needs vocab.txt).
    `imbalance_factor` None uses the training file as it is with a seeded `val_fraction` hold-out;
    a number draws the long-tailed subset (largest class: `n_max`, default its pool size) with
    `val_per_class` validation lines from the left-out ones, as `ladc.data.select_longtail`."""
    root = Path(data_root)
    check(root.is_dir(), f"data root {root} does not exist: pass the folder that holds "
                         f"{train_file} and {test_file} (text<TAB>label lines)")
    check(int(max_len) >= 1, f"max_len {max_len} is below 1: use a positive token length")
    check(val_per_class >= 0, f"val_per_class {val_per_class} is negative: use 0 or more")
    train_path, test_path = root / train_file, root / test_file
    texts, raw, lines = _read_labelled(train_path)
    test_texts, test_raw, test_lines = _read_labelled(test_path)
    if (root / "class.txt").is_file():
        classes = _read_classes(root / "class.txt")
    else:
        classes = _infer_classes(raw)
    y = _encode_labels(train_path, raw, lines, classes)
    test_y = _encode_labels(test_path, test_raw, test_lines, classes)
    vocab = load_vocab(root / "vocab.txt") if (root / "vocab.txt").is_file() else None
    emb_path = _find_embeddings(root, embeddings)
    check(emb_path is None or vocab is not None,
          f"{emb_path} needs the vocab.txt its rows follow: add vocab.txt to {root} or pass embeddings=None")
    tr, va, notes, profile = _longtail_split(train_path, y, len(classes), classes, imbalance_factor, seed,
                                             val_per_class, val_fraction, n_max)
    extra = dict(imbalance_factor=None if imbalance_factor is None else float(imbalance_factor),
                 seed=int(seed), val_per_class=int(val_per_class), val_fraction=float(val_fraction),
                 n_max=n_max, train_file=train_file, test_file=test_file)
    return _assemble("textfile_lt", root, train_path, texts, y, test_texts, test_y, classes, vocab, emb_path,
                     tr, va, notes, profile, extra, max_len)


def load_thucnews_lt(data_root: str | Path = THUCNEWS_ROOT, imbalance_factor: float = 100, seed: int = 0,
                     val_per_class: int = 100, max_len: int = 32, n_max: int | None = None,
                     embeddings="auto") -> TextLTData:
    """THUCNews-LT (Sun et al. 2016; LADC Table 5): the long-tailed training set and the validation
    set are drawn from `dev.txt` (1,000 headlines per class), the test set is `test.txt` (balanced).

    Counts at IF 100 follow 1000 ... 10. `select_longtail` keeps validation disjoint and balanced:
    class 0 keeps its whole pool in the profile, so with `val_per_class` v > 0 its last v lines move
    to validation (train 1000-v for class 0, noted in `notes`); val_per_class=0 gives 1000 ... 10
    exactly (2,478 headlines). `n_max` (default: the pool's 1,000) sets the head count instead, e.g.
    n_max=900 with v=100 keeps the full IF-100 profile 900 ... 9 and a left-out validation set."""
    root = Path(data_root)
    check(root.is_dir(), f"THUCNews folder {root} does not exist: pass the folder with class.txt, dev.txt, "
                         f"test.txt, vocab.txt (e.g. ../shared/data/thucnews) as data_root")
    for f in ("class.txt", "dev.txt", "test.txt", "vocab.txt"):
        check((root / f).is_file(), f"{root / f} is missing: THUCNews needs class.txt, dev.txt, test.txt "
                                    f"and vocab.txt in {root}")
    check(int(max_len) >= 1, f"max_len {max_len} is below 1: use a positive token length")
    check(val_per_class >= 0, f"val_per_class {val_per_class} is negative: use 0 or more")
    check(imbalance_factor is not None, "THUCNews-LT needs an imbalance factor: use a number >= 1 "
                                        "(or load_textfile_lt for the data as it is)")
    classes = _read_classes(root / "class.txt")
    pool_path = root / "dev.txt"
    texts, raw, lines = _read_labelled(pool_path)
    test_texts, test_raw, test_lines = _read_labelled(root / "test.txt")
    y = _encode_labels(pool_path, raw, lines, classes)
    test_y = _encode_labels(root / "test.txt", test_raw, test_lines, classes)
    vocab = load_vocab(root / "vocab.txt")
    tr, va, notes, profile = _longtail_split(pool_path, y, len(classes), classes, imbalance_factor, seed,
                                             val_per_class, 0.0, n_max)
    extra = dict(imbalance_factor=float(imbalance_factor), seed=int(seed), val_per_class=int(val_per_class),
                 n_max=n_max, pool="dev.txt")
    return _assemble("thucnews_lt", root, pool_path, texts, y, test_texts, test_y, classes, vocab,
                     _find_embeddings(root, embeddings), tr, va, notes, profile, extra, max_len)
