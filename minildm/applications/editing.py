"""Stage 10, part 1: editing images with any trained denoiser, no retraining: inpainting and SDEdit.

Both reuse the samplers of stage 8 as they are; they only change what the sampler starts from and what the model
sees. Everything here works on any data shape (B, ...): latents, pixels, or the 2-d toy data of the tests.

**Inpainting by replacement** (Song et al. 2021, "Score-based generative modeling through SDEs", Sec. 5 and
App. I.2; Lugmayr et al. 2022, "RePaint", Sec. 4.1, eq. 8). A mask m is 1 in the hole (the region to regenerate)
and 0 where the original x0 is kept. Before every model call the known region is replaced by the original,
noised to the current level:

    x_t <- m * x_t + (1 - m) * x_t^known,      x_t^known ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I),

so the model always sees a consistent noisy picture of "hole + what we know", and its step fills the hole to
match. At the end the known region is pasted exactly: out = m * x + (1 - m) * x0.
Why wrapping the model is enough for every sampler: each sampler's update is elementwise in (x_t, x0_hat, eps_hat),
so the hole part of the sampler's state is exactly what it would be had we replaced the state itself; its known
part is never read by the model and is overwritten at the end.

**RePaint resampling** (Lugmayr et al. 2022, Sec. 4.2, Algorithm 1). Replacement alone harmonises poorly: the
known part is noised independently of what the model drew in the hole, and one step cannot reconcile them. RePaint
goes back: after denoising a stretch of `jump` steps it re-noises along the forward process,

    x_t ~ q(x_t | x_s) = N(sqrt(alpha_bar_t / alpha_bar_s) x_s, (1 - alpha_bar_t / alpha_bar_s) I),   t > s,

and denoises the stretch again, `resample` times in all (the paper: jump 10, resample 10 for T = 250).

**SDEdit** (Meng et al. 2022, Sec. 3 and Algorithm 1): a guide image (a photo, a sketch, another caption's sample)
is noised to t0 = strength * (T - 1), x_t0 ~ q(x_t0 | x_guide), and denoised from there under a new condition.
strength 0 returns the guide, strength 1 starts from pure noise and ignores it; in between, the noise washes out
the details below the noise level of t0 and keeps the coarse layout.
"""

from __future__ import annotations

import itertools
import numbers

import torch
import torch.nn.functional as F

from minildm.diffusion import check_prediction, to_x0_and_eps
from minildm.samplers import (
    DEFAULT_STEPS,
    SAMPLERS,
    _check_steps,
    check_guidance,  # (defined beside classifier-free guidance; re-exported by minildm.applications)
    ddim_step,
    model_output,
    sample,
    uniform_timesteps,
)
from minildm.schedules import NoiseSchedule
from minildm.text import check_prompts

# ---------------------------------------------------------------------------------------------
# Checking inputs: masks, strengths, guidance, prompts
# ---------------------------------------------------------------------------------------------


def check_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask for data `like` (B, C, *spatial) (or (B, D)) as a float tensor that broadcasts against it.

    Accepted: `like`'s own shape, (B, 1, *spatial), or (B, *spatial); bool or values in [0, 1]; 1 (True) marks the
    hole to regenerate, 0 what is kept.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor (1 = regenerate, 0 = keep), got {type(mask).__name__}")
    shape, ok = tuple(like.shape), [tuple(like.shape)]
    if like.ndim >= 3:
        ok += [(shape[0], 1, *shape[2:]), (shape[0], *shape[2:])]
    if tuple(mask.shape) not in ok:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the data are {shape}: pass a mask of shape "
                         f"{' or '.join(str(s) for s in ok[1:] or ok)}, 1 (True) where the region is regenerated and "
                         "0 where it is kept (for latents, `latent_mask` shrinks a pixel mask to the latent grid)")
    mask = mask.to(like.device, like.dtype if like.is_floating_point() else torch.float32)
    if like.ndim >= 3 and mask.ndim == like.ndim - 1:
        mask = mask.unsqueeze(1)  # (B, *spatial) -> (B, 1, *spatial)
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"mask values must lie in [0, 1] (1 = regenerate, 0 = keep), got [{mask.min().item():.3g}, "
                         f"{mask.max().item():.3g}]")
    return mask


def latent_mask(mask: torch.Tensor, latent_size: int | tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, H, W) or (B, 1, H, W) -> (B, 1, h, w) on the latent grid: a latent cell belongs to the hole if
    any pixel it covers does (max pooling). Erring towards the hole keeps the decoder's blur off the kept region."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"a pixel mask must have shape (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    return F.adaptive_max_pool2d(mask.float(), latent_size)


def check_strength(strength) -> float:
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 returns the input, 1 ignores it and starts from "
                         f"pure noise; SDEdit works best around 0.4-0.7), got {strength!r}")
    return float(strength)


def guided(model, guidance_scale: float = 1.0, uncond_context=None):
    """model(x, t, context) with classifier-free guidance folded in (`samplers.model_output`), so that wrappers
    below see one batch of B, never the 2B of the guided pass."""
    def call(x, t, context=None):
        return model_output(model, x, t, context, guidance_scale, uncond_context)

    return call


# ---------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------


def paste_known(model, x0: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule,
                generator: torch.Generator | None = None):
    """Wrap `model(x, t, c)` so that it sees x_t with the known region replaced by q(x_t | x0) (fresh noise at every
    call): x_t <- m x_t + (1 - m) (sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps). mask: as `check_mask`."""
    mask = check_mask(mask, x0)

    def call(x, t, context=None):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        known = schedule.q_sample(x0, t, noise)  # (B, ...) at the level of t
        return model(mask * x + (1 - mask) * known, t, context)

    return call


def repaint_path(n: int, jump: int, resample: int) -> list[int]:
    """RePaint's visiting order over step indices 0..n (index n = clean data): down a stretch of `jump` indices,
    back up to its start, down again, `resample` passes per stretch. resample=1 is the plain path 0, 1, ..., n.

    >>> repaint_path(4, 2, 2)
    [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4]
    """
    if not (isinstance(jump, int) and jump >= 1 and isinstance(resample, int) and resample >= 1):
        raise ValueError(f"RePaint needs jump >= 1 and resample >= 1 (ints; resample=1 turns resampling off), got "
                         f"jump={jump!r}, resample={resample!r}")
    path = [0]
    for start in range(0, n, jump):
        end = min(start + jump, n)
        for r in range(resample):
            if r:
                path += list(range(end - 1, start - 1, -1))  # back up, re-noising one step at a time
            path += list(range(start + 1, end + 1))  # and down again, denoising
    return path


@torch.no_grad()
def inpaint(model, x0: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule, sampler: str = "ddpm",
            steps=None, context=None, prediction: str = "eps", guidance_scale: float = 1.0, uncond_context=None,
            generator: torch.Generator | None = None, resample: int = 1, jump: int = 10, eta: float = 0.0,
            clip_x0: float | None = None) -> torch.Tensor:
    """Regenerate the hole (mask = 1) of x0 (B, ...) consistently with the rest; returns (B, ...) with the kept region
    equal to x0.

    resample = 1: replacement at every step with any sampler of `minildm.samplers` (its `steps`, `eta`).
    resample > 1: RePaint (DDPM steps on `uniform_timesteps(T, steps)`, each stretch of `jump` steps denoised
    `resample` times; about `resample` times the model calls). The other arguments are those of `sample`.
    """
    check_prediction(prediction)
    mask = check_mask(mask, x0)
    if guidance_scale != 1.0:
        check_guidance(guidance_scale)
    model = paste_known(guided(model, guidance_scale, uncond_context), x0, mask, schedule, generator)
    if resample == 1:
        x = sample(model, x0.shape, schedule, sampler=sampler, steps=steps, context=context, prediction=prediction,
                   generator=generator, device=x0.device, eta=eta, clip_x0=clip_x0)
        return mask * x + (1 - mask) * x0
    if sampler != "ddpm":
        raise ValueError(f"RePaint resampling (resample={resample}) runs DDPM steps; pass sampler='ddpm' (or "
                         "resample=1 for replacement with any sampler)")
    T = schedule.T
    steps = T if steps is None else steps
    _check_steps(steps, T)
    timesteps = uniform_timesteps(T, steps)
    alpha_bar = schedule.alpha_bar.tolist()
    ab = [alpha_bar[t] for t in timesteps] + [1.0]  # index n = clean data
    path = repaint_path(len(timesteps), jump, resample)
    x = torch.randn(x0.shape, generator=generator, device=x0.device)
    for i, j in itertools.pairwise(path):
        if j == i + 1:  # denoise: one DDPM step (DDIM with eta = 1) from timesteps[i] to the next level
            t = torch.full((x0.shape[0],), timesteps[i], device=x0.device, dtype=torch.long)
            out = model(x, t, context)
            x0_hat, eps_hat = to_x0_and_eps(out.to(x.dtype), x, timesteps[i], schedule, prediction)
            if clip_x0 is not None:
                x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
            noise = torch.randn(x.shape, generator=generator, device=x.device) if j < len(timesteps) else None
            x = ddim_step(x0_hat, eps_hat, ab[i], ab[j], 1.0, noise)
        else:  # re-noise one level up along the forward process, q(x_t | x_s) with alpha_bar_t / alpha_bar_s
            ratio = ab[j] / ab[i]
            x = ratio**0.5 * x + (1 - ratio) ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
    return mask * x + (1 - mask) * x0


# ---------------------------------------------------------------------------------------------
# SDEdit
# ---------------------------------------------------------------------------------------------


def sdedit_timesteps(T: int, strength: float, steps: int) -> list[int]:
    """The timesteps SDEdit visits: from t0 = round(strength * (T - 1)) down to 0, max(1, round(strength * steps))
    of them evenly spaced (so strength 0.5 runs half the steps of a full sample). Empty for strength 0."""
    strength = check_strength(strength)
    _check_steps(steps, T)
    t0 = round(strength * (T - 1))
    if strength == 0:
        return []
    return uniform_timesteps(t0 + 1, min(max(1, round(strength * steps)), t0 + 1))


@torch.no_grad()
def img2img(model, x0: torch.Tensor, schedule: NoiseSchedule, strength: float, sampler: str = "ddim", steps=None,
            context=None, prediction: str = "eps", guidance_scale: float = 1.0, uncond_context=None,
            generator: torch.Generator | None = None, eta: float = 0.0, clip_x0: float | None = None) -> torch.Tensor:
    """SDEdit: noise x0 (B, ...) to t0 = strength * (T - 1) and denoise it under `context`; returns (B, ...).

    strength 0 returns x0 (a copy); strength 1 starts from pure noise, exactly as `sample` with the same generator
    does, and ignores x0. `steps` counts the steps of a full run (None: all T for "ddpm", 50 otherwise); SDEdit takes
    the fraction `strength` of them, evenly spaced below t0 (`sdedit_timesteps`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    check_prediction(prediction)
    if guidance_scale != 1.0:
        check_guidance(guidance_scale)
    T = schedule.T
    steps = (T if sampler == "ddpm" else min(DEFAULT_STEPS, T)) if steps is None else steps
    timesteps = sdedit_timesteps(T, strength, steps)
    if not timesteps:
        return x0.clone()
    x_start = None  # strength 1: pure noise, as `sample` (q(x_{T-1} | x0) is nearly that unless alpha_bar_{T-1} = 0)
    if strength == 1:
        timesteps = steps  # and the sampler's own spacing, so that the run is `sample`'s
    else:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_start = schedule.q_sample(x0, timesteps[0], noise)
    return sample(guided(model, guidance_scale, uncond_context), x0.shape, schedule, sampler=sampler,
                  steps=timesteps, context=context, prediction=prediction, generator=generator, device=x0.device,
                  eta=eta, clip_x0=clip_x0, x_start=x_start)


# ---------------------------------------------------------------------------------------------
# Images through a text-to-image latent diffusion model (a `Denoiser` and its autoencoder)
# ---------------------------------------------------------------------------------------------


def _latent_setup(denoiser, schedule, images, captions, runtime, autoencoder, guidance_scale, seed):
    """Shared by the two functions below: checks, latents of the images, the model call, token ids, generator."""
    denoiser.eval()
    schedule.to(runtime.device)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be an RGB batch (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    B = images.shape[0]
    captions = check_prompts(denoiser.tokenizer, captions, B)
    check_guidance(guidance_scale)
    with runtime.autocast():
        z = autoencoder.encode_latents(images.to(runtime.device)).float()  # (B, C, h, w)

    def model(x, t, ids):
        with runtime.autocast():
            return denoiser(x, t, ids).float()

    ids, uncond = denoiser.tokenize(captions), denoiser.tokenize([""] * B)
    return z, model, {"context": ids, "uncond_context": uncond, "guidance_scale": guidance_scale,
                      "generator": torch.Generator(device=runtime.device).manual_seed(seed)}


def _decode(autoencoder, z, runtime):
    with runtime.autocast():
        return autoencoder.decode_latents(z).float().clamp(-1, 1)


@torch.no_grad()
def inpaint_images(denoiser, schedule, images: torch.Tensor, mask: torch.Tensor, captions, runtime, autoencoder,
                   guidance_scale: float = 3.0, seed: int = 0, **kwargs) -> torch.Tensor:
    """Inpainting with a text-to-image latent model: the pixel mask (B, H, W) or (B, 1, H, W) (1 = regenerate) is
    moved to the latent grid (`latent_mask`), `inpaint` runs on the latents of `images` (B, 3, H, W), and after
    decoding the pixels outside the hole are pasted from `images`. kwargs: those of `inpaint` (sampler, steps,
    resample, jump, ...). Returns (B, 3, H, W) in [-1, 1]."""
    z, model, args = _latent_setup(denoiser, schedule, images, captions, runtime, autoencoder, guidance_scale, seed)
    images = images.to(runtime.device)
    pixel_mask = check_mask(mask, images)
    z = inpaint(model, z, latent_mask(pixel_mask, z.shape[-1]), schedule, **args, **kwargs)
    return pixel_mask * _decode(autoencoder, z, runtime) + (1 - pixel_mask) * images


@torch.no_grad()
def img2img_images(denoiser, schedule, images: torch.Tensor, captions, strength: float, runtime, autoencoder,
                   guidance_scale: float = 3.0, seed: int = 0, **kwargs) -> torch.Tensor:
    """SDEdit with a text-to-image latent model: `img2img` on the latents of `images` (B, 3, H, W) under new
    `captions`, decoded. strength 0 returns the images' reconstructions. kwargs: those of `img2img`."""
    check_strength(strength)
    z, model, args = _latent_setup(denoiser, schedule, images, captions, runtime, autoencoder, guidance_scale, seed)
    return _decode(autoencoder, img2img(model, z, schedule, strength, **args, **kwargs), runtime)
