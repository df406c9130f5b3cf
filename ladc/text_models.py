"""Text backbones with the `features(x)` / `classifier` split of `ladc.models` (LADC Table 5).

Input: int64 token ids [B, L], padded at the end with `pad_id`. Each model embeds the tokens
(optionally from a pre-trained matrix, kept trainable, as the reference code does), then:

- `textcnn`: TextCNN (Kim 2014; the paper cites Kalchbrenner et al. 2014): filters of widths 2/3/4,
  256 maps each, ReLU, max-pool over time, concat, dropout 0.5 -> 768-d.
- `textrnn`: TextRNN (Liu, Qiu, and Huang 2016): 2-layer bidirectional LSTM, hidden 128; feature =
  final forward state (at the last real token) concat final backward state -> 256-d.
- `transformer`: Transformer encoder (Vaswani et al. 2017): 200-d embedding projected to 256,
  sinusoidal positions, 2 layers, 4 heads, mean over non-pad tokens -> 256-d.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LadcError, check


def _embedding(vocab_size: int, embed_dim: int, pad_id: int, embeddings) -> nn.Embedding:
    """Token embedding; initialised from `embeddings` [vocab_size, d] (trainable) when given,
    whose width then sets the embedding size. The `<PAD>` row receives no gradient."""
    check(0 <= pad_id < vocab_size, f"pad id {pad_id} is outside the vocabulary of {vocab_size}: "
                                    f"pass the id of <PAD>")
    if embeddings is None:
        return nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    check(emb.dim() == 2 and emb.shape[0] == vocab_size,
          f"embeddings of shape {list(emb.shape)} do not fit the vocabulary of {vocab_size} tokens: "
          f"give a [{vocab_size}, dim] matrix whose row i is token i")
    layer = nn.Embedding(vocab_size, emb.shape[1], padding_idx=pad_id)
    with torch.no_grad():
        layer.weight.copy_(emb)
    return layer


class TextModel(nn.Module):
    """Shared parts: embedding, `classifier`, `forward = classifier(features(x))`."""

    feature_dim: int

    def __init__(self, vocab_size: int, embed_dim: int, pad_id: int | None, embeddings):
        super().__init__()
        self.pad_id = vocab_size - 1 if pad_id is None else int(pad_id)
        self.embedding = _embedding(vocab_size, embed_dim, self.pad_id, embeddings)
        self.embed_dim = self.embedding.embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TextCNN(TextModel):
    def __init__(self, num_classes: int, vocab_size: int, embed_dim: int = 200, pad_id: int | None = None,
                 embeddings=None, widths=(2, 3, 4), maps: int = 256, dropout: float = 0.5):
        super().__init__(vocab_size, embed_dim, pad_id, embeddings)
        self.widths = tuple(widths)
        self.convs = nn.ModuleList(nn.Conv1d(self.embed_dim, maps, k) for k in self.widths)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = maps * len(self.widths)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        e = self.embedding(x).transpose(1, 2)  # [B, d, L]
        if e.shape[2] < max(self.widths):  # sequences shorter than the widest filter
            e = F.pad(e, (0, max(self.widths) - e.shape[2]))
        pooled = [F.relu(conv(e)).amax(dim=2) for conv in self.convs]
        return self.dropout(torch.cat(pooled, dim=1))


class TextRNN(TextModel):
    def __init__(self, num_classes: int, vocab_size: int, embed_dim: int = 200, pad_id: int | None = None,
                 embeddings=None, hidden: int = 128, layers: int = 2, dropout: float = 0.5):
        super().__init__(vocab_size, embed_dim, pad_id, embeddings)
        self.lstm = nn.LSTM(self.embed_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.feature_dim = 2 * hidden
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        lengths = (x != self.pad_id).sum(1).clamp(min=1).cpu()  # pads trail; an empty line reads one pad
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(x), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: [layers * 2, B, hidden], original batch order
        return torch.cat([h[-2], h[-1]], dim=1)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim] sinusoidal position encoding of Vaswani et al. (2017)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class TextTransformer(TextModel):
    def __init__(self, num_classes: int, vocab_size: int, embed_dim: int = 200, pad_id: int | None = None,
                 embeddings=None, d_model: int = 256, heads: int = 4, layers: int = 2, ff: int = 512,
                 dropout: float = 0.1, max_len: int = 512):
        super().__init__(vocab_size, embed_dim, pad_id, embeddings)
        check(d_model % heads == 0, f"d_model {d_model} is not divisible by {heads} heads: pick a multiple")
        self.proj = nn.Linear(self.embed_dim, d_model)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = d_model
        self.classifier = nn.Linear(d_model, num_classes)

    def features(self, x):
        check(x.shape[1] <= self.positions.shape[0],
              f"sequences of {x.shape[1]} tokens exceed the transformer's {self.positions.shape[0]} positions: "
              f"lower max_len")
        pad = x == self.pad_id
        pad[:, 0] &= ~pad.all(1)  # an all-pad line attends to its first position (no NaN)
        h = self.dropout(self.proj(self.embedding(x)) + self.positions[: x.shape[1]])
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(2).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1)


TEXT_BACKBONES = {"textcnn": TextCNN, "textrnn": TextRNN, "transformer": TextTransformer}


def create_text_model(name: str, num_classes: int, vocab_size: int, embeddings=None, pad_id: int | None = None,
                      embed_dim: int = 200) -> TextModel:
    """Text backbone factory by name. `pad_id` defaults to the last token (THUCNews' `<PAD>`)."""
    if name not in TEXT_BACKBONES:
        raise LadcError(f"unknown text backbone '{name}': choose one of {', '.join(TEXT_BACKBONES)}")
    return TEXT_BACKBONES[name](num_classes, vocab_size, embed_dim=embed_dim, pad_id=pad_id, embeddings=embeddings)
