"""Layers shared by the first stage (autoencoder.py), the denoiser (unet.py) and the losses (losses.py).

Each model imports its basic pieces from here, so stage 4 does not depend on stage 2 for a convolution and every
normalisation follows one rule.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with 32 groups as in LDM, or gcd(32, channels) when the channel count is not a
    multiple of 32 (so every group has the same size). The autoencoder uses eps = 1e-6, as LDM's does."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the weights (and bias) of a layer, so that a residual branch starts as the identity map."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Number of parameters in each top-level block of `model`, plus "total"."""
    counts = {name: count_parameters(child) for name, child in model.named_children()}
    counts["total"] = count_parameters(model)
    return counts
