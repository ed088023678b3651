"""Conditioning encoders tau_theta(y) of latent diffusion (Rombach et al. 2022, Sec. 3.3).

The UNet (`minildm.unet`) attends to a context sequence (B, L, dim); this module turns a condition y
into one:

- `ClassEmbedder`: a class label -> a length-1 sequence (B, 1, dim), with a learned null class for
  classifier-free guidance (Ho & Salimans 2022).
- `WordTokenizer` + `TextEncoder`: a caption -> word ids -> a transformer's token features (B, L, dim).
  As in the paper's text-to-image model, the encoder is a small transformer trained jointly with the
  UNet, from scratch (no pretrained weights).

Classifier-free guidance needs an "unconditional" context too: the null class for labels, and the empty
caption "" for text, which encodes to <bos> <eos> followed by padding. `ClassEmbedder.drop` and
`drop_captions` replace conditions by these with probability p during training (condition dropout).

Data flows one way: this module does not import `minildm.unet`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from minildm.device import may_read_values


@dataclass
class TextConfig:
    """The caption encoder trained jointly with the UNet (no pretrained weights): `TextEncoder` and how the
    `Denoiser` (denoiser.py) uses its features."""

    dim: int = 256
    depth: int = 2
    heads: int = 4
    max_length: int = 32  # tokens, <bos> and <eos> included; the longest Shapes caption needs 29
    mask_padding: bool = True  # the UNet's cross-attention ignores <pad> tokens



SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIAL_TOKENS))


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the drop probability p must lie in [0, 1], got {p}")


# --------------------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------------------


class ClassEmbedder(nn.Module):
    """Class label (B,) -> learned embedding as a length-1 context sequence (B, 1, dim).

    Index `num_classes` is the null class: the "no condition" input of classifier-free guidance.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        self._check(labels)
        return self.embedding(labels)[:, None, :]  # (B, 1, dim)

    def drop(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability p (condition dropout for guidance)."""
        _check_probability(p)
        self._check(labels)
        where = generator.device if generator is not None else labels.device
        dropped = torch.rand(labels.shape, generator=generator, device=where).to(labels.device) < p
        return torch.where(dropped, torch.full_like(labels, self.null_class), labels)

    def _check(self, labels: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.ndim != 1:
            raise ValueError("class labels must be an integer tensor of shape (B,), got "
                             f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.numel() and may_read_values(labels):
            low, high = labels.min().item(), labels.max().item()
            if low < 0 or high > self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} "
                                 f"classes, {self.null_class} = the null class), got values in [{low}, {high}]")


# --------------------------------------------------------------------------------------------------
# Captions: tokenizer
# --------------------------------------------------------------------------------------------------


def split_words(text: str) -> list[str]:
    """Lower-case and cut into words: runs of letters and digits; spaces and punctuation separate them."""
    return re.findall(r"[^\W_]+", text.lower())


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    Ids: <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3, then the words in the order given. A caption becomes
    [<bos>, word ids..., <eos>, <pad>, ...]; words outside the vocabulary become <unk>.
    """

    def __init__(self, words: list[str]):
        pieces = dict.fromkeys(piece for word in words for piece in split_words(word))  # ordered, unique
        self.vocab: list[str] = list(SPECIAL_TOKENS) + list(pieces)
        self.index = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: list[str]) -> WordTokenizer:
        """A tokenizer knowing every word of `texts`, in sorted order."""
        return cls(sorted({word for text in texts for word in split_words(text)}))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        """[<bos>, word ids..., <eos>] for one caption, unpadded."""
        return [BOS] + [self.index.get(word, UNK) for word in split_words(text)] + [EOS]

    def tokens(self, text: str) -> list[str]:
        """The token strings at the positions `encode` fills, <bos>/<eos> and <unk> included
        (labels for per-token attention maps)."""
        return [self.vocab[i] for i in self.ids(text)]

    def encode(self, texts: list[str] | str, max_length: int, truncate: bool = False) -> torch.Tensor:
        """Captions -> LongTensor (B, max_length) of ids, padded with <pad>.

        A caption longer than max_length tokens (<bos> and <eos> included) is an error unless `truncate`,
        which cuts it and keeps the final <eos>.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for <bos> and <eos>), got {max_length}")
        out = torch.full((len(texts), max_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)
            if len(ids) > max_length:
                if not truncate:
                    raise ValueError(f"caption {text!r} needs {len(ids)} tokens (with <bos> and <eos>) but "
                                     f"max_length={max_length}; raise max_length or pass truncate=True")
                ids = ids[: max_length - 1] + [EOS]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor | list) -> str | list[str]:
        """Ids (L,) -> caption, or (B, L) -> list of captions; stops at <eos>, skips <pad> and <bos>."""
        ids = torch.as_tensor(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        words = []
        for i in ids.tolist():
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.vocab[i])
        return " ".join(words)

    def state_dict(self) -> dict[str, list[str]]:
        """The vocabulary as a plain list of words (fits a weights-only checkpoint)."""
        return {"words": self.vocab[len(SPECIAL_TOKENS):]}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[str]]) -> WordTokenizer:
        return cls(state["words"])


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty caption "" with probability p (condition dropout for guidance).

    `generator` must be a CPU generator (or None).
    """
    _check_probability(p)
    dropped = (torch.rand(len(captions), generator=generator) < p).tolist()
    return ["" if drop else caption for caption, drop in zip(captions, dropped)]


def check_prompts(tokenizer, prompts, batch: int | None = None, max_length: int | None = None) -> list[str]:
    """Prompts for a model with `tokenizer`: a list of str (or one str for the whole batch).

    Words the model never saw in training are an error (the tokenizer would turn them into <unk>, which the model
    never learned to read), naming them. An empty prompt (or one of spaces and punctuation only) is allowed, with a
    warning: the model then draws without a caption (the unconditional branch of classifier-free guidance, which the
    dropped captions of training taught it), and guidance cannot sharpen it, since both branches see "".
    A prompt longer than `max_length` tokens (<bos> and <eos> included) is an error when `max_length` is given.
    """
    if isinstance(prompts, str):
        prompts = [prompts] * (batch or 1)
    prompts = list(prompts)
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; pass one prompt per image (or one str)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} must be a str, got {type(prompt).__name__}")
        words = split_words(prompt)
        unknown = sorted({w for w in words if w not in tokenizer.index})
        if unknown:
            raise ValueError(f"prompt {prompt!r} has words the model never saw in training: {unknown}. It knows the "
                             f"{tokenizer.vocab_size - len(SPECIAL_TOKENS)} words of its training captions (e.g. "
                             "'a big red circle at the top left'); unknown words would reach it as <unk>")
        if max_length is not None and len(words) + 2 > max_length:
            raise ValueError(f"prompt {i} needs {len(words) + 2} tokens (with <bos> and <eos>) but the model reads at "
                             f"most {max_length}; shorten it (a Shapes caption names at most 3 objects)")
        if not words:
            warnings.warn(f"prompt {i} is empty: the model draws without a caption there (classifier-free "
                          "guidance has nothing to amplify)", UserWarning, stacklevel=2)
    return prompts


# --------------------------------------------------------------------------------------------------
# Captions: text encoder
# --------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Token ids (B, L) -> token features (B, L, dim): the tau_theta of the text-to-image model.

    token embedding + learned positional embedding -> `depth` pre-norm transformer encoder layers
    (self-attention + GELU MLP of width 4 * dim) -> LayerNorm. Padding tokens are masked out as keys, so
    the features of the real tokens do not depend on how much padding follows them. The outputs at
    padding positions exist too (they attend to the real tokens, so each one is a summary of the whole
    caption); the UNet's cross-attention should mask them out (`Denoiser` does, with `TextConfig.mask_padding`).

    The empty caption "" (ids <bos> <eos> <pad>...) gives the unconditional context of classifier-free
    guidance; it is learned like any other caption when captions are dropped with `drop_captions`.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int = 2, heads: int = 4, max_length: int = 16,
                 dropout: float = 0.0, pad_id: int = PAD):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TextEncoder: dim={dim} must be divisible by heads={heads}")
        self.vocab_size, self.max_length, self.pad_id = vocab_size, max_length, pad_id
        # Token and position embeddings start at the same scale (std 0.02, as GPT-2). nn.Embedding's default
        # N(0, 1) would be 50x larger than the positions: the encoder would start blind to word order, a bag of
        # words that cannot tell "a red circle and a blue square" from "a blue circle and a red square".
        self.token_emb = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(max_length, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids)
        padding = ids == self.pad_id  # (B, L), True = ignored as a key
        h = self.token_emb(ids) + self.pos_emb[: ids.shape[1]]  # (B, L, dim)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
        return self.norm(h)

    def _check(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.ndim != 2:
            raise ValueError("TextEncoder expects token ids as an integer tensor (B, L) (from "
                             f"WordTokenizer.encode), got {type(ids).__name__} {getattr(ids, 'dtype', '')} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"TextEncoder was built with max_length={self.max_length} but got "
                             f"{ids.shape[1]} tokens; encode with max_length={self.max_length}")
        if ids.numel() and may_read_values(ids):  # the range check reads the ids on the host
            low, high = ids.min().item(), ids.max().item()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size="
                                 f"{self.vocab_size}), got values in [{low}, {high}]; was the encoder built "
                                 "with the tokenizer's vocab_size?")
