"""Evaluation (stage 10). For now: reconstruction PSNR."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(range^2 / MSE).

    Images in [-1, 1] have range 2 (the same value as PSNR of the images mapped to [0, 1] with range 1).
    x, y: (B, C, H, W) -> (B,)
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
