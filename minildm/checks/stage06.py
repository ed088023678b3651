"""Checkers for exercise 06 (latent diffusion): the latent scale factor s = 1 / std (LDM Sec. 4.3 and Appendix G),
scaled latents z = s * E(x) from a frozen autoencoder, decoding D(z / s), and the loss of LDM eq. (3) on scaled
latents. References: minildm.autoencoder.Autoencoder (compute_scale_factor, encode_latents, decode_latents) and
minildm.schedules.NoiseSchedule.q_sample."""

from __future__ import annotations

import torch

from minildm.autoencoder import Autoencoder, AutoencoderConfig
from minildm.checks import (
    ExerciseError,
    expect_loss_gradients,
    expect_tensor,
    known_mistake,
    passed,
    run,
    written_here,
)
from minildm.checks.stage05 import _ProbeModel
from minildm.data import ShapesConfig, ShapesDataset
from minildm.schedules import NoiseSchedule

SCALE = 2.5  # the scale handed to the student's functions; the probe autoencoder's own buffer stays at 1


def probe_autoencoder(seed: int = 0, trainable: bool = False) -> Autoencoder:
    """A tiny KL autoencoder (16 px -> 2 x 8 x 8 latents), random but fixed weights, in eval mode; with
    `trainable`, its weights require gradients (as in a training loop that forgot to freeze it), so that an answer
    that lets gradients into it shows."""
    with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG is untouched
        torch.manual_seed(seed)
        autoencoder = Autoencoder(AutoencoderConfig(image_size=16, base_channels=8, channel_mult=(1, 2),
                                                    num_res_blocks=1, latent_channels=2, mid_attention=False))
    return autoencoder.eval().requires_grad_(trainable)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return ShapesDataset(ShapesConfig(image_size=16, seed=seed)).batch(range(n))["image"]


def _call_quietly(fn, name, case, *args, hint="", seed=1234):
    """The student's function with the global RNG seeded by `seed` and restored afterwards: two calls with other
    seeds show a posterior sample as a difference, and the notebook's random state is not disturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return run(fn, name, case, *args, hint=hint)


# ---------------------------------------------------------------- 1. the scale factor


def check_latent_scale_factor(fn) -> None:
    """fn(z (N, c, h, w) latents) -> a Python float, 1 / (standard deviation over every element)."""
    name = "latent_scale_factor"
    written_here(fn, name)
    g = torch.Generator().manual_seed(0)
    cases = {"latents of std 0.2 around 0 (4, 4, 8, 8)": torch.randn(4, 4, 8, 8, generator=g) * 0.2,
             "latents of std 3 around 1.5, channels of different widths (8, 2, 6, 6)":
                 (torch.randn(8, 2, 6, 6, generator=g) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)) + 1.5}
    with torch.no_grad():
        cases["the latents of the probe autoencoder on 8 Shapes images (8, 2, 8, 8)"] = (
            probe_autoencoder().encode(_images(8), sample=False).z)
    for case, z in cases.items():
        got = run(fn, name, case, z.clone())
        z64 = z.double()
        want = 1.0 / z64.std(unbiased=False).item()
        if isinstance(got, torch.Tensor) and got.numel() > 1:
            raise ExerciseError(f"{name} ({case}): got a tensor of shape {tuple(got.shape)}; the scale factor is "
                                "one number, 1 / std over every element of the latents (all channels together).")
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, (float, int)):
            raise ExerciseError(f"{name} ({case}): return a Python float (e.g. `.item()`), got {type(got).__name__}.")
        mistakes = {
            "that is the standard deviation itself; the scale factor is its inverse, 1 / std, so that s * z has "
            "unit variance.": z64.std().item(),
            "that is 1 / variance; the scale factor is 1 / std, the inverse of the square root of the variance.":
                1.0 / z64.var().item(),
            "that is 1 / the mean absolute value; the scale factor is 1 / standard deviation.":
                1.0 / z64.abs().mean().item(),
            "that is 1 / the root mean square (the mean was not subtracted); the scale factor is 1 / std.":
                1.0 / z64.pow(2).mean().sqrt().item(),
        }
        for message, wrong in mistakes.items():
            if abs(got - wrong) <= 2e-3 * abs(wrong) and abs(wrong - want) > 2e-3 * abs(want):
                raise ExerciseError(f"{name} ({case}): {message}")
        if abs(got - want) > 2e-3 * want:  # N or N - 1 in the std: both fine here
            raise ExerciseError(f"{name} ({case}): got {got:.6g}, expected 1 / std = {want:.6g}.")
    passed(name, "one number, 1 / std over all elements of the latents")


# ---------------------------------------------------------------- 2. scaled latents


def check_encode_latents(fn) -> None:
    """fn(autoencoder, images (B, 3, H, W), scale) -> scale * posterior mean (B, c, H/f, W/f), without gradients."""
    name = "encode_latents"
    written_here(fn, name)
    autoencoder = probe_autoencoder(trainable=True)
    for n, scale in ((4, SCALE), (3, 0.5)):
        images = _images(n, seed=n)
        case = f"{n} Shapes images of 16 px, scale {scale}"
        with torch.no_grad():
            mean = autoencoder.encode(images, sample=False).z
            sample = autoencoder.encode(images, sample=True, noise=torch.randn(mean.shape,
                                        generator=torch.Generator().manual_seed(0))).z
        want = scale * mean
        got = _call_quietly(fn, name, case, autoencoder, images, scale)
        again = _call_quietly(fn, name, case, autoencoder, images, scale, seed=4321)
        if isinstance(got, torch.Tensor) and isinstance(again, torch.Tensor) and got.shape == again.shape and \
                not torch.equal(got, again):
            raise ExerciseError(f"{name} ({case}): two calls gave different latents: that is a posterior sample. "
                                "Diffusion trains on the deterministic latents, the posterior mean: "
                                "autoencoder.encode(images, sample=False).z.")
        known_mistake(got, {
            "the latents are not scaled: multiply by `scale` (autoencoder.encode_latents would use the "
            "autoencoder's own scale_factor buffer, 1 in this check, not the scale you are given).": mean,
            "the latents were divided by the scale factor; encoding multiplies: z = scale * E(x) (decoding "
            "divides).": mean / scale,
            "that is a posterior sample scaled; use the posterior mean, encode(images, sample=False).z.":
                scale * sample,
        }, name, case, want)
        expect_tensor(got, want, name, case, atol=1e-5)
        if got.requires_grad:
            raise ExerciseError(f"{name} ({case}): the latents carry a gradient; the first stage is frozen while "
                                "the diffusion model trains: encode under torch.no_grad().")
    passed(name, "scale * posterior mean, deterministic, no gradient into the frozen autoencoder")


# ---------------------------------------------------------------- 3. decoding


def check_decode_latents(fn) -> None:
    """fn(autoencoder, z (B, c, h, w) scaled latents, scale) -> images decode(z / scale)."""
    name = "decode_latents"
    written_here(fn, name)
    autoencoder = probe_autoencoder()
    g = torch.Generator().manual_seed(3)
    for n, scale in ((2, SCALE), (3, 0.5)):
        z = torch.randn(n, 2, 8, 8, generator=g)
        case = f"{n} random scaled latents (B, 2, 8, 8), scale {scale}"
        with torch.no_grad():
            got = run(fn, name, case, autoencoder, z.clone(), scale)
            want = autoencoder.decode(z / scale)
            known_mistake(got, {
                "the latents were multiplied by the scale again; undo the scaling before decoding: "
                "decode(z / scale).": autoencoder.decode(z * scale),
                "the scale was not undone: the decoder expects the autoencoder's own latents, z / scale.":
                    autoencoder.decode(z),
            }, name, case, want)
        expect_tensor(got, want, name, case, atol=1e-5)
    with torch.no_grad():
        images = _images(2)
        z = SCALE * autoencoder.encode(images, sample=False).z
        got = run(fn, name, "round trip", autoencoder, z, SCALE)
        expect_tensor(got, autoencoder.decode(autoencoder.encode(images, sample=False).z), name,
                      "round trip: decoding scale * E(x) must give D(E(x))", atol=1e-5)
    passed(name, "decode(z / scale); scale * E(x) decodes to D(E(x))")


# ---------------------------------------------------------------- 4. the loss of eq. (3)


def check_latent_diffusion_loss(fn) -> None:
    """fn(model, autoencoder, images, t, noise, schedule, scale) -> scalar: mean ||noise - model(z_t, t)||^2 with
    z_t = q_sample(scale * E(x), t, noise) (LDM eq. 3, eps-prediction, no conditioning)."""
    name = "latent_diffusion_loss"
    written_here(fn, name)
    autoencoder = probe_autoencoder(trainable=True)
    T = 100
    schedule = NoiseSchedule.from_name("cosine", T)
    hint = ("The model works on latents (B, 2, 8, 8), not on images (B, 3, 16, 16): noise the scaled latents "
            "scale * E(x).")
    for seed, scale in ((0, SCALE), (1, 0.5)):
        g = torch.Generator().manual_seed(seed)
        images = _images(4, seed=seed + 10)
        t = schedule.sample_timesteps(4, generator=g)
        noise = torch.randn(4, 2, 8, 8, generator=g)
        case = f"4 Shapes images, t={t.tolist()}, scale {scale}"
        with torch.no_grad():
            z0 = autoencoder.encode(images, sample=False).z
        reference_model, model = _ProbeModel(2, T), _ProbeModel(2, T)
        want = (reference_model(schedule.q_sample(scale * z0, t, noise), t) - noise).pow(2).mean()
        got = _call_quietly(fn, name, case, model, autoencoder, images, t, noise, schedule, scale, hint=hint)
        if not model.inputs:
            raise ExerciseError(f"{name} ({case}): the model was never called; compute model(z_t, t).")
        z_t, t_seen = model.inputs[-1]
        expect_tensor(t_seen, t, name, case + ": the timesteps given to the model")
        known_mistake(z_t, {
            "the model saw noised latents that were not scaled: z_t = q_sample(scale * E(x), t, noise); without "
            "the scale the latents' variance is not 1 and the schedule's noise levels mean something else.":
                schedule.q_sample(z0, t, noise),
            "the latents were divided by the scale before noising; z = scale * E(x).":
                schedule.q_sample(z0 / scale, t, noise),
            "the model saw the clean latents; its input is z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) noise.":
                scale * z0,
        }, name, case + ", the model's input", schedule.q_sample(scale * z0, t, noise))
        expect_tensor(z_t, schedule.q_sample(scale * z0, t, noise), name,
                      case + ": the model's input must be z_t = q_sample(scale * E(x), t, noise), E(x) the posterior "
                      "mean")
        if isinstance(got, torch.Tensor) and got.ndim != 0:
            raise ExerciseError(f"{name} ({case}): expected one number (a 0-dim tensor), got shape "
                                f"{tuple(got.shape)}: average over the batch and every element.")
        with torch.no_grad():
            out = _ProbeModel(2, T)(schedule.q_sample(scale * z0, t, noise), t)
            known_mistake(got, {
                "the target is the clean latent; eq. (3) with eps-prediction regresses the noise.":
                    (out - scale * z0).pow(2).mean(),
                "the target is the unscaled clean latent E(x); eq. (3) with eps-prediction regresses the noise.":
                    (out - z0).pow(2).mean(),
                "the loss is summed; eq. (3) is an expectation: take the mean over the batch and every element.":
                    (out - noise).pow(2).sum(),
            }, name, case, want.detach())
        expect_tensor(got, want.detach(), name, case + ": the loss value")
        expect_loss_gradients(got, want, model, reference_model, name, case)
        if any(p.grad is not None for p in autoencoder.parameters()):
            raise ExerciseError(f"{name} ({case}): the loss sent gradients into the autoencoder; the first stage is "
                                "frozen while the diffusion model trains: encode under torch.no_grad().")
    passed(name, "the model sees q_sample(scale * E(x), t, noise) and t, loss = mean squared error to the noise, "
                 "gradients reach the model only")
