"""Stage 2: the losses that train the first-stage autoencoder (LDM Sec. 3.1 and Appendix G).

An L1 loss alone gives blurry reconstructions: many sharp images are consistent with a latent, and their
average is blurry. LDM (following VQGAN, Esser et al. 2021) adds
- a perceptual loss: distances between features of a conv net rather than between pixels;
- a patch-based adversarial loss: a discriminator judges local patches as real or reconstructed, and the
  decoder is pushed to fool it, which restores texture and sharp edges.
Total generator loss:
    L = |x - x_rec| + w_p * perceptual(x, x_rec) + reg + r(step) * lambda * w_d * (-D(x_rec))
with lambda the adaptive weight of Esser et al. (eq. 7) and r(step) 0 before `disc_start`, then ramping to 1.

Our reconstruction loss is a mean over the C*H*W pixel values where taming-transformers/LDM sum it; lambda is
a ratio of gradient norms, so it comes out C*H*W times smaller here and taming's clamp of 1e4 becomes
1e4 / (C*H*W) (about 0.8 at 64 px). Without that clamp an untrained discriminator, whose gradients are tiny,
gets an enormous weight the moment it joins.

This module only computes losses; the training loop (optimisers, steps) belongs to the trainer:
    loss_g, logs = criterion.generator_loss(x, out, ae.decoder_last_layer, step); loss_g.backward(); opt_ae.step()
    loss_d, logs = criterion.discriminator_loss(x, out.recon, step)
    if loss_d.requires_grad:  # False before the discriminator is switched on
        loss_d.backward(); opt_disc.step()
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.autoencoder import AutoencoderOutput
from minildm.device import autocast_off
from minildm.layers import group_norm

# --------------------------------------------------------------------------------------------------
# Perceptual loss with a random-weight feature network
# --------------------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """A small VGG-like net (stages of conv-ReLU-conv-ReLU, 2x average pooling between stages) with fixed
    random weights drawn from `seed`, frozen. forward(x) returns the feature maps after every stage.

    We cannot download VGG weights, and do not need them: randomly initialised deep conv nets already give
    a useful perceptual signal (Liu et al., "Generic Perceptual Loss for Modeling Structured Output
    Dependencies", CVPR 2021). Any module returning a list of feature maps can replace this one."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128, 128), seed: int = 0):
        super().__init__()
        stages, ch = [], in_channels
        for out in channels:
            stages.append(nn.Sequential(nn.Conv2d(ch, out, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(out, out, 3, padding=1), nn.ReLU()))
            ch = out
        self.stages = nn.ModuleList(stages)
        gen = torch.Generator().manual_seed(seed)  # the same weights on every machine, whatever the global seed
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():  # He init: activations keep their scale through the ReLUs
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                    m.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = F.avg_pool2d(x, 2, ceil_mode=True)  # ceil_mode: a 1x1 map stays 1x1 on tiny images
            x = stage(x)
            feats.append(x)
        return feats


def unit_normalize(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide every feature vector (over channels, dim 1) by its euclidean norm."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance (Zhang et al. 2018) with equal channel weights: for every depth l,
        d_l = mean_{h,w} || n(f_l(x)) - n(f_l(y)) ||^2,    n = unit-normalise over channels,
    and the loss is sum_l d_l, one value per sample (B,). Each d_l lies in [0, 4]."""

    def __init__(self, feature_net: nn.Module | None = None):
        super().__init__()
        self.net = feature_net if feature_net is not None else FeatureNet()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        feats = self.net(torch.cat([x, y]))  # one pass for both batches
        total = 0.0
        for f in feats:
            fx, fy = unit_normalize(f.float()).chunk(2)  # fp32: the tiny eps would vanish in fp16
            total = total + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))  # (B,)
        return total


# --------------------------------------------------------------------------------------------------
# Adversarial loss: PatchGAN discriminator, hinge loss, adaptive weight
# --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a stack of stride-2 4x4 convs with LeakyReLU(0.2) that outputs a map
    of logits (B, 1, h, w), each judging one overlapping patch of the input as real (> 0) or fake (< 0).

    Differences from pix2pix: GroupNorm instead of BatchNorm (real and fake batches are passed separately,
    which BatchNorm handles badly), and 3x3 stride-1 convs at the end (pix2pix's 4x4 ones shrink the map by
    a pixel each, which tiny images cannot afford). Weights start from N(0, 0.02) as in pix2pix."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        self.num_layers = num_layers
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers):
            out = channels * min(2**i, 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), group_norm(out),
                       nn.LeakyReLU(0.2)]
            ch = out
        out = channels * min(2**num_layers, 8)
        layers += [nn.Conv2d(ch, out, 3, padding=1), group_norm(out), nn.LeakyReLU(0.2),
                   nn.Conv2d(out, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        min_size = 2 ** (self.num_layers + 1)  # a logit map of at least 2x2 (GroupNorm needs > 1 value)
        if x.ndim != 4 or min(x.shape[-2:]) < min_size:
            raise ValueError(f"PatchDiscriminator with {self.num_layers} stride-2 layers needs images (B, C, H, W) "
                             f"of at least {min_size}x{min_size}, got shape {tuple(x.shape)}; "
                             "use fewer layers (disc_layers) for small images")
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))).
    The factor 0.5 (as in taming-transformers) averages the real and the fake half."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """The decoder wants the discriminator to call its reconstructions real: -mean(D(x_rec))."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + 1e-4), L = the decoder's last layer
    (Esser et al. 2021, eq. 7; used by LDM). It scales the adversarial term so its gradient at the decoder
    output is as large as the reconstruction loss's. Clamped to [0, max_weight] and detached."""
    if not (rec_loss.requires_grad and g_loss.requires_grad):
        raise ValueError("adaptive_weight needs rec_loss and g_loss with gradients (it differentiates them "
                         "w.r.t. the decoder's last layer); do not call it under torch.no_grad()")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if rec_grad is None or g_grad is None:
        raise ValueError("last_layer was not used to compute the losses; pass autoencoder.decoder_last_layer")
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------------
# The full autoencoder loss
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderLossConfig:
    """Weights of the autoencoder loss. A weight of 0 switches its term off (and skips its network)."""

    perceptual_weight: float = 1.0
    disc_weight: float = 0.5  # w_d, multiplies the adaptive weight lambda
    disc_start: int = 2000  # training steps on L1 + perceptual + reg alone before the discriminator joins
    disc_channels: int = 64
    disc_layers: int = 3  # stride-2 layers of the PatchGAN: needs images of at least 2**(disc_layers+1) pixels
    in_channels: int = 3
    # How the two players train (taming-transformers' settings; each one measured in notebook 02):
    disc_betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of the discriminator (and none of its grads clipped)
    disc_ramp: int = 500  # steps over which the generator's adversarial weight rises linearly from 0 after disc_start
    max_adaptive_weight: float | None = None  # clamp of lambda; None = 1e4 / (C*H*W), taming's clamp for a summed loss
    disc_fp32: bool = True  # run the discriminator outside autocast (its hinge losses sit near 1.0, where bf16
    #                         has 3 significant digits)

    def __post_init__(self):
        self.disc_betas = tuple(self.disc_betas)
        for name in ("perceptual_weight", "disc_weight", "disc_start", "disc_ramp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Run `module` without building gradients for its parameters (inputs still get theirs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def detached(logs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Logs as detached scalar tensors: reading them as numbers would make the CPU wait for the GPU, so the
    trainer does that only when it writes a log line."""
    return {k: v.detach().reshape(()) for k, v in logs.items()}


class AutoencoderLoss(nn.Module):
    """Owns the perceptual network and the discriminator; computes both players' losses.

    generator_loss:     |x - x_rec| + w_p * perceptual + mean(reg_loss) + [step >= disc_start] * lambda * w_d * g_adv
    discriminator_loss: hinge(D(x), D(sg[x_rec])) once step >= disc_start
    Logs are detached scalar tensors. The perceptual network is frozen; only `discriminator.parameters()` train.
    """

    def __init__(self, cfg: AutoencoderLossConfig | None = None, feature_net: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else AutoencoderLossConfig()
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            net = feature_net if feature_net is not None else FeatureNet(cfg.in_channels)
            self.perceptual = PerceptualLoss(net)
        self.discriminator = None
        if cfg.disc_weight > 0:
            self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def adversarial_factor(self, step: int) -> float:
        """0 before disc_start, then rising linearly to 1 over disc_ramp steps: the generator does not chase an
        untrained discriminator at full weight."""
        if not self.disc_active(step):
            return 0.0
        return min(1.0, (step - self.cfg.disc_start + 1) / max(self.cfg.disc_ramp, 1))

    def discriminate(self, x: Tensor) -> Tensor:
        """Logits of the PatchGAN, in fp32 when cfg.disc_fp32 (autocast switched off around it)."""
        if not self.cfg.disc_fp32:
            return self.discriminator(x)
        with autocast_off(x.device):
            return self.discriminator(x.float())

    def generator_loss(self, x: Tensor, out: AutoencoderOutput, last_layer: Tensor,
                       step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss on images x (B, C, H, W) and its output `out`. last_layer: the decoder's last
        weight (`Autoencoder.decoder_last_layer`), for the adaptive weight. Logs: loss_g, l1, perceptual, reg,
        g_adv, adaptive_weight and the autoencoder's stats (kl, posterior_std / codebook losses, perplexity,
        usage). Under torch.no_grad() (evaluation) g_adv is logged but weighted 0."""
        if x.shape != out.recon.shape:
            raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(out.recon.shape)} differ in shape")
        l1 = (x - out.recon).abs().mean()
        perceptual = self.perceptual(x, out.recon).mean() if self.perceptual is not None else torch.zeros_like(l1)
        rec_loss = l1 + self.cfg.perceptual_weight * perceptual
        reg = out.reg_loss.mean()
        loss = rec_loss + reg
        g_adv, weight = torch.zeros_like(l1), torch.zeros_like(l1)
        if self.disc_active(step):
            with frozen(self.discriminator):  # the generator's loss must not train the discriminator
                g_adv = generator_adv_loss(self.discriminate(out.recon))
            if torch.is_grad_enabled():  # no gradients in evaluation: the term is logged but not weighted
                max_weight = self.cfg.max_adaptive_weight or 1e4 / x[0].numel()
                weight = adaptive_weight(rec_loss, g_adv, last_layer, max_weight) * self.adversarial_factor(step)
            loss = loss + weight * self.cfg.disc_weight * g_adv
        logs = {"loss_g": loss, "l1": l1, "perceptual": perceptual, "reg": reg, "g_adv": g_adv,
                "adaptive_weight": weight, **out.stats}
        return loss, detached(logs)

    def discriminator_loss(self, x: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of the discriminator on real x and detached reconstructions x_rec.
        Before disc_start (or with disc_weight=0) it returns a plain zero without gradient and runs no
        network: skip the discriminator's update then (`if loss_d.requires_grad: loss_d.backward(); ...`)."""
        if not self.disc_active(step):
            return x.new_zeros(()), {"loss_d": 0.0}
        logits_real = self.discriminate(x.detach())
        logits_fake = self.discriminate(recon.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"loss_d": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, detached(logs)
