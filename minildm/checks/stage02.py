"""Checkers for exercise 02 (the autoencoder): reparameterisation, the KL term, nearest-code
quantisation and the straight-through estimator. References: minildm.regularizers."""

from __future__ import annotations

import torch

from minildm import regularizers as ref
from minildm.checks import ExerciseError, call, expect_tensor, passed


def _gaussian_params(seed: int, shape=(2, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)


def check_reparameterize(fn) -> None:
    """fn(mean, logvar, noise) -> z = mean + exp(logvar / 2) * noise."""
    name = "reparameterize"
    for seed in range(3):
        mean, logvar, noise = _gaussian_params(seed)
        expect_tensor(call(fn, name, mean, logvar, noise), ref.reparameterize(mean, logvar, noise), name,
                      f"random mean/logvar/noise, seed {seed}")
    mean, logvar, noise = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    expect_tensor(call(fn, name, mean, logvar, noise), torch.ones(1, 1, 1, 1), name,
                  "mean 0, logvar 0 (sigma 1), noise 1 must give z = 1")
    mean, logvar, noise = (t.requires_grad_() for t in _gaussian_params(7))
    z = call(fn, name, mean, logvar, noise)
    if not z.requires_grad:
        raise ExerciseError(f"{name}: z has no gradient; the point of the trick is that z is differentiable "
                            "in mean and logvar (do not detach or use torch.no_grad).")
    z.sum().backward()
    expect_tensor(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * noise.detach(), name,
                  "gradient of sum(z) w.r.t. logvar, which should be exp(logvar/2) * noise / 2", atol=1e-4)
    passed(name, "values match mean + exp(logvar/2) * noise, and gradients reach mean and logvar")


def check_kl_divergence(fn) -> None:
    """fn(mean, logvar) -> (B,) KL(N(mean, exp(logvar)) || N(0, I)) summed over C, H, W."""
    name = "kl_divergence"
    zeros = torch.zeros(3, 2, 4, 4)
    expect_tensor(call(fn, name, zeros, zeros), torch.zeros(3), name,
                  "mean 0 and logvar 0 is the prior itself: the KL must be 0 for every sample")
    for seed in range(3):
        mean, logvar, _ = _gaussian_params(seed)
        got = call(fn, name, mean, logvar)
        if isinstance(got, torch.Tensor) and got.ndim == 0:
            raise ExerciseError(f"{name}: returned a single number; return one KL per sample, shape (B,) = "
                                f"({mean.shape[0]},): sum over dims (1, 2, 3) only.")
        expect_tensor(got, ref.kl_divergence(mean, logvar), name, f"random mean/logvar, seed {seed}", atol=1e-4)
    passed(name, "zero at the prior, one value per sample, matches 1/2 sum(mean^2 + var - 1 - logvar)")


def check_nearest_code(fn) -> None:
    """fn(z (B, C, H, W), codebook (K, C)) -> indices (B, H, W) of the nearest code."""
    name = "nearest_code"
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.2, 0.1], [0.6, 0.55]]).T.reshape(1, 2, 2, 2)
    expected = torch.tensor([[[1, 2], [0, 1]]])
    expect_tensor(call(fn, name, z, codebook), expected, name,
                  "3 codes (0,0), (1,0), (0,1) and 4 hand-made latent vectors in a 1x2x2x2 tensor")
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        z, codebook = torch.randn(2, 4, 3, 5, generator=g), torch.randn(16, 4, generator=g)
        expect_tensor(call(fn, name, z, codebook), ref.nearest_code(z, codebook), name,
                      f"random z (2, 4, 3, 5) and a codebook of 16 codes, seed {seed}")
    passed(name, "indices of the nearest code are right, with shape (B, H, W)")


def check_straight_through(fn) -> None:
    """fn(z, z_q) -> a tensor equal to z_q whose gradient flows to z unchanged."""
    name = "straight_through"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4, generator=g)
    out = call(fn, name, z, z_q)
    expect_tensor(out, z_q, name, "forward value: it must equal z_q")
    weights = torch.randn(2, 3, 4, 4, generator=g)
    if not out.requires_grad:
        raise ExerciseError(f"{name}: the output has no gradient path to z; write z + (z_q - z).detach().")
    (out * weights).sum().backward()
    expect_tensor(z.grad, weights, name, "backward: the gradient w.r.t. z must be the incoming gradient, unchanged")
    passed(name, "forward gives z_q, backward copies the gradient to z")
