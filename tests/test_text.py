"""Tests for minildm.text: the word tokenizer, the class embedder with its null class, caption dropout and
the text encoder's padding mask."""

import io
import math

import pytest
import torch

from minildm.text import (
    BOS,
    EOS,
    PAD,
    UNK,
    ClassEmbedder,
    TextEncoder,
    WordTokenizer,
    drop_captions,
)

TEXTS = ["A red circle at the top-left.", "a blue square, bottom right", "Two green triangles!"]


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer.from_texts(TEXTS)


# ------------------------------------------------------------------------------------------------
# WordTokenizer
# ------------------------------------------------------------------------------------------------


def test_vocabulary_layout(tok):
    assert tok.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    words = tok.vocab[4:]
    assert words == sorted(words) and len(set(words)) == len(words)
    assert {"top", "left", "red", "two", "triangles"} <= set(words)  # lower-cased, split on punctuation
    assert tok.vocab_size == 4 + len(words)
    assert WordTokenizer(["Top-left", "top", "red"]).vocab[4:] == ["top", "left", "red"]


def test_encode_decode_round_trip(tok):
    ids = tok.encode(TEXTS, max_length=10)
    assert ids.shape == (3, 10) and ids.dtype == torch.long
    assert tok.decode(ids) == ["a red circle at the top left", "a blue square bottom right",
                               "two green triangles"]
    assert tok.decode(ids[2]) == "two green triangles"
    assert tok.decode(ids[2].tolist()) == "two green triangles"


def test_padding_and_special_tokens(tok):
    ids = tok.encode(["two green triangles", ""], max_length=8)
    g, t = tok.index["green"], tok.index["triangles"]
    assert ids[0].tolist() == [BOS, tok.index["two"], g, t, EOS, PAD, PAD, PAD]
    assert ids[1].tolist() == [BOS, EOS] + [PAD] * 6  # the empty caption: the unconditional input
    assert torch.equal(tok.encode("two green triangles", 8), ids[:1])  # one string = a batch of one


def test_unknown_words_become_unk(tok):
    ids = tok.encode(["a purple circle"], max_length=6)
    assert ids[0].tolist() == [BOS, tok.index["a"], UNK, tok.index["circle"], EOS, PAD]
    assert tok.decode(ids[0]) == "a <unk> circle"


def test_tokens_label_the_encoded_positions(tok):
    text = "A purple circle, top left"
    tokens = tok.tokens(text)
    assert tokens == ["<bos>", "a", "<unk>", "circle", "top", "left", "<eos>"]
    ids = tok.encode([text], max_length=9)[0]
    assert [tok.vocab[i] for i in ids[: len(tokens)]] == tokens and ids[len(tokens):].eq(PAD).all()


def test_too_long_captions(tok):
    with pytest.raises(ValueError, match=r"needs 9 tokens .* but max_length=5; raise max_length or pass truncate"):
        tok.encode([TEXTS[0]], max_length=5)
    cut = tok.encode([TEXTS[0]], max_length=5, truncate=True)[0]
    assert cut.tolist() == [BOS, tok.index["a"], tok.index["red"], tok.index["circle"], EOS]
    with pytest.raises(ValueError, match=r"max_length must be at least 2"):
        tok.encode(["a"], max_length=1)


def test_state_round_trip_through_a_weights_only_checkpoint(tok):
    state = tok.state_dict()
    assert state == {"words": tok.vocab[4:]}
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    loaded = WordTokenizer.from_state_dict(torch.load(buffer, weights_only=True)["tokenizer"])
    assert loaded.vocab == tok.vocab
    assert torch.equal(loaded.encode(TEXTS + ["an unknown word"], 12), tok.encode(TEXTS + ["an unknown word"], 12))


# ------------------------------------------------------------------------------------------------
# ClassEmbedder and condition dropout
# ------------------------------------------------------------------------------------------------


def test_class_embedder_shape_and_null_class():
    emb = ClassEmbedder(num_classes=10, dim=6)
    assert emb.null_class == 10
    out = emb(torch.tensor([0, 3, 10]))
    assert out.shape == (3, 1, 6)
    assert torch.equal(out[2, 0], emb.embedding.weight[10])
    assert not torch.equal(out[0, 0], out[2, 0])


@pytest.mark.parametrize("labels", [torch.tensor([0, 11]), torch.tensor([-1, 2])])
def test_class_embedder_range_error(labels):
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\] \(10 classes, 10 = the null class\)"):
        ClassEmbedder(10, 6)(labels)


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])])
def test_class_embedder_type_and_shape_errors(labels):
    with pytest.raises(ValueError, match=r"integer tensor of shape \(B,\)"):
        ClassEmbedder(10, 6)(labels)


def test_class_dropout_rate_and_kept_labels():
    emb, n, p = ClassEmbedder(10, 4), 20000, 0.3
    labels = torch.arange(n) % 10
    dropped = emb.drop(labels, p, generator=torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(emb.drop(labels, 0.0), labels)
    assert emb.drop(labels, 1.0).eq(10).all()
    again = emb.drop(labels, p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)
    with pytest.raises(ValueError, match=r"drop probability p must lie in \[0, 1\]"):
        emb.drop(labels, 1.5)


def test_caption_dropout_rate():
    captions, p = [f"caption {i}" for i in range(8000)], 0.25
    out = drop_captions(captions, p, generator=torch.Generator().manual_seed(0))
    empty = [c == "" for c in out]
    assert abs(sum(empty) / len(out) - p) < 4 * math.sqrt(p * (1 - p) / len(out))
    assert all(o == c for o, c, e in zip(out, captions, empty) if not e)
    assert drop_captions(captions[:5], 0.0) == captions[:5] and drop_captions(captions[:5], 1.0) == [""] * 5
    with pytest.raises(ValueError, match=r"drop probability"):
        drop_captions(captions, -0.1)


# ------------------------------------------------------------------------------------------------
# TextEncoder
# ------------------------------------------------------------------------------------------------


def _encoder(tok, **kw) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(tok.vocab_size, dim=16, depth=2, heads=2, max_length=12, **kw)


def test_text_encoder_shape_and_dependence_on_words(tok):
    enc = _encoder(tok)
    out = enc(tok.encode(TEXTS + [""], 12))
    assert out.shape == (4, 12, 16) and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().amax() > 1e-3


@pytest.mark.parametrize("train", [True, False])
def test_real_token_features_ignore_padding(tok, train):
    enc = _encoder(tok).train(train)
    text = ["two green triangles"]  # 5 real tokens
    with torch.set_grad_enabled(train):
        short, long = enc(tok.encode(text, 5)), enc(tok.encode(text, 12))
    torch.testing.assert_close(short, long[:, :5], atol=1e-5, rtol=1e-5)


def test_text_encoder_trains_every_parameter(tok):
    enc = _encoder(tok)
    enc(tok.encode(TEXTS, 12)).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_text_encoder_errors(tok):
    enc = _encoder(tok)
    with pytest.raises(ValueError, match=r"built with max_length=12 but got 13 tokens"):
        enc(tok.encode(["a"], 13))
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {tok.vocab_size - 1}\]"):
        enc(torch.tensor([[BOS, tok.vocab_size, EOS]]))
    with pytest.raises(ValueError, match=r"integer tensor \(B, L\)"):
        enc(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"dim=10 must be divisible by heads=4"):
        TextEncoder(tok.vocab_size, dim=10, heads=4)


def test_fresh_encoder_is_not_a_bag_of_words(tok):
    """Swapping which object is red and which is blue must change the feature of the position words at
    initialisation already: with token embeddings 50x larger than the positional ones (nn.Embedding's N(0, 1)
    default) each feature was its own word's embedding to 0.1%, and the UNet could not bind a colour to a place."""
    torch.manual_seed(0)
    enc = TextEncoder(tok.vocab_size, dim=64, depth=2, heads=4, max_length=16)
    a = enc(tok.encode("a red circle at the left and a blue square at the right", 16))[0]
    b = enc(tok.encode("a blue circle at the left and a red square at the right", 16))[0]
    for i, word in ((6, "left"), (13, "right"), (3, "circle")):
        assert tok.tokens("a red circle at the left and a blue square at the right")[i] == word
        change = ((a[i] - b[i]).norm() / a[i].norm()).item()
        assert change > 0.03, f"feature of {word!r} changed by {change:.4f} only"
