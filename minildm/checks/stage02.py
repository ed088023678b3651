"""Checkers for exercise 02 (the autoencoder): reparameterisation, the KL term, nearest-code
quantisation and the straight-through estimator. References: minildm.regularizers."""

from __future__ import annotations

import torch

from minildm import regularizers as ref
from minildm.checks import ExerciseError, call, expect_tensor, known_mistake, passed, written_here


def _gaussian_params(seed: int, shape=(2, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)


def check_reparameterize(fn) -> None:
    """fn(mean, logvar, noise) -> z = mean + exp(logvar / 2) * noise."""
    name = "reparameterize"
    written_here(fn, name)
    for seed in range(3):
        mean, logvar, noise = _gaussian_params(seed)
        case = f"random mean/logvar/noise, seed {seed}"
        got = call(fn, name, mean, logvar, noise)
        known_mistake(got, {  # typical wrong answers, named before the generic "values are off"
            "you scaled the noise by exp(logvar), the variance; the standard deviation is exp(logvar / 2).":
                mean + torch.exp(logvar) * noise,
            "you scaled the noise by logvar itself; logvar is the log of the variance, the standard deviation is "
            "exp(logvar / 2).": mean + logvar * noise,
            "the noise is missing: z = mean + exp(logvar / 2) * noise.": mean + torch.exp(logvar / 2),
            "logvar is missing: the noise must be scaled by the standard deviation exp(logvar / 2).": mean + noise,
        }, name, case)
        expect_tensor(got, ref.reparameterize(mean, logvar, noise), name, case)
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
    written_here(fn, name)

    def one_per_sample(got, batch: int) -> None:  # the most common mistakes first, before any generic check
        if isinstance(got, torch.Tensor) and got.ndim == 0:
            raise ExerciseError(f"{name}: returned a single number; return one KL per sample, shape (B,) = "
                                f"({batch},): sum over dims (1, 2, 3) only.")
        if isinstance(got, torch.Tensor) and got.shape != (batch,):
            raise ExerciseError(f"{name}: got shape {tuple(got.shape)}: the KL was summed over the wrong axes. "
                                f"Sum over channels, height and width, dims (1, 2, 3), and keep the batch: shape "
                                f"({batch},).")

    zeros = torch.zeros(3, 2, 4, 4)
    got = call(fn, name, zeros, zeros)
    one_per_sample(got, 3)
    expect_tensor(got, torch.zeros(3), name, "mean 0 and logvar 0 is the prior itself: the KL must be 0 for every sample")
    for seed in range(3):
        mean, logvar, _ = _gaussian_params(seed)
        case = f"random mean/logvar, seed {seed}"
        got = call(fn, name, mean, logvar)
        one_per_sample(got, mean.shape[0])
        var, terms = logvar.exp(), (1, 2, 3)
        known_mistake(got, {
            "you averaged over C, H, W; the KL of independent dimensions is their sum.":
                0.5 * (mean**2 + var - 1 - logvar).mean(dim=terms),
            "the factor 1/2 is missing: KL = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar).":
                (mean**2 + var - 1 - logvar).sum(dim=terms),
            "the sign of the logvar term is flipped: it is  - logvar.": 0.5 * (mean**2 + var - 1 + logvar).sum(dim=terms),
            "you used the standard deviation exp(logvar / 2) where the variance exp(logvar) belongs.":
                0.5 * (mean**2 + (logvar / 2).exp() - 1 - logvar).sum(dim=terms),
            "mean must enter squared: mean^2, not mean.": 0.5 * (mean + var - 1 - logvar).sum(dim=terms),
        }, name, case)
        expect_tensor(got, ref.kl_divergence(mean, logvar), name, case, atol=1e-4)
    passed(name, "zero at the prior, one value per sample, matches 1/2 sum(mean^2 + var - 1 - logvar)")


def check_nearest_code(fn) -> None:
    """fn(z (B, C, H, W), codebook (K, C)) -> indices (B, H, W) of the nearest code."""
    name = "nearest_code"
    written_here(fn, name)

    def check(z, codebook, expected, case: str) -> None:
        got = call(fn, name, z, codebook)
        b, c, h, w = z.shape
        if isinstance(got, torch.Tensor) and got.shape == (b * h * w,):
            raise ExerciseError(f"{name} ({case}): got shape {tuple(got.shape)}, one index per latent vector but "
                                f"flat; reshape it back to (B, H, W) = {(b, h, w)}.")
        if isinstance(got, torch.Tensor) and got.is_floating_point():
            raise ExerciseError(f"{name} ({case}): got a {got.dtype} tensor of shape {tuple(got.shape)}; return the "
                                "indices of the codes (int64, from argmin), not the code vectors themselves.")
        distances = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, c), codebook)  # (B*H*W, K)
        mixed = torch.cdist(z.reshape(-1, c), codebook)  # z flattened without moving channels last
        known_mistake(got, {
            "these are the indices of the farthest codes: take the argmin of the distances, not the argmax.":
                distances.argmax(dim=1).view(b, h, w),
            "z.reshape(-1, C) on a (B, C, H, W) tensor mixes channels and positions: move the channels last first "
            "(z.permute(0, 2, 3, 1) or rearrange 'b c h w -> (b h w) c'), then flatten.":
                mixed.argmin(dim=1).view(b, h, w),
        }, name, case)
        expect_tensor(got, expected, name, case)

    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.2, 0.1], [0.6, 0.55]]).T.reshape(1, 2, 2, 2)
    check(z, codebook, torch.tensor([[[1, 2], [0, 1]]]),
          "3 codes (0,0), (1,0), (0,1) and 4 hand-made latent vectors in a 1x2x2x2 tensor")
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        z, codebook = torch.randn(2, 4, 3, 5, generator=g), torch.randn(16, 4, generator=g)
        check(z, codebook, ref.nearest_code(z, codebook),
              f"random z (2, 4, 3, 5) and a codebook of 16 codes, seed {seed}")
    passed(name, "indices of the nearest code are right, with shape (B, H, W)")


def check_straight_through(fn) -> None:
    """fn(z, z_q) -> a tensor equal to z_q whose gradient flows to z unchanged."""
    name = "straight_through"
    written_here(fn, name)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4, generator=g)
    out = call(fn, name, z, z_q)
    known_mistake(out, {
        "the output equals z: detach the other term, z + (z_q - z).detach(), so the value is z_q and the gradient "
        "goes to z.": z,
    }, name, "forward value")
    expect_tensor(out, z_q, name, "forward value: it must equal z_q")
    weights = torch.randn(2, 3, 4, 4, generator=g)
    if not out.requires_grad:
        raise ExerciseError(f"{name}: the output has no gradient path to z; write z + (z_q - z).detach().")
    (out * weights).sum().backward()
    if z.grad is None or not z.grad.any():
        raise ExerciseError(f"{name} (backward): the gradient w.r.t. z is zero: without .detach() the two z terms "
                            "of z + (z_q - z) cancel in the backward pass as well; detach (z_q - z).")
    expect_tensor(z.grad, weights, name, "backward: the gradient w.r.t. z must be the incoming gradient, unchanged")
    passed(name, "forward gives z_q, backward copies the gradient to z")
