"""Stage 2: the first-stage autoencoder of latent diffusion.

Latent diffusion (Rombach et al. 2022, Sec. 3.1) does not run diffusion on pixels. An autoencoder first
compresses an image x of shape (3, H, W) into a latent z of shape (c, H/f, W/f), f = downsampling factor,
and a decoder maps z back to pixels. Diffusion then runs on z, which is f^2 * 3 / c times smaller.

To keep the latent space well behaved the paper tries two regularisers:
- "kl": the encoder outputs a diagonal Gaussian q(z|x) = N(mean, exp(logvar)), a sample is drawn with the
  reparameterisation trick, and a tiny KL(q || N(0, I)) penalty (weight ~1e-6) keeps the latents near zero
  (as in a VAE, but far weaker).
- "vq": each latent vector is snapped to its nearest entry of a learned codebook (VQ-VAE, van den Oord et
  al. 2017), trained with a codebook loss and a commitment loss, gradients passing the snap by the
  straight-through estimator.

Reading order: config -> building blocks -> Encoder/Decoder -> KL posterior -> vector quantiser ->
Autoencoder (encode, decode, latent scale factor). The training losses (L1, perceptual, adversarial)
live in `minildm/losses.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm.layers import Downsample, Upsample, count_parameters, group_norm  # noqa: F401 (re-exported)

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
        if self.regularizer not in ("kl", "vq"):
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
    """x (B, in, H, W) -> moments (B, 2c, H/f, W/f) for "kl" (mean and logvar) or z (B, c, H/f, W/f) for "vq".

    conv_in; per level: num_res_blocks ResBlocks, then a Downsample (except at the last level);
    middle block; GroupNorm -> SiLU -> conv_out.
    """

    def __init__(self, cfg: AutoencoderConfig):
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
        out_channels = 2 * cfg.latent_channels if cfg.regularizer == "kl" else cfg.latent_channels
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
# KL regularisation: a diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)))
# --------------------------------------------------------------------------------------------------


def reparameterize(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """z = mean + sigma * eps with sigma = exp(logvar / 2) and eps ~ N(0, I): a sample that is
    differentiable in mean and logvar (Kingma & Welling 2014)."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 * sum_{c,h,w} (mean^2 + exp(logvar) - 1 - logvar).
    mean, logvar: (B, C, H, W) -> (B,), one value per sample."""
    return 0.5 * torch.sum(mean**2 + torch.exp(logvar) - 1.0 - logvar, dim=(1, 2, 3))


class DiagonalGaussian:
    """The KL posterior. logvar is clamped to [-30, 20] (as in LDM) so exp(logvar) stays finite."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split the encoder output (B, 2c, h, w) into mean and logvar, each (B, c, h, w)."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised sample, differentiable in mean and logvar."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return reparameterize(self.mean, self.logvar, noise)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """(B,) KL divergence to the standard normal, summed over (C, H, W)."""
        return kl_divergence(self.mean, self.logvar)


# --------------------------------------------------------------------------------------------------
# VQ regularisation: snap each latent vector to its nearest codebook entry (van den Oord et al. 2017)
# --------------------------------------------------------------------------------------------------


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code (squared euclidean) for every latent vector.
    z: (B, C, H, W), codebook: (K, C) -> indices (B, H, W).
    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 needs one matrix product instead of a (BHW, K, C) difference."""
    flat = rearrange(z, "b c h w -> (b h w) c")
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)  # (BHW, K)
    return rearrange(dist.argmin(dim=1), "(b h w) -> b h w", b=z.shape[0], h=z.shape[2])


def autocast_off(device: torch.device):
    """A context that switches autocast off on CUDA and CPU (other devices have nothing to switch off)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """Forward: z_q. Backward: the identity to z (the snap to the codebook has no useful gradient, so the
    decoder's gradient w.r.t. z_q is copied onto z)."""
    return z + (z_q - z).detach()


class VectorQuantizer(nn.Module):
    """Codebook of K vectors of size C, trained with (van den Oord et al. 2017, eq. 3)
        codebook_loss   = ||sg[z] - e||^2          (moves the codes towards the encoder outputs)
        commitment_loss = beta * ||z - sg[e]||^2   (keeps the encoder close to its codes)
    both averaged over elements; sg = stop-gradient (detach).

    Dead codes: a code that no encoder output picks gets no gradient and stays useless forever. Two remedies:
    - data-dependent initialisation: at the first training step every code is set to a random encoder output
      of the batch, so the codebook starts where the data is (not as tiny random vectors far from it);
    - restarts: we count, per code, the training steps since it was last picked (buffer `steps_unused`);
      every `restart_every` training steps, codes unused for at least that long are re-seeded onto random
      encoder outputs of the current batch (`restart_dead_codes`), so they can win vectors again.
    Bookkeeping only happens in training steps: training mode with gradients enabled.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, restart_every: int = 100):
        super().__init__()
        self.beta = beta
        self.restart_every = restart_every
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, C, H, W) -> (nearest codes z_q (B, C, H, W), indices (B, H, W)); z_q is differentiable
        w.r.t. the codebook only."""
        with autocast_off(z.device):  # distances in fp32: bf16 would pick the wrong code
            indices = nearest_code(z.detach().float(), self.codebook.detach().float())
        return rearrange(self.codebook[indices], "b h w c -> b c h w").to(z.dtype), indices

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z (B, C, H, W) -> (z_q with straight-through gradient, indices (B, H, W), losses and stats)."""
        z_q, indices = self.lookup(z)
        counts = torch.bincount(indices.flatten(), minlength=self.codebook.shape[0])  # (K,)
        p = counts.float() / counts.sum()
        info = {
            "codebook_loss": F.mse_loss(z_q, z.detach()),
            "commitment_loss": self.beta * F.mse_loss(z, z_q.detach()),
            "perplexity": torch.exp(-torch.xlogy(p, p).sum()),  # K if all codes equally used, 1 if one code
            "usage": (counts > 0).float().mean(),  # fraction of codes used in this batch
        }
        if self.training and torch.is_grad_enabled():
            self._track_usage(counts, z)
        return straight_through(z, z_q), indices, info

    @torch.no_grad()
    def _track_usage(self, counts: Tensor, z: Tensor) -> None:
        self.step += 1
        self.steps_unused += 1
        self.steps_unused[counts > 0] = 0
        step = int(self.step)
        if step == 1:
            self.reseed(torch.ones_like(self.steps_unused, dtype=torch.bool), z)  # data-dependent init
        elif self.restart_every > 0 and step % self.restart_every == 0:
            self.restart_dead_codes(z)

    def restart_dead_codes(self, z: Tensor) -> int:
        """Move every code unused for >= restart_every steps onto a random encoder output of z (B, C, H, W).
        Returns how many codes moved."""
        return self.reseed(self.steps_unused >= max(self.restart_every, 1), z)

    @torch.no_grad()
    def reseed(self, mask: Tensor, z: Tensor) -> int:
        """Set the codes where mask (K,) is True to random encoder outputs of z (B, C, H, W)."""
        codes = mask.nonzero().flatten()
        if len(codes) > 0:
            flat = rearrange(z.detach(), "b c h w -> (b h w) c")
            pick = torch.randint(len(flat), (len(codes),), device=flat.device)
            self.codebook[codes] = flat[pick].to(self.codebook.dtype)
            self.steps_unused[codes] = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook.data, src=0)  # every rank keeps the same codebook
        return len(codes)


# --------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """What `Autoencoder.encode` returns.
    z: (B, c, h, w), a posterior sample or mode (kl) or the quantised latents (vq).
    reg_loss: the weighted regulariser: (B,) for kl, a scalar for vq. The loss module takes its mean.
    stats: detached scalars for logging (kl: kl, posterior_std; vq: losses, perplexity, usage).
    posterior (kl) / indices (vq): the extra output of each regulariser, None for the other."""

    z: Tensor
    reg_loss: Tensor
    stats: dict[str, Tensor]
    posterior: DiagonalGaussian | None = None
    indices: Tensor | None = None


@dataclass
class AutoencoderOutput:
    """What `Autoencoder.forward` returns: the reconstruction (B, in, H, W), the regulariser as in
    `Encoded`, logging stats, and the latents z that were decoded."""

    recon: Tensor
    reg_loss: Tensor
    stats: dict[str, Tensor]
    z: Tensor


class Autoencoder(nn.Module):
    """Encoder + regulariser (KL posterior or vector quantiser) + decoder (LDM Sec. 3.1).

    Images are (B, in_channels, H, W) in [-1, 1]. The network is convolutional, so any H and W divisible by f
    work (cfg.image_size only fixes `cfg.latent_shape`); self-attention cost grows as (H W / f^2)^2.

    Diffusion works on `encode_latents(x) = scale_factor * z`: `scale_factor` (a buffer saved with the
    weights) is set by `compute_scale_factor` to 1 / std of the latents, so that diffusion sees latents of
    unit variance (LDM Sec. 4.3 and Appendix G).
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.regularizer == "vq":
            self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.commitment_beta,
                                             cfg.restart_every)
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

    def encode(self, x: Tensor, sample: bool = True) -> Encoded:
        """Images (B, in, H, W) -> Encoded. kl: z is a posterior sample (sample=True) or the mean; vq: z is
        the quantised latent (sample is ignored).

        The KL is divided by the number of pixel values C*H*W: LDM sums its reconstruction loss over pixels,
        we average it (losses.py), so the same division keeps the paper's balance for kl_weight=1e-6."""
        self._check_images(x)
        h = self.encoder(x)
        if self.cfg.regularizer == "kl":
            posterior = DiagonalGaussian.from_moments(h)
            z = posterior.sample() if sample else posterior.mode()
            kl = posterior.kl()  # (B,)
            reg = self.cfg.kl_weight * kl / x[0].numel()
            stats = {"kl": kl.mean().detach(), "posterior_std": posterior.std.mean().detach()}
            return Encoded(z, reg, stats, posterior=posterior)
        z_q, indices, info = self.quantizer(h)
        reg = info["codebook_loss"] + info["commitment_loss"]
        return Encoded(z_q, reg, {k: v.detach() for k, v in info.items()}, indices=indices)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, c, h, w) -> images (B, in, h*f, w*f)."""
        self._check_latents(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True) -> AutoencoderOutput:
        enc = self.encode(x, sample=sample)
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
        z = z / self.scale_factor
        if self.cfg.regularizer == "vq":
            z = self.quantizer.lookup(z)[0]
        return self.decoder(z)  # z was checked above
