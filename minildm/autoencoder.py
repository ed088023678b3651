"""Stage 2: the first-stage autoencoder of latent diffusion.

Latent diffusion (Rombach et al. 2022, Sec. 3.1) does not run diffusion on pixels. An autoencoder first
compresses an image x of shape (3, H, W) into a latent z of shape (c, H/f, W/f), f = downsampling factor,
and a decoder maps z back to pixels. Diffusion then runs on z, which is f^2 * 3 / c times smaller.

To keep the latent space well behaved the paper tries two regularisers, "kl" (a diagonal Gaussian posterior
and a tiny KL penalty) and "vq" (vector quantisation with a learned codebook). They live in
`minildm/regularizers.py`, as two modules with one interface; the autoencoder builds the one its config names
(`Autoencoder.__init__`, the only place that picks) and never asks again which one it holds.

Reading order: config -> building blocks -> Encoder/Decoder -> Autoencoder (encode, decode, latent scale factor,
loading old checkpoints). The training losses (L1, perceptual, adversarial) live in `minildm/losses.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm.layers import Downsample, Upsample, count_parameters, group_norm  # noqa: F401 (re-exported)
from minildm.regularizers import REGULARIZERS, Encoded

SUPPORTED_FACTORS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderConfig:
    """Everything that decides the autoencoder's shape. One downsampling per entry of channel_mult after
    the first, so f = 2 ** (len(channel_mult) - 1); the course supports f in {1, 2, 4, 8}."""

    in_channels: int = 3
    image_size: int = 64
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)  # channels at level i = base_channels * channel_mult[i]
    num_res_blocks: int = 2  # per level in the encoder (the decoder uses one more, as in LDM)
    latent_channels: int = 4  # c, the channels of z
    regularizer: str = "kl"  # "kl" or "vq"
    kl_weight: float = 1e-6  # weight of the KL term (kl only)
    codebook_size: int = 512  # K, number of codes (vq only)
    commitment_beta: float = 0.25  # beta of the commitment loss (vq only)
    restart_every: int = 100  # vq: every this many training steps, re-seed codes unused for as long; 0 = never
    mid_attention: bool = True  # self-attention in the middle block of encoder and decoder

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; use 'kl' (diagonal Gaussian) "
                             "or 'vq' (vector quantisation)")
        if not 1 <= len(self.channel_mult) <= 4:
            raise ValueError(
                f"channel_mult={self.channel_mult} gives downsampling factor f=2**{len(self.channel_mult) - 1}; "
                f"the course supports f in {SUPPORTED_FACTORS}: give channel_mult 1 to 4 entries")
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.regularizer == "vq" and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        for name in ("kl_weight", "commitment_beta", "restart_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        f = self.downsample_factor
        if self.image_size % f != 0:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsampling factor f={f} "
                f"(channel_mult has {len(self.channel_mult)} entries); use a multiple of {f} such as "
                f"{max(f, self.image_size // f * f)} or change channel_mult")

    @property
    def downsample_factor(self) -> int:
        """f: the encoder halves the resolution once per level except the last."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H/f, W/f) of one image of size image_size."""
        s = self.image_size // self.downsample_factor
        return (self.latent_channels, s, s)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, eps=1e-6)  # LDM's autoencoder normalises with eps = 1e-6


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))); a 1x1 conv on the skip path when channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # q, k, v from one 1x1 conv
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, (B, HW, C)
        return x + self.proj(rearrange(out, "b (h w) c -> b c h w", h=h, w=w))


def middle_block(channels: int, attention: bool) -> nn.Sequential:
    """ResBlock -> self-attention -> ResBlock at the lowest resolution."""
    attn = AttentionBlock(channels) if attention else nn.Identity()
    return nn.Sequential(ResBlock(channels, channels), attn, ResBlock(channels, channels))


class Encoder(nn.Module):
    """x (B, in, H, W) -> h (B, out_channels, H/f, W/f), what the regulariser needs: 2c channels for "kl" (mean and
    logvar), c for "vq" (the vectors to quantise).

    conv_in; per level: num_res_blocks ResBlocks, then a Downsample (except at the last level);
    middle block; GroupNorm -> SiLU -> conv_out.
    """

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        layers, ch = [], cfg.base_channels
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out_ch))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        self.mid = middle_block(ch, cfg.mid_attention)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, c, H/f, W/f) -> image (B, in, H, W), the mirror of the Encoder.

    conv_in; middle block; per level from the lowest resolution up: num_res_blocks + 1 ResBlocks (LDM gives
    the decoder one more than the encoder: decoding is the harder job), then an Upsample (except at the top);
    GroupNorm -> SiLU -> conv_out. No tanh at the end, as in LDM: the L1 loss keeps outputs near [-1, 1].
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = middle_block(ch, cfg.mid_attention)
        layers = []
        for level in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, chans[level]))
                ch = chans[level]
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderOutput:
    """What `Autoencoder.forward` returns: the reconstruction (B, in, H, W), the regulariser as in
    `Encoded`, logging stats, and the latents z that were decoded."""

    recon: Tensor
    reg_loss: Tensor
    stats: dict[str, Tensor]
    z: Tensor


class Autoencoder(nn.Module):
    """Encoder + regulariser (`KLRegularizer` or `VQRegularizer`, see regularizers.py) + decoder (LDM Sec. 3.1).

    Images are (B, in_channels, H, W) in [-1, 1]. The network is convolutional, so any H and W divisible by f
    work (cfg.image_size only fixes `cfg.latent_shape`); self-attention cost grows as (H W / f^2)^2.

    Diffusion works on `encode_latents(x) = scale_factor * z`: `scale_factor` (a buffer saved with the
    weights) is set by `compute_scale_factor` to 1 / std of the latents, so that diffusion sees latents of
    unit variance (LDM Sec. 4.3 and Appendix G).
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        regularizer = REGULARIZERS[cfg.regularizer]  # the one place that picks: KLRegularizer or VQRegularizer
        self.encoder = Encoder(cfg, out_channels=regularizer.encoder_channels_per_latent * cfg.latent_channels)
        self.decoder = Decoder(cfg)
        # built after encoder and decoder: the codebook draws random numbers too, so a seed gives the same weights
        # as it always did
        self.regularizer = regularizer.from_config(cfg)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    # ---- input checks ----

    def _check_images(self, x: Tensor) -> None:
        cfg, f = self.cfg, self.cfg.downsample_factor
        if not isinstance(x, Tensor):
            raise TypeError(f"Autoencoder expects a torch.Tensor of images, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"Autoencoder expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}; "
                             "add a batch dimension with x[None] for a single image")
        if not x.is_floating_point():
            raise TypeError(f"Autoencoder expects float images in [-1, 1], got dtype {x.dtype}; "
                            "convert uint8 images with x.float() / 127.5 - 1")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"Autoencoder expects images with {cfg.in_channels} channels, got {x.shape[1]}; "
                             f"convert the images (for MNIST use load_dataset(..., channels={cfg.in_channels})) "
                             f"or build the autoencoder with in_channels={x.shape[1]}")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"Autoencoder got images of {h}x{w} but needs sizes divisible by f={f} "
                             f"({len(cfg.channel_mult) - 1} downsamplings); resize the images or change channel_mult")

    def _check_latents(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"decode expects latents (B, {self.cfg.latent_channels}, h, w), got {shape}")

    # ---- encode / decode ----

    def encode(self, x: Tensor, sample: bool = True, noise: Tensor | None = None) -> Encoded:
        """Images (B, in, H, W) -> Encoded (z (B, c, H/f, W/f), weighted regulariser loss, stats). kl: z is a
        posterior sample (sample=True; `noise` (B, c, H/f, W/f) when given, else fresh noise) or the mean;
        vq: z is the quantised latent (sample and noise are ignored)."""
        self._check_images(x)
        return self.regularizer(self.encoder(x), sample=sample, noise=noise)  # h: (B, 2c or c, H/f, W/f)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, c, h, w) -> images (B, in, h*f, w*f)."""
        self._check_latents(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True, noise: Tensor | None = None) -> AutoencoderOutput:
        enc = self.encode(x, sample=sample, noise=noise)
        return AutoencoderOutput(recon=self.decode(enc.z), reg_loss=enc.reg_loss, stats=enc.stats, z=enc.z)

    @property
    def decoder_last_layer(self) -> Tensor:
        """Weight of the decoder's final conv: the adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight

    # ---- latents for diffusion ----

    @torch.no_grad()
    def compute_scale_factor(self, batches: Iterable[Tensor]) -> float:
        """Set `scale_factor` to 1 / std of the deterministic latents (posterior mean, or quantised) over all
        elements of the given image batches, and return it. Batches are image tensors or (images, ...) tuples."""
        n, total, total_sq = 0, 0.0, 0.0
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if not isinstance(batch, Tensor):
                raise TypeError(f"compute_scale_factor expects image tensors or (images, ...) tuples, got "
                                f"{type(batch).__name__}; pass e.g. (b['image'] for b in loader)")
            z = self.encode(batch.to(self.scale_factor.device), sample=False).z.double()
            n, total, total_sq = n + z.numel(), total + z.sum().item(), total_sq + z.pow(2).sum().item()
        if n < 2:
            raise ValueError("compute_scale_factor got no images; pass at least one batch")
        std = math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0))
        if std == 0.0:
            raise ValueError("the latents are all identical (std 0); is the autoencoder trained?")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std

    def encode_latents(self, x: Tensor) -> Tensor:
        """What diffusion trains on: scale_factor * z, deterministic (posterior mean for kl). Wrap the call in
        torch.no_grad() when the autoencoder is frozen."""
        return self.scale_factor * self.encode(x, sample=False).z

    def decode_latents(self, z: Tensor) -> Tensor:
        """Inverse of encode_latents: decode(z / scale_factor). For vq the latents are snapped to their nearest
        code first: LDM puts the quantisation layer inside the decoder (Sec. 3.1), so imperfect latents from a
        diffusion model still decode from codes."""
        self._check_latents(z)
        return self.decoder(self.regularizer.decoder_input(z / self.scale_factor))  # z was checked above

    # ---- checkpoints from before the regularisers were modules of their own ----

    @staticmethod
    def upgrade_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Rename the keys of the old layout in place and return `state`: the VQ codebook and its counters were
        `quantizer.*`, they are `regularizer.*` now (the KL regulariser has no weights). A key whose new name is
        there too is left alone, so that strict loading reports it rather than one of the two winning silently.
        Called by `load_state_dict` (below) and by `EMA.load_state_dict` for the averaged weights."""
        old, new = prefix + "quantizer.", prefix + "regularizer."
        for key in [k for k in state if k.startswith(old)]:
            renamed = new + key[len(old):]
            if renamed not in state:
                state[renamed] = state.pop(key)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """nn.Module.load_state_dict calls this before loading the children, on its own copy of the state dict."""
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
