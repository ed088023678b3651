"""Checkers for exercise 04 (the denoiser's building blocks): the sinusoidal timestep embedding,
scaled dot-product attention, the head split and one cross-attention layer.
References: minildm.unet (timestep_embedding, attention_reference, Attention)."""

from __future__ import annotations

import math

import torch
from einops import rearrange

from minildm import unet as ref
from minildm.checks import (
    ExerciseError,
    expect_tensor,
    expect_value_error,
    known_mistake,
    passed,
    run,
    written_here,
)


def check_timestep_embedding(fn) -> None:
    """fn(t (B,), dim) -> (B, dim) float32: [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})], zero-padded if dim is odd."""
    name = "timestep_embedding"
    written_here(fn, name)
    for case, t, dim in [("t = 0, dim 8: cos(0) = 1 fills the first half, sin(0) = 0 the second",
                          torch.zeros(3, dtype=torch.long), 8),
                         ("int64 t = [0, 1, 7, 999], dim 32", torch.tensor([0, 1, 7, 999]), 32),
                         ("float t = [0.5, 250.25], dim 6", torch.tensor([0.5, 250.25]), 6),
                         ("odd dim 7, t = [3, 40, 500]", torch.tensor([3, 40, 500]), 7)]:
        got = run(fn, name, case, t, dim)
        expected = ref.timestep_embedding(t, dim)
        half = dim // 2
        cos, sin = expected[:, :half], expected[:, half:2 * half]
        pad = expected[:, 2 * half:]
        i = torch.arange(half, dtype=torch.float32)

        def at(freqs, t=t, pad=pad):  # the embedding with other frequencies
            angles = t.float()[:, None] * freqs[None, :]
            return torch.cat([angles.cos(), angles.sin(), pad], 1)

        known_mistake(got, {
            "the sin and cos halves are swapped: the package (and this exercise) puts the cosines first.":
                torch.cat([sin, cos, pad], 1),
            "cos and sin are interleaved (cos, sin, cos, sin, ...); put all cosines first, then all sines.":
                torch.cat([rearrange(torch.stack([cos, sin], -1), "b h two -> b (h two)"), pad], 1),
            "the frequencies grow: f_i = exp(-ln(10000) i / half) runs from 1 down to about 1/10000; the minus "
            "sign is missing.": at(torch.exp(math.log(10000.0) * i / half)),
            "the exponent is divided by dim; divide by half = dim // 2 (one frequency per cos/sin pair): "
            "f_i = exp(-ln(10000) i / half).": at(torch.exp(-math.log(10000.0) * i / dim)),
            "the exponent is divided by half - 1; this exercise (like the package) divides by half: "
            "f_i = exp(-ln(10000) i / half).": at(torch.exp(-math.log(10000.0) * i / max(half - 1, 1))),
        }, name, case, expected)
        if isinstance(got, torch.Tensor) and dim % 2 and got.shape == (len(t), dim - 1):
            raise ExerciseError(f"{name} ({case}): expected shape {(len(t), dim)}, got {tuple(got.shape)}: "
                                "for an odd dim, append one column of zeros (e.g. torch.nn.functional.pad).")
        expect_tensor(got, expected, name, case, atol=1e-4)
    passed(name, "cosines then sines at frequencies exp(-ln(10000) i / half), odd dims zero-padded")


# ---- 2. attention -----------------------------------------------------------------------------------


def _qkv(seed: int, b=2, h=3, nq=5, nk=4, d=8, dv=6, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).requires_grad_(requires_grad)
                 for shape in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, dv)))


def check_attention(fn) -> None:
    """fn(q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv)) -> softmax(q k^T / sqrt(d)) v (..., Nq, dv)."""
    name = "attention"
    written_here(fn, name)
    q, k, v = _qkv(0)
    same_keys = k[:, :, :1].expand_as(k)
    expect_tensor(run(fn, name, "all keys equal", q, same_keys, v), v.mean(2, keepdim=True).expand(2, 3, 5, 6),
                  name, "all keys equal: every query must weigh the 4 values equally, giving their mean "
                  "(softmax over the keys, the last axis of q k^T)")
    for seed in (1, 2):
        q, k, v = _qkv(seed, d=16)
        case = f"random q (2, 3, 5, 16), k (2, 3, 4, 16), v (2, 3, 4, 6), seed {seed}"
        got = run(fn, name, case, q, k, v)
        scores = q @ k.transpose(-2, -1)
        known_mistake(got, {
            "the scores are not scaled: divide q k^T by sqrt(d), d = q.shape[-1] (Vaswani et al. 2017, eq. 1).":
                scores.softmax(-1) @ v,
            "the scores are divided by d; the scale is 1 / sqrt(d).": (scores / 16).softmax(-1) @ v,
            "the softmax runs over the queries (dim -2); each query's weights over the keys must sum to 1: "
            "softmax over the last axis of q k^T.": (scores / 4).softmax(-2) @ v,
            "the scale uses the width of the values, dv = v.shape[-1]; it is 1 / sqrt(d) with d = q.shape[-1], "
            "the width of the dot products.": (scores / 6**0.5).softmax(-1) @ v,
        }, name, case)
        expect_tensor(got, ref.attention_reference(q, k, v), name, case)
    q, k, v = _qkv(3, requires_grad=True)
    out = run(fn, name, "gradient", q, k, v)
    if not out.requires_grad:
        raise ExerciseError(f"{name}: the output has no gradient; do not detach or use torch.no_grad.")
    out.pow(2).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref.attention_reference(q2, k2, v2).pow(2).sum().backward()
    for label, got_grad, want in (("q", q.grad, q2.grad), ("k", k.grad, k2.grad), ("v", v.grad, v2.grad)):
        expect_tensor(got_grad, want, name, f"gradient w.r.t. {label}", atol=1e-4)
    passed(name, "softmax over keys of q k^T / sqrt(d), times v; works for Nq != Nk, dv != d; gradients flow")


# ---- 3. heads ------------------------------------------------------------------------------------------


def check_split_heads(fn) -> None:
    """fn(x (B, N, heads * d), heads) -> (B, heads, N, d), channel c = i * d + j going to head i, entry j."""
    name = "split_heads"
    written_here(fn, name)
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    for heads in (2, 4, 1):
        case = f"x (2, 3, 8) = arange, heads={heads}"
        got = run(fn, name, case, x, heads)
        d = 8 // heads
        known_mistake(got, {
            "the channels were split as (d, heads); the projections group them as (heads, d): head i owns "
            "channels i*d .. (i+1)*d - 1. Use rearrange(x, 'b n (h d) -> b h n d', h=heads).":
                rearrange(x, "b n (d h) -> b h n d", h=heads),
            "a plain reshape to (B, heads, N, d) mixes tokens and channels; split the channel axis into "
            "(heads, d) first, then move heads in front of N.": x.reshape(2, heads, 3, d),
            "the heads were split off but not moved in front of the tokens: (B, N, heads, d) must become "
            "(B, heads, N, d).": rearrange(x, "b n (h d) -> b n h d", h=heads),
        } if heads > 1 else {}, name, case)
        expect_tensor(got, rearrange(x, "b n (h d) -> b h n d", h=heads), name, case)
    expect_value_error(fn, name, "10 channels, 3 heads", torch.zeros(1, 2, 10), 3,
                       why="names the problem: 10 channels cannot be split into 3 equal heads")
    passed(name, "(B, N, heads*d) -> (B, heads, N, d) in the (heads, d) channel layout; bad head counts raise")


# ---- 4. cross-attention --------------------------------------------------------------------------------


def _layer(seed: int, query_dim: int, context_dim: int, heads: int, head_dim: int) -> ref.Attention:
    with torch.random.fork_rng(devices=[]):  # seed the default (random) initialisation, leave the caller's RNG
        torch.manual_seed(seed)
        return ref.Attention(query_dim, context_dim, heads, head_dim)


def _weights(layer: ref.Attention):
    return layer.to_q.weight, layer.to_k.weight, layer.to_v.weight, layer.to_out.weight, layer.to_out.bias


def _cross_attention_variant(x, context, w_q, w_k, w_v, w_out, b_out, heads, scale_width=None, split="(h d)",
                             merge="(h d)"):
    """Cross-attention with one typical change: scores scaled by 1/sqrt(scale_width) instead of 1/sqrt(head width),
    or the channels split into heads (and merged back) in another layout ("(d h)")."""
    q, k, v = (rearrange(p, f"b n {split} -> b h n d", h=heads)
               for p in (x @ w_q.T, context @ w_k.T, context @ w_v.T))
    scores = q @ k.transpose(-2, -1) / math.sqrt(scale_width or q.shape[-1])
    out = rearrange(scores.softmax(-1) @ v, f"b h n d -> b n {merge}")
    return out @ w_out.T + b_out


def check_cross_attention(fn) -> None:
    """fn(x (B, N, query_dim), context (B, L, context_dim), w_q, w_k, w_v, w_out, b_out, heads) -> (B, N, query_dim),
    the same map as minildm.unet.Attention with those weights."""
    name = "cross_attention"
    written_here(fn, name)
    hint = "Queries come from x, keys and values from context; check the shapes of each step."
    g = torch.Generator().manual_seed(0)
    for case, (n, length, query_dim, context_dim, heads, head_dim) in {
        "x (2, 6, 12), context (2, 5, 10), 3 heads of width 4": (6, 5, 12, 10, 3, 4),
        "x (2, 9, 8), a length-1 context (2, 1, 16) like a class label, 4 heads of width 8": (9, 1, 8, 16, 4, 8),
        "x (2, 4, 6), context (2, 7, 6), one head of width 5": (4, 7, 6, 6, 1, 5),
    }.items():
        layer = _layer(n, query_dim, context_dim, heads, head_dim)
        x, context = torch.randn(2, n, query_dim, generator=g), torch.randn(2, length, context_dim, generator=g)
        with torch.no_grad():
            got = run(fn, name, case, x, context, *_weights(layer), heads, hint=hint)
            weights = _weights(layer)
            mistakes = {"the output bias b_out is missing: the output projection is x @ w_out.T + b_out.":
                        layer(x, context) - layer.to_out.bias,
                        "the scores were scaled by 1 / sqrt(heads * head_dim), the width of all heads together; "
                        "each head is its own attention of width head_dim: scale by 1 / sqrt(head_dim).":
                        _cross_attention_variant(x, context, *weights, heads, scale_width=heads * head_dim),
                        "the channels were split into heads as (head_dim, heads); the projections group them as "
                        "(heads, head_dim): rearrange 'b n (h d) -> b h n d', and back the same way.":
                        _cross_attention_variant(x, context, *weights, heads, split="(d h)"),
                        "the channels were split into heads (and merged back) as (head_dim, heads); the "
                        "projections group them as (heads, head_dim): rearrange 'b n (h d) -> b h n d' and "
                        "'b h n d -> b n (h d)'.":
                        _cross_attention_variant(x, context, *weights, heads, split="(d h)", merge="(d h)")}
            if heads > 1:
                mistakes["the channels were not split into heads: one attention over all heads * head_dim "
                         "channels is not `heads` attentions of width head_dim."] = _cross_attention_variant(
                    x, context, *weights, 1)
            if context_dim == query_dim:
                mistakes["keys and values were computed from x: in cross-attention they come from the "
                         "context (the conditioning sequence), only the queries come from x."] = layer(x)
        known_mistake(got, mistakes, name, case, layer(x, context).detach())
        expect_tensor(got, layer(x, context).detach(), name, case, atol=1e-5)

    layer = _layer(1, 12, 10, 3, 4)
    x, context = torch.randn(2, 6, 12, generator=g), torch.randn(2, 5, 10, generator=g)
    with torch.no_grad():
        a = run(fn, name, "context dependence", x, context, *_weights(layer), 3, hint=hint)
        b = run(fn, name, "context dependence", x, torch.randn(2, 5, 10, generator=g), *_weights(layer), 3)
    if torch.allclose(a, b):
        raise ExerciseError(f"{name}: the output does not change when the context changes; keys and values "
                            "must be computed from the context.")
    out = run(fn, name, "gradient", x, context, *_weights(layer), 3, hint=hint)
    if not out.requires_grad:
        raise ExerciseError(f"{name}: the output has no gradient w.r.t. the weights; do not detach.")
    weight = torch.randn(out.shape, generator=g)
    (out * weight).sum().backward()
    got_grads = [p.grad.clone() for p in _weights(layer)]
    layer.zero_grad()
    (layer(x, context) * weight).sum().backward()
    for label, got_grad, p in zip(("w_q", "w_k", "w_v", "w_out", "b_out"), got_grads, _weights(layer)):
        expect_tensor(got_grad, p.grad, name, f"gradient w.r.t. {label}", atol=1e-4)
    passed(name, "matches minildm.unet.Attention (any context length and width), depends on the context, "
                 "gradients reach every weight")
