"""Stage 2: the two regularisers of the first-stage autoencoder (LDM Sec. 3.1 and Appendix G).

Left alone, the encoder output h could drift to any scale, and diffusion would have to chase it. LDM tries two
ways to keep the latent space well behaved:
- "kl" (`KLRegularizer`): h holds the mean and log-variance of a diagonal Gaussian q(z|x) = N(mean, exp(logvar)),
  a sample is drawn with the reparameterisation trick, and a tiny KL(q || N(0, I)) penalty (weight ~1e-6) keeps
  the latents near zero (as in a VAE, but far weaker).
- "vq" (`VQRegularizer`): each latent vector is snapped to its nearest entry of a learned codebook (VQ-VAE,
  van den Oord et al. 2017), trained with a codebook loss and a commitment loss, gradients passing the snap by the
  straight-through estimator.

Both are modules with one interface, so the autoencoder holds one of them as `regularizer` and never asks which:
    encoder_channels_per_latent   channels of h per channel of z (kl: 2, a mean and a logvar; vq: 1)
    from_config(cfg)              build one from an AutoencoderConfig
    forward(h, sample) -> Encoded z, the weighted loss, stats for logging (and the posterior or the code indices)
    decoder_input(z) -> z         latents from elsewhere (e.g. diffusion) on their way to the decoder: vq snaps them
                                  to codes, as LDM puts the quantisation inside the decoder (Sec. 3.1); kl passes them

Reading order: Encoded -> KL (reparameterize, kl_divergence, DiagonalGaussian, KLRegularizer) -> VQ (nearest_code,
straight_through, VQRegularizer) -> REGULARIZERS, the two by config name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm.device import autocast_off

if TYPE_CHECKING:
    from minildm.autoencoder import AutoencoderConfig


@dataclass
class Encoded:
    """What a regulariser returns, and so what `Autoencoder.encode` returns.
    z: (B, c, H/f, W/f), a posterior sample or mode (kl) or the quantised latents (vq).
    reg_loss: the weighted regulariser: (B,) for kl, a scalar for vq. The loss module takes its mean.
    stats: detached scalars for logging (kl: kl, posterior_std; vq: losses, perplexity, usage).
    posterior (kl) / indices (vq): the extra output of each regulariser, None for the other."""

    z: Tensor
    reg_loss: Tensor
    stats: dict[str, Tensor]
    posterior: DiagonalGaussian | None = None
    indices: Tensor | None = None


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

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """A reparameterised sample, differentiable in mean and logvar; `noise` (shaped like the mean) is drawn
        here when None (the trainer passes its own, drawn for the global batch: distributed.py)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for a posterior of shape {tuple(self.mean.shape)}")
        return reparameterize(self.mean, self.logvar, noise.to(self.mean.dtype))

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """(B,) KL divergence to the standard normal, summed over (C, H, W)."""
        return kl_divergence(self.mean, self.logvar)


class KLRegularizer(nn.Module):
    """h = (mean, logvar) -> z ~ q(z|x) = N(mean, diag(exp(logvar))), reg_loss = weight * KL(q || N(0, I)) / (C H W)
    (Kingma & Welling 2014; LDM Sec. 3.1).

    The KL is divided by the number of image values C*H*W of one image: LDM sums its reconstruction loss over the
    pixels, we average it (losses.py), so the same division keeps the paper's balance for weight = 1e-6 (LDM
    Appendix G). One latent position stands for `values_per_position` = C * f^2 of those values. No parameters.
    """

    encoder_channels_per_latent = 2  # a mean and a log-variance for each channel of z

    def __init__(self, weight: float, values_per_position: int):
        super().__init__()
        self.weight = weight
        self.values_per_position = values_per_position

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> KLRegularizer:
        return cls(cfg.kl_weight, values_per_position=cfg.in_channels * cfg.downsample_factor**2)

    def forward(self, h: Tensor, sample: bool = True, noise: Tensor | None = None) -> Encoded:
        """h (B, 2c, H/f, W/f) -> Encoded with z (B, c, H/f, W/f) a posterior sample (sample=True; with `noise`
        when given, else fresh noise) or the mean, reg_loss (B,), and the posterior."""
        posterior = DiagonalGaussian.from_moments(h)
        z = posterior.sample(noise=noise) if sample else posterior.mode()
        kl = posterior.kl()  # (B,)
        reg_loss = self.weight * kl / (self.values_per_position * h.shape[2] * h.shape[3])  # / (C H W)
        stats = {"kl": kl.mean().detach(), "posterior_std": posterior.std.mean().detach()}
        return Encoded(z, reg_loss, stats, posterior=posterior)

    def decoder_input(self, z: Tensor) -> Tensor:
        """Any latent is a valid input of the decoder: z unchanged."""
        return z

    def extra_repr(self) -> str:
        return f"weight={self.weight}, values_per_position={self.values_per_position}"


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


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """Forward: z_q. Backward: the identity to z (the snap to the codebook has no useful gradient, so the
    decoder's gradient w.r.t. z_q is copied onto z)."""
    return z + (z_q - z).detach()


class VQRegularizer(nn.Module):
    """h = z_e -> z = its nearest codes (straight-through), with a codebook of K vectors of size C trained with
    (van den Oord et al. 2017, eq. 3)
        codebook_loss   = ||sg[z_e] - e||^2          (moves the codes towards the encoder outputs)
        commitment_loss = beta * ||z_e - sg[e]||^2   (keeps the encoder close to its codes)
    both averaged over elements; sg = stop-gradient (detach); reg_loss = their sum.

    Dead codes: a code that no encoder output picks gets no gradient and stays useless forever. Two remedies:
    - data-dependent initialisation: at the first training step every code is set to a random encoder output
      of the batch, so the codebook starts where the data is (not as tiny random vectors far from it);
    - restarts: we count, per code, the training steps since it was last picked (buffer `steps_unused`);
      every `restart_every` training steps, codes unused for at least that long are re-seeded onto random
      encoder outputs of the current batch (`restart_dead_codes`), so they can win vectors again.
    Bookkeeping only happens in training steps: training mode with gradients enabled.
    """

    encoder_channels_per_latent = 1  # the encoder outputs z_e itself

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, restart_every: int = 100):
        super().__init__()
        self.beta = beta
        self.restart_every = restart_every
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> VQRegularizer:
        return cls(cfg.codebook_size, cfg.latent_channels, cfg.commitment_beta, cfg.restart_every)

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, C, H, W) -> (nearest codes z_q (B, C, H, W), indices (B, H, W)); z_q is differentiable
        w.r.t. the codebook only."""
        with autocast_off(z.device):  # distances in fp32: bf16 would pick the wrong code
            indices = nearest_code(z.detach().float(), self.codebook.detach().float())
        return rearrange(self.codebook[indices], "b h w c -> b c h w").to(z.dtype), indices

    def forward(self, h: Tensor, sample: bool = True, noise: Tensor | None = None) -> Encoded:
        """h (B, C, H/f, W/f) -> Encoded with z = the nearest codes, straight-through (B, C, H/f, W/f), reg_loss a
        scalar, and the indices (B, H/f, W/f). `sample` and `noise` are ignored: quantisation is deterministic."""
        z_q, indices = self.lookup(h)
        counts = torch.bincount(indices.flatten(), minlength=self.codebook.shape[0])  # (K,)
        p = counts.float() / counts.sum()
        codebook_loss = F.mse_loss(z_q, h.detach())
        commitment_loss = self.beta * F.mse_loss(h, z_q.detach())
        stats = {
            "codebook_loss": codebook_loss.detach(),
            "commitment_loss": commitment_loss.detach(),
            "perplexity": torch.exp(-torch.xlogy(p, p).sum()),  # K if all codes equally used, 1 if one code
            "usage": (counts > 0).float().mean(),  # fraction of codes used in this batch
        }
        if self.training and torch.is_grad_enabled():
            self._track_usage(counts, h)
        return Encoded(straight_through(h, z_q), codebook_loss + commitment_loss, stats, indices=indices)

    def decoder_input(self, z: Tensor) -> Tensor:
        """z (B, C, H, W) snapped to its nearest codes: latents from a diffusion model decode from codes too."""
        return self.lookup(z)[0]

    @torch.no_grad()
    def _track_usage(self, counts: Tensor, z: Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)  # the codes the global batch used: the same counters on every rank
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


REGULARIZERS = {"kl": KLRegularizer, "vq": VQRegularizer}  # AutoencoderConfig.regularizer -> class
