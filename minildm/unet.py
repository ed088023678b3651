"""Stage 4: the denoiser eps_theta(x_t, t, context) of latent diffusion, a time-conditional UNet.

Read top to bottom; each piece is one idea:

1. `timestep_embedding`: sinusoidal features of the timestep t (Vaswani et al. 2017, Sec. 3.5; used for
   diffusion by Ho et al. 2020, Sec. 4 and Appendix B).
2. `ResBlock`: GroupNorm-SiLU-conv twice, the time embedding entering as a per-channel scale and shift of
   the second normalisation ("scale-shift norm", Dhariwal & Nichol 2021, Sec. 3).
3. `attention_reference`, `Attention`: softmax(q k^T / sqrt(d)) v with several heads, as self-attention
   (keys from x) or cross-attention (keys from a conditioning sequence).
4. `TransformerBlock`, `SpatialTransformer`: the LDM block through which image features attend to the
   conditioning sequence tau_theta(y) (Rombach et al. 2022, Sec. 3.3, eq. (2) and Appendix E.2).
5. `UNetConfig`, `DownLevel`, `MidBlock`, `UpLevel`, `UNet`: the UNet of Ho et al. 2020 (Appendix B), one
   down and one up level per resolution, with the blocks above at the levels named in
   `UNetConfig.attention_levels`; each DownLevel keeps the skips that the UpLevel of its resolution reads.
6. `old_layout_names`: checkpoints saved before the UNet was built of levels still load.

Conditioning: the UNet knows only a `context` sequence of shape (B, L, context_dim). Class labels become a
length-1 sequence (`minildm.text.ClassEmbedder`), captions a sequence of token features
(`minildm.text.TextEncoder`). Both live in `minildm.text`; this module imports nothing from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minildm.device import may_read_values
from minildm.layers import Downsample, Upsample, group_norm, parameter_counts, zero_init  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 1. Timestep embedding
# --------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) (int or float) -> (B, dim).

    Ordering: [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})] with h = dim // 2 and
    frequencies f_i = exp(-ln(max_period) * i / h), from 1 down to nearly 1/max_period. An odd `dim` gets
    one column of zeros at the end.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))


# --------------------------------------------------------------------------------------------------
# 2. Residual block with scale-shift time conditioning
# --------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale) + shift with (scale, shift) = Linear(emb);
    out = skip(x) + conv(dropout(SiLU(h))).

    The scale-shift norm of Dhariwal & Nichol 2021 (Sec. 3): the timestep modulates every channel after
    normalisation. `emb` (B, time_dim) is the UNet's time embedding after a SiLU (the UNet applies it
    once for all blocks). The last conv starts at zero, so a fresh block is the identity (plus a 1x1 skip
    projection when the channel count changes).
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        scale, shift = rearrange(self.time_proj(emb), "b c -> b c 1 1").chunk(2, dim=1)  # (B, out_ch, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# --------------------------------------------------------------------------------------------------
# 3. Attention
# --------------------------------------------------------------------------------------------------


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights softmax(q k^T / sqrt(d)): (..., Nq, d), (..., Nk, d) -> (..., Nq, Nk).

    `mask` (broadcastable to (..., Nq, Nk), bool): True where a query may attend to a key.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention written out: softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. (1)).

    q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> (..., Nq, dv). `F.scaled_dot_product_attention`
    computes the same in one fused kernel, without storing the (Nq, Nk) matrix of weights.
    """
    return attention_probs(q, k, mask) @ v


class Attention(nn.Module):
    """Multi-head attention: queries from x (B, N, query_dim), keys and values from `context`
    (B, L, context_dim) for cross-attention or from x itself for self-attention.

    Set `store_maps = True` to keep the attention weights (B, heads, N, L) of each call in `self.maps`
    (computed a second time, explicitly, so that they can be drawn per token).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, head_dim: int = 32):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.store_maps = False
        self.maps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, query_dim), context (B, L, context_dim) or None, key_mask (B, L) bool, True = attend."""
        context = x if context is None else context
        q, k, v = (rearrange(p, "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        mask = None if key_mask is None else rearrange(key_mask, "b l -> b 1 1 l")
        if self.store_maps:
            self.maps = attention_probs(q, k, mask).detach()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, head_dim)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


# --------------------------------------------------------------------------------------------------
# 4. Transformer blocks on image features
# --------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): W_out (a * GELU(g)) with [a, g] = W_in x, hidden width mult * dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on tokens x (B, N, dim), each sub-layer residual:

        x = x + SelfAttn(LN(x));  x = x + CrossAttn(LN(x), context);  x = x + FF(LN(x)).

    Built without `context_dim` it has no cross-attention sub-layer (the unconditional case).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = Attention(dim, context_dim, heads, head_dim) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim), context_mask (B, L) bool: True = a real token, False = padding
        that cross-attention must not read."""
        if (context is None) != (self.attn2 is None):
            raise ValueError("TransformerBlock: pass a context exactly when the block was built with a "
                             f"context_dim (has cross-attention: {self.attn2 is not None}, "
                             f"got context: {context is not None})")
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, key_mask=context_mask)
        return x + self.ff(self.norm3(x))


def position_embedding_2d(h: int, w: int, dim: int, device=None, max_frequency: float = 32.0) -> torch.Tensor:
    """Fixed sin-cos features of where each of the h*w tokens sits: (h*w, dim), row-major like the tokens.

    A token's centre (x, y) in [0, 1]^2 becomes [sin(pi f x), cos(pi f x), sin(pi f y), cos(pi f y)] for dim // 4
    frequencies f spaced geometrically from 1 to `max_frequency` (zeros fill dim % 4 columns). As in the 2D
    sin-cos embeddings of ViT-style models (e.g. DiT, Peebles & Xie 2023, Sec. 3.2), but on coordinates relative to
    the image, so the same place gets the same features at every resolution of the UNet.
    """
    quarter = dim // 4
    freqs = torch.pi * torch.logspace(0, math.log10(max_frequency), quarter, device=device)  # (dim/4,)
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    angles_x = x.reshape(-1, 1) * freqs  # (h*w, dim/4)
    angles_y = y.reshape(-1, 1) * freqs
    emb = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)
    return F.pad(emb, (0, dim - 4 * quarter))


class SpatialTransformer(nn.Module):
    """The LDM SpatialTransformer (Rombach et al. 2022, Sec. 3.3): image features as a sequence of tokens.

    x (B, C, H, W) -> GroupNorm -> tokens (B, H*W, C) -> 1x1 projection [+ position embedding] -> `depth`
    TransformerBlocks -> 1x1 projection back (zero-initialised) -> (B, C, H, W), added to x. The 1x1 convolutions
    are written as Linear layers on the tokens, which is the same map.

    With `position_embedding`, each token also carries where it sits (`position_embedding_2d`), so a query can ask
    the caption for "what belongs at the top left" directly; without it, the convolutions must infer their place
    from the zero padding at the image's border.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int = 1, context_dim: int | None = None,
                 position_embedding: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, inner)
        self.position_embedding = position_embedding
        self.blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(inner, channels))
        self._positions, self._positions_key = None, None  # a cache, not a buffer: never saved, rebuilt when missing

    def positions(self, h: int, w: int, dim: int, device) -> torch.Tensor:
        """`position_embedding_2d(h, w, dim)` on `device`, computed once per size: the table is fixed, and
        recomputing it cost about 20 small GPU kernels per SpatialTransformer per call (5% of a latent training
        step's kernels, and 15% of an inference step's time on an H200)."""
        if torch.compiler.is_compiling():  # a compiled graph computes it itself (and fuses it)
            return position_embedding_2d(h, w, dim, device)
        key = (h, w, dim, torch.device(device))
        if self._positions_key != key:
            self._positions, self._positions_key = position_embedding_2d(h, w, dim, device), key
        return self._positions

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, H*W, inner)
        if self.position_embedding:
            tokens = tokens + self.positions(h, w, tokens.shape[-1], x.device).to(tokens.dtype)  # (H*W, inner)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)


# --------------------------------------------------------------------------------------------------
# 5. The UNet
# --------------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Architecture of the denoiser. Level i works at resolution image_size / 2**i with
    base_channels * channel_mult[i] channels.

    - out_channels: None means the same as in_channels (eps, x0 and v all have the input's shape).
    - attention_levels: the levels whose ResBlocks are each followed by a SpatialTransformer; the middle
      block always has one.
    - heads: attention heads; the head width is channels // heads at each level.
    - position_embedding: add fixed 2D sin-cos position features to the tokens of every SpatialTransformer.
    - context_dim: None for an unconditional UNet; an int for cross-attention to a (B, L, context_dim)
      sequence (class embeddings or text features).
    - num_timesteps: the number of diffusion steps T, for checking that t lies in [0, T - 1]
      (floats in that range are fine, for continuous-time samplers); None switches the check off.
    - image_size: the training resolution; only checked for divisibility, any divisible size runs.
    """

    in_channels: int = 4
    out_channels: int | None = None
    image_size: int = 16
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)
    heads: int = 4
    transformer_depth: int = 1
    position_embedding: bool = False
    context_dim: int | None = None
    dropout: float = 0.0
    num_timesteps: int | None = 1000

    def __post_init__(self):
        self.channel_mult, self.attention_levels = tuple(self.channel_mult), tuple(self.attention_levels)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        levels = len(self.channel_mult)
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} names levels that do not exist: "
                             f"channel_mult {self.channel_mult} has levels 0..{levels - 1}")
        if self.num_res_blocks < 1 or self.transformer_depth < 1:
            raise ValueError("num_res_blocks and transformer_depth must be at least 1, got "
                             f"{self.num_res_blocks} and {self.transformer_depth}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by {self.downsample_factor} "
                             f"({levels - 1} downsamplings for channel_mult {self.channel_mult})")
        for level in {*self.attention_levels, levels - 1}:  # the middle block works at the last level
            ch = self.base_channels * self.channel_mult[level]
            if ch % self.heads:
                raise ValueError(f"level {level} has {ch} channels, not divisible by heads={self.heads}; "
                                 "change heads or base_channels")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None (unconditional) or positive, got {self.context_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def downsample_factor(self) -> int:
        """How much smaller the deepest level is than the input: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)


# The UNet is built of one level per resolution, as diffusers' down/up blocks (and fast.ai's miniai): a DownLevel
# keeps its own skips and the UpLevel at the same resolution consumes them. Downsample (stride-2 conv) and Upsample
# (nearest x2 + conv) come from minildm/layers.py, as in the autoencoder.


class ResAttnBlock(nn.Module):
    """One step of a UNet level: a ResBlock, then a SpatialTransformer at the levels that attend."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, 4 * cfg.base_channels, cfg.dropout)
        self.attn = (SpatialTransformer(out_ch, cfg.heads, out_ch // cfg.heads, cfg.transformer_depth, cfg.context_dim,
                                        cfg.position_embedding) if attend else None)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.res(h, emb)  # (B, out_ch, H, W)
        return h if self.attn is None else self.attn(h, context, context_mask)


class DownLevel(nn.Module):
    """The down path at one resolution: num_res_blocks x [ResBlock (+ SpatialTransformer)], then an optional
    Downsample. Returns the output and the level's skips: its input and each block's output, all (B, C, H, W)
    at this level's resolution, for the UpLevel of the same resolution."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attend: bool, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResAttnBlock(in_ch if i == 0 else out_ch, out_ch, cfg, attend)
                                    for i in range(cfg.num_res_blocks))
        self.downsample = Downsample(out_ch) if downsample else None
        self.skip_channels = [in_ch] + [out_ch] * cfg.num_res_blocks  # channels of the skips, in order

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = [h]  # (B, in_ch, H, W)
        for block in self.blocks:
            h = block(h, emb, context, context_mask)  # (B, out_ch, H, W)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, out_ch, H/2, W/2)
        return h, skips


class MidBlock(nn.ModuleList):
    """ResBlock, SpatialTransformer, ResBlock at the deepest resolution (so `mid[1]` is the transformer)."""

    def __init__(self, ch: int, cfg: UNetConfig):
        time_dim = 4 * cfg.base_channels
        super().__init__([ResBlock(ch, ch, time_dim, cfg.dropout),
                          SpatialTransformer(ch, cfg.heads, ch // cfg.heads, cfg.transformer_depth, cfg.context_dim,
                                             cfg.position_embedding),
                          ResBlock(ch, ch, time_dim, cfg.dropout)])

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        res1, attn, res2 = self
        return res2(attn(res1(h, emb), context, context_mask), emb)  # (B, ch, H, W)


class UpLevel(nn.Module):
    """The up path at one resolution: num_res_blocks + 1 x [ResBlock on concat(h, skip) (+ SpatialTransformer)],
    then an optional Upsample. Block i takes the i-th skip from the end of the DownLevel of the same resolution
    (`skip_channels` are that level's, in the order it made them)."""

    def __init__(self, in_ch: int, out_ch: int, skip_channels: list[int], cfg: UNetConfig, attend: bool,
                 upsample: bool):
        super().__init__()
        h_channels = [in_ch] + [out_ch] * (len(skip_channels) - 1)  # channels of h entering each block
        self.blocks = nn.ModuleList(ResAttnBlock(h_ch + skip_ch, out_ch, cfg, attend)
                                    for h_ch, skip_ch in zip(h_channels, reversed(skip_channels)))
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block, skip in zip(self.blocks, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb, context, context_mask)  # (B, h_ch + skip_ch, H, W) -> out_ch
        if self.upsample is not None:
            h = self.upsample(h)  # (B, out_ch, 2H, 2W)
        return h


class UNet(nn.Module):
    """eps_theta(x_t, t, context): (B, in_channels, H, W) -> (B, out_channels, H, W).

    time MLP:    timestep_embedding -> Linear -> SiLU -> Linear (width 4 * base_channels) -> SiLU, the last
                 SiLU shared by all ResBlocks (each then applies its own Linear)
    conv_in:     3x3 conv to base_channels
    down_levels: one DownLevel per level l (resolution H / 2**l, base_channels * channel_mult[l] channels):
                 num_res_blocks x [ResBlock (+ SpatialTransformer)], then a Downsample (not after the last level);
                 it keeps its input and every block's output as skip connections
    mid:         ResBlock, SpatialTransformer, ResBlock
    up_levels:   one UpLevel per level, deepest first: num_res_blocks + 1 x [ResBlock on concat(h, skip)
                 (+ SpatialTransformer)], reading the skips of the DownLevel at its resolution, last first; then
                 an Upsample (not after level 0)
    out:         GroupNorm -> SiLU -> conv_out (zero-initialised: a fresh UNet predicts exactly 0)

    Checkpoints saved before the UNet was built of levels (flat `down.{i}` and `up.{i}` lists) load as they are:
    `_load_from_state_dict` renames their keys first (section 6).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self._checked_gpu_t = False  # whether a GPU t has had its values checked once (check_inputs)
        base, time_dim, last = cfg.base_channels, 4 * cfg.base_channels, len(cfg.channel_mult) - 1
        self.time_embed = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim),
                                        nn.SiLU())
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        channels = [base * mult for mult in cfg.channel_mult]  # at each level
        entering = [base, *channels[:-1]]  # of h entering each DownLevel
        self.down_levels = nn.ModuleList(
            DownLevel(entering[level], channels[level], cfg, level in cfg.attention_levels, downsample=level != last)
            for level in range(last + 1))
        self.mid = MidBlock(channels[last], cfg)
        self.up_levels = nn.ModuleList(  # h comes from the level below (the middle block below the deepest)
            UpLevel(channels[min(level + 1, last)], channels[level], self.down_levels[level].skip_channels, cfg,
                    level in cfg.attention_levels, upsample=level != 0)
            for level in reversed(range(last + 1)))
        self.out = nn.Sequential(group_norm(channels[0]), nn.SiLU(),
                                 zero_init(nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t scalar or (B,) in [0, num_timesteps - 1], context (B, L, context_dim) or None,
        context_mask (B, L) bool or None: False marks padding tokens that cross-attention ignores."""
        t = self.check_inputs(x, t, context, context_mask)
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))  # (B, 4 * base)
        h = self.conv_in(x)  # (B, base, H, W)
        skips = []  # skips[l]: the skip tensors of level l
        for down in self.down_levels:
            h, level_skips = down(h, emb, context, context_mask)
            skips.append(level_skips)
        h = self.mid(h, emb, context, context_mask)  # (B, channels[last], H / 2**last, W / 2**last)
        for up, level_skips in zip(self.up_levels, reversed(skips)):
            h = up(h, level_skips, emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)

    def upgrade_state_dict(self, state: dict, prefix: str = "") -> dict:
        """Rename the keys of the old layout (section 6) in place and return `state`: with num_res_blocks=2, e.g.,
        `down.3.0.conv1.weight` -> `down_levels.1.blocks.0.res.conv1.weight`. Only keys starting with `prefix` (this
        UNet's name in a larger model) are renamed; one whose new name is there too is left alone, so that strict
        loading reports it rather than one of the two winning silently. Runs before every load_state_dict."""
        table = old_layout_names(self)
        for key in [k for k in state if k.startswith(prefix)]:
            parts = key[len(prefix):].split(".", 3)  # e.g. ["down", "3", "0", "conv1.weight"]
            module = ".".join(parts[:3])
            if module not in table:
                continue
            renamed = f"{prefix}{table[module]}.{parts[3]}"
            if renamed not in state:
                state[renamed] = state.pop(key)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """nn.Module.load_state_dict calls this before loading the children, on its own copy of the state dict:
        old-layout keys are renamed, then everything loads as usual (a state dict that fits neither layout still
        fails strict loading, which names the missing and unexpected keys)."""
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raise a ValueError naming the problem for any input the UNet cannot use; return t as (B,)."""
        cfg = self.cfg
        if x.ndim != 4:
            raise ValueError(f"UNet expects images x of shape (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"UNet was built with in_channels={cfg.in_channels} but x has {c} channels")
        f = cfg.downsample_factor
        if h % f or w % f:
            raise ValueError(f"UNet got {h}x{w} images but needs H and W divisible by {f} "
                             f"({len(cfg.channel_mult) - 1} downsamplings); resize or pad the images, "
                             "or use fewer levels in channel_mult")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({b},), got shape {tuple(t.shape)}")
        # The range check reads t on the host. A CPU t costs nothing to read and is checked on every call. Reading a
        # GPU t makes the CPU wait until the GPU has run everything queued, and then the GPU idles while the CPU
        # queues the next kernels (device.py): so a GPU t is checked on this model's first call only, where a wrong
        # t is most likely (code being written), and never under torch.compile, while a CUDA graph records or inside
        # `no_value_checks()` (`may_read_values`).
        T = cfg.num_timesteps
        if T is not None and may_read_values(t) and not (t.is_cuda and self._checked_gpu_t):
            if ((t < 0) | (t > T - 1)).any():
                raise ValueError(f"t must lie in [0, {T - 1}] (num_timesteps={T}), "
                                 f"got values in [{t.min().item()}, {t.max().item()}]")
            if t.is_cuda:
                self._checked_gpu_t = True
        self._check_context(b, context)
        if context_mask is not None and (context is None or context_mask.dtype != torch.bool
                                         or context_mask.shape != context.shape[:2]):
            raise ValueError(f"context_mask must be a bool tensor of shape (B, L) = "
                             f"{tuple(context.shape[:2]) if context is not None else '(no context)'} (True = a real "
                             f"token), got {context_mask.dtype} {tuple(context_mask.shape)}")
        return t

    def _check_context(self, b: int, context: torch.Tensor | None) -> None:
        dim = self.cfg.context_dim
        if dim is None:
            if context is not None:
                raise ValueError("this UNet is unconditional (context_dim=None) but got a context; "
                                 "pass context=None or build it with UNetConfig(context_dim=...)")
            return
        if context is None:
            raise ValueError(f"this UNet was built with context_dim={dim} and needs a context of shape "
                             f"(B, L, {dim}); for the unconditional branch of classifier-free guidance "
                             "pass the embedding of the null class or of the empty caption")
        if context.ndim != 3:
            raise ValueError(f"context must have shape (B, L, {dim}), got shape {tuple(context.shape)}")
        if context.shape[-1] != dim:
            raise ValueError(f"context has width {context.shape[-1]} but this UNet was built with "
                             f"context_dim={dim}")
        if context.shape[0] != b:
            raise ValueError(f"context has batch size {context.shape[0]} but x has {b}; give one context "
                             "sequence per image (e.g. context.expand(B, -1, -1))")



# --------------------------------------------------------------------------------------------------
# 6. Checkpoints saved before the UNet was built of levels (issue 10)
# --------------------------------------------------------------------------------------------------


def old_layout_names(unet: UNet) -> dict[str, str]:
    """{old module name: today's} for checkpoints whose UNet held flat lists of stages, in the order they ran:
    `down.{i}` = [ResBlock, (SpatialTransformer)] or [Downsample], `up.{i}` = [ResBlock, (SpatialTransformer),
    (Upsample)]. The same modules in the same order as today, so only the names change."""
    down, up = [], []  # the old stages, each a list of today's module names
    for i, level in enumerate(unet.down_levels):
        down += [[f"down_levels.{i}.blocks.{j}.{name}" for name, _ in block.named_children()]
                 for j, block in enumerate(level.blocks)]
        if level.downsample is not None:
            down.append([f"down_levels.{i}.downsample"])
    for i, level in enumerate(unet.up_levels):
        up += [[f"up_levels.{i}.blocks.{j}.{name}" for name, _ in block.named_children()]
               for j, block in enumerate(level.blocks)]
        if level.upsample is not None:
            up[-1].append(f"up_levels.{i}.upsample")
    return {f"{old}.{i}.{k}": new for old, stages in (("down", down), ("up", up))
            for i, stage in enumerate(stages) for k, new in enumerate(stage)}
