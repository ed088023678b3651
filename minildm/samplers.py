"""Samplers: from pure noise to data with a trained denoiser (course stage 7).

Every sampler here has the same skeleton:
1. ask the model for its prediction at (x_t, t) -- `model_output`, with classifier-free guidance if asked;
2. turn it into (x0_hat, eps_hat) with `to_x0_and_eps` (so eps-, x0- and v-models all work);
3. take one step to a less noisy x.
So far: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 written with the posterior of eq. 7).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minildm.diffusion import check_prediction, to_x0_and_eps
from minildm.schedules import NoiseSchedule


class Snapshot(NamedTuple):
    """One frame of a sampling trajectory (on the CPU): timestep, current x_t, and the model's x0 guess."""

    t: int
    x_t: torch.Tensor
    x0_hat: torch.Tensor


def model_output(model, x, t, context=None, guidance_scale: float = 1.0, uncond_context=None) -> torch.Tensor:
    """The model's prediction at (x, t), with classifier-free guidance (Ho & Salimans 2022) when scale != 1:

        out = out_uncond + s (out_cond - out_uncond).

    Written on eps this is the usual eps_u + s (eps_c - eps_u); because x0 and v are linear in eps at a fixed
    (x_t, t), guiding the raw output is the same thing for every prediction type. The conditional and
    unconditional passes run as one batch of 2B.
    """
    if guidance_scale == 1.0:
        return model(x, t, context)
    if context is None or uncond_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs both a context and an uncond_context "
                         "(e.g. the embedding of the empty caption); guidance_scale=1.0 turns guidance off")
    out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_context, context])).chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def _check_shape_and_device(shape, schedule: NoiseSchedule, device):
    shape = tuple(shape)
    if len(shape) < 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (batch, ...) with positive sizes, e.g. (16, 4, 8, 8); got {shape}")
    return shape, torch.device(device) if device is not None else schedule.device


@torch.no_grad()
def ddpm_sample(model, shape, schedule: NoiseSchedule, context=None, prediction: str = "eps",
                generator: torch.Generator | None = None, device=None, return_trajectory: bool = False,
                clip_x0: float | None = None, progress: bool = False, guidance_scale: float = 1.0,
                uncond_context=None, trajectory_every: int | None = None, variance: str = "beta_tilde"):
    """DDPM ancestral sampling: all T steps from x_{T-1} ~ N(0, I) down to t = 0.

    Each step draws x_{t-1} from the posterior q(x_{t-1} | x_t, x_0 = x0_hat) (Ho et al. eq. 7):

        x_{t-1} = coef_x0_t x0_hat + coef_xt_t x_t + sqrt(beta_tilde_t) z,   z ~ N(0, I),  no noise at t = 0,

    where x0_hat comes from the model (optionally clipped to [-clip_x0, clip_x0], e.g. 1.0 for pixels).
    `variance` picks the noise added per step (Ho et al. Sec. 3.2): "beta_tilde" (the posterior variance,
    exact if the data were a single point) or "beta" (beta_t, exact for data ~ N(mu, I)); both work well.
    `shape` is (B, ...) of the samples; `context` has batch B (or is None). Returns x, or
    (x, [Snapshot, ...]) every `trajectory_every` steps (default T // 10) and at t = 0 if return_trajectory.
    """
    check_prediction(prediction)
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose 'beta_tilde' or 'beta'")
    variance_table = "posterior_variance" if variance == "beta_tilde" else "betas"
    shape, device = _check_shape_and_device(shape, schedule, device)
    every = trajectory_every or max(schedule.T // 10, 1)
    x = torch.randn(shape, generator=generator, device=device)
    trajectory = []
    steps = reversed(range(schedule.T))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=schedule.T, desc="DDPM")
    for i in steps:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # (B,) for the model
        out = model_output(model, x, t, context, guidance_scale, uncond_context)
        # The schedule lookups take the Python int i: no host-device round trip per step (see NoiseSchedule.at)
        x0_hat, _ = to_x0_and_eps(out.float(), x, i, schedule, prediction)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        if return_trajectory and (i % every == 0 or i == schedule.T - 1):
            trajectory.append(Snapshot(i, x.cpu(), x0_hat.cpu()))
        mean = schedule.at("posterior_mean_coef_x0", i, x) * x0_hat
        mean = mean + schedule.at("posterior_mean_coef_xt", i, x) * x
        if i > 0:
            noise = torch.randn(shape, generator=generator, device=device)
            x = mean + schedule.at(variance_table, i, x).sqrt() * noise
        else:
            x = mean
    return (x, trajectory) if return_trajectory else x
