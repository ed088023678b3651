"""Checkers for exercise 10 (applications): SDEdit's start, x_t0 ~ q(x_t0 | x_guide) at t0 = round(strength (T - 1))
(Meng et al. 2022, Algorithm 1), the model's input in inpainting by replacement (Song et al. 2021, App. I.2;
Lugmayr et al. 2022, eq. 8), and the input of a mask-conditioned inpainting model, [z_t, m, E(x (1 - m))] (LDM
Sec. 4.5). References: minildm.applications.editing (sdedit_timesteps, img2img, paste_known, check_strength) and
minildm.applications.conditioned (inpainting_condition, latent_mask)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from minildm.applications.conditioned import inpainting_condition
from minildm.checks import (
    ExerciseError,
    expect_tensor,
    expect_value_error,
    known_mistake,
    passed,
    run,
    written_here,
)
from minildm.schedules import NoiseSchedule


def _noised(x0, noise, ab):
    """sqrt(ab) x0 + sqrt(1 - ab) noise for ab a float64 scalar or (B,) tensor, in x0's dtype."""
    ab = torch.as_tensor(ab, dtype=torch.float64).reshape(-1, *[1] * (x0.ndim - 1))
    return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).to(x0.dtype)


def _unchanged(before: torch.Tensor, after: torch.Tensor, what: str, name: str, case: str) -> None:
    if not torch.equal(before, after):
        raise ExerciseError(f"{name} ({case}): your function changed {what} in place; compute a new tensor and "
                            f"leave {what} as it was (the sampler still needs it).")


# ---------------------------------------------------------------- 1. SDEdit's start


def _as_timestep(t0, name, case):
    if isinstance(t0, torch.Tensor) and t0.numel() == 1 and not t0.is_floating_point():
        t0 = t0.item()
    if isinstance(t0, bool) or not isinstance(t0, numbers.Integral):
        raise ExerciseError(f"{name} ({case}): t0 must be an integer timestep (a Python int), got "
                            f"{type(t0).__name__} {t0!r}: t0 = round(strength * (T - 1)).")
    return int(t0)


def check_sdedit_start(fn) -> None:
    """fn(x0, strength, alpha_bar, noise) -> (t0, x_t0): t0 = round(strength * (T - 1)) (an int), x_t0 =
    sqrt(alpha_bar[t0]) x0 + sqrt(1 - alpha_bar[t0]) noise; a strength outside [0, 1] is a ValueError."""
    name = "sdedit_start"
    written_here(fn, name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=g)
    hint = "Timesteps run from 0 (clean) to T - 1 (pure noise): strength 1 is t0 = T - 1, alpha_bar[T - 1]."
    for schedule_name, T, strength in (("scaled_linear", 1000, 0.3), ("scaled_linear", 1000, 0.75),
                                       ("scaled_linear", 1000, 1.0), ("cosine", 50, 0.62), ("cosine", 50, 0.1)):
        case = f"strength {strength}, a {schedule_name} schedule of T = {T}"
        alpha_bar = NoiseSchedule.from_name(schedule_name, T).alpha_bar  # (T,) float64
        given = x0.clone()
        got = run(fn, name, case, given, strength, alpha_bar.clone(), noise.clone(), hint=hint)
        _unchanged(x0, given, "x0", name, case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseError(f"{name} ({case}): return two things, (t0, x_t0): the start timestep and the noised "
                                f"guide; got {type(got).__name__}.")
        t0, x_t0 = got
        t0 = _as_timestep(t0, name, case)
        want_t0 = round(strength * (T - 1))
        if t0 != want_t0:
            wrong = {
                round(strength): "you used the strength as the timestep itself; strength is the fraction of the way "
                                 "to pure noise, t0 = round(strength * (T - 1)).",
                int(strength * (T - 1)): "int() cuts the fraction off (it rounds down); t0 = round(strength * (T - 1)) "
                                         "rounds to the nearest timestep.",
                round(strength * T): "off by one: timesteps run 0..T-1, so t0 = round(strength * (T - 1)); "
                                     "strength 1 is t = T - 1, not T.",
                T - 1 - want_t0: "t0 counts from the wrong end: t = 0 is the clean data and t = T - 1 pure noise, so "
                                 "a higher strength must give a larger t0 = round(strength * (T - 1)).",
            }
            raise ExerciseError(f"{name} ({case}): t0 = {t0}, expected {want_t0}. " + wrong.get(
                t0, "t0 = round(strength * (T - 1))."))
        ab = alpha_bar[want_t0]
        want = _noised(x0, noise, ab)
        mistakes = {
            f"x_t0 was noised with alpha_bar[t0 + 1]; q(x_t0 | x0) uses alpha_bar[t0] (index {want_t0}).":
                _noised(x0, noise, alpha_bar[min(want_t0 + 1, T - 1)]),
            f"x_t0 was noised with alpha_bar[t0 - 1]; q(x_t0 | x0) uses alpha_bar[t0] (index {want_t0}).":
                _noised(x0, noise, alpha_bar[max(want_t0 - 1, 0)]),
            "x_t0 was noised with alpha_bar[T - 1 - t0]: the table is indexed by t itself, alpha_bar[t0].":
                _noised(x0, noise, alpha_bar[T - 1 - want_t0]),
            "the square roots are missing: x_t0 = sqrt(alpha_bar_t0) x0 + sqrt(1 - alpha_bar_t0) noise.":
                (ab * x0.double() + (1 - ab) * noise.double()).float(),
            "x0 and the noise have swapped coefficients: x_t0 = sqrt(alpha_bar_t0) x0 + sqrt(1 - alpha_bar_t0) noise "
            "(alpha_bar is near 1 at t = 0, where x_t is nearly clean).":
                (ab.sqrt() * noise.double() + (1 - ab).sqrt() * x0.double()).float(),
            "the noise was added without its weight sqrt(1 - alpha_bar_t0): x_t0 = sqrt(alpha_bar_t0) x0 + "
            "sqrt(1 - alpha_bar_t0) noise keeps the variance at 1.": (ab.sqrt() * x0.double() + noise.double()).float(),
            "x_t0 is the guide itself: SDEdit starts from the guide noised to t0, q(x_t0 | x0).": x0,
            "x_t0 is the noise alone: the guide is lost; x_t0 = sqrt(alpha_bar_t0) x0 + sqrt(1 - alpha_bar_t0) noise.":
                noise,
        }
        known_mistake(x_t0, mistakes, name, case, want)
        expect_tensor(x_t0, want, name, case + ", x_t0")
    for strength in (-0.1, 1.5):
        expect_value_error(fn, name, f"strength {strength}", x0.clone(), strength, alpha_bar.clone(), noise.clone(),
                           why="says the strength must lie in [0, 1]")
    passed(name, "t0 = round(strength * (T - 1)), x_t0 from q(x_t0 | x0) with alpha_bar[t0]; strengths outside "
                 "[0, 1] refused")


# ---------------------------------------------------------------- 2. inpainting by replacement


def _box_mask(B, H, W, boxes):
    m = torch.zeros(B, 1, H, W)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        m[i, :, r0:r1, c0:c1] = 1
    return m


def check_replace_known(fn) -> None:
    """fn(x_t, x0, mask, t, alpha_bar, noise) -> m x_t + (1 - m) (sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise),
    t int64 (B,), one timestep per sample; mask 1 in the hole; data of any shape (B, ...)."""
    name = "replace_known"
    written_here(fn, name)
    alpha_bar = NoiseSchedule.from_name("scaled_linear", 1000).alpha_bar
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(3, 2, 6, 6, generator=g) * 2 - 1, torch.randn(3, 2, 6, 6, generator=g),
              torch.randn(3, 2, 6, 6, generator=g))
    points = (torch.rand(4, 2, generator=g) * 2 - 1, torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g))
    cases = [
        ("latents (3, 2, 6, 6), a mask (3, 1, 6, 6) of one box each, t = [10, 400, 900]", *images,
         _box_mask(3, 6, 6, [(1, 4, 2, 5), (0, 6, 0, 3), (2, 5, 1, 6)]), torch.tensor([10, 400, 900])),
        ("2-d points (4, 2), the second coordinate in the hole, t = 250 for all", *points,
         torch.tensor([0.0, 1.0]).expand(4, 2).clone(), torch.full((4,), 250)),
    ]
    hint = ("alpha_bar[t] has shape (B,): give it a 1 for every other dimension of the data, e.g. "
            "alpha_bar[t].view(-1, *[1] * (x0.ndim - 1)), so that the same code works on (B, C, H, W) and (B, D).")
    for case, x0, x_t, noise, mask, t in cases:
        ab = alpha_bar[t]
        known = _noised(x0, noise, ab)
        want = mask * x_t + (1 - mask) * known
        given = x_t.clone()
        got = run(fn, name, case, given, x0.clone(), mask.clone(), t.clone(), alpha_bar.clone(), noise.clone(),
                  hint=hint)
        _unchanged(x_t, given, "x_t", name, case)
        if isinstance(got, torch.Tensor) and got.ndim != x0.ndim:
            raise ExerciseError(f"{name} ({case}): expected shape {tuple(x0.shape)}, got {tuple(got.shape)}. {hint}")
        mistakes = {
            "the mask is inverted: 1 marks the hole, which keeps the sampler's x_t, and 0 the known region, which "
            "gets the original noised to level t: m x_t + (1 - m) x_t^known.": (1 - mask) * x_t + mask * known,
            "the known region holds the clean original x0: at step t the model expects every part of its input at "
            "noise level t, so paste x0 noised by q(x_t | x0), sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.":
                mask * x_t + (1 - mask) * x0,
            "the known region was noised with alpha_bar[t - 1]; q(x_t | x0) uses alpha_bar[t].":
                mask * x_t + (1 - mask) * _noised(x0, noise, alpha_bar[t - 1]),
            "the known region was noised with alpha_bar[t + 1]; q(x_t | x0) uses alpha_bar[t].":
                mask * x_t + (1 - mask) * _noised(x0, noise, alpha_bar[t + 1]),
            "every sample used the first sample's timestep t[0]; sample i is at its own level, alpha_bar[t[i]].":
                mask * x_t + (1 - mask) * _noised(x0, noise, alpha_bar[t[:1]].expand(len(t))),
            "the square roots are missing: x_t^known = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.":
                mask * x_t + (1 - mask) * (ab.view(-1, *[1] * (x0.ndim - 1)) * x0.double() + (1 - ab).view(
                    -1, *[1] * (x0.ndim - 1)) * noise.double()).float(),
            "the hole holds fresh noise; it must keep the sampler's own x_t, which carries what the model has drawn "
            "there so far.": mask * noise + (1 - mask) * known,
            "you returned q(x_t | x0) everywhere: the hole must keep the sampler's x_t, or nothing new is drawn "
            "there.": known,
            "you returned x_t unchanged: replace its known region (mask 0) by the original noised to level t.": x_t,
        }
        known_mistake(got, mistakes, name, case, want)
        expect_tensor(got, want, name, case)
    passed(name, "hole from the sampler's x_t, known region from q(x_t | x0) at each sample's t, on any data shape")


# ---------------------------------------------------------------- 3. the input of a mask-conditioned model


class ProbeEncoder:
    """A fixed 'first stage' E: images (B, 3, 16, 16) -> latents (B, 2, 4, 4) (f = 4), non-linear, deterministic;
    it remembers every batch it was given."""

    def __init__(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10)
            self.weight = torch.randn(2, 3, 1, 1)
        self.seen: list[torch.Tensor] = []

    def __call__(self, images):
        self.seen.append(images.detach().clone())
        return torch.tanh(F.conv2d(F.avg_pool2d(images, 4), self.weight))

    def encode_latents(self, images):  # the autoencoder's method, for the package's reference
        return self(images)


def check_inpainting_input(fn) -> None:
    """fn(z_t, pixel_mask, images, encode) -> [z_t, m, E(x (1 - m_x))] along channels, (B, C + 1 + C, h, w); m the
    pixel hole on the latent grid by max pooling (a latent cell is in the hole if any pixel it covers is)."""
    name = "inpainting_input"
    written_here(fn, name)
    g = torch.Generator().manual_seed(2)
    for case_seed, boxes in ((0, [(3, 9, 2, 7), (0, 16, 0, 5), (6, 13, 9, 15)]),
                             (1, [(5, 11, 5, 11), (1, 6, 10, 16), (0, 2, 0, 2)])):
        B = len(boxes)
        case = f"latents z_t (3, 2, 4, 4), images (3, 3, 16, 16), holes {boxes} (rows, then columns)"
        images = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1
        z_t = torch.randn(B, 2, 4, 4, generator=g)
        pixel_mask = _box_mask(B, 16, 16, boxes)
        encoder = ProbeEncoder()
        want = torch.cat([z_t, inpainting_condition(images, pixel_mask, encoder)], dim=1)  # (B, 5, 4, 4)
        encoder.seen.clear()
        given = images.clone()
        got = run(fn, name, case, z_t.clone(), pixel_mask.clone(), given, encoder,
                  hint="encode takes images (B, 3, 16, 16) and returns latents (B, 2, 4, 4).")
        _unchanged(images, given, "the images", name, case)
        if not encoder.seen:
            raise ExerciseError(f"{name} ({case}): encode was never called; the condition holds the latents of the "
                                "masked images, encode(images * (1 - pixel_mask)).")
        seen = encoder.seen[-1]
        if torch.equal(seen, images):
            raise ExerciseError(f"{name} ({case}): you encoded the whole images, hole included: the model would see "
                                "what it is asked to draw. Grey out the hole first: encode(images * (1 - pixel_mask)).")
        if seen.shape == images.shape and torch.allclose(seen, images * pixel_mask):
            raise ExerciseError(f"{name} ({case}): the mask is inverted in the image: you kept the hole and greyed "
                                "out the known region. 1 marks the hole: encode(images * (1 - pixel_mask)).")
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"{name} ({case}): expected a torch.Tensor, got {type(got).__name__}.")
        if got.ndim == 4 and got.shape[0] == B and got.shape[-2:] == (4, 4) and got.shape[1] != 5:
            what = {4: "one part is missing (z_t has 2 channels, the latent mask 1, the masked image's latents 2)",
                    3: "only z_t and the mask are there: add the masked image's latents",
                    2: "return z_t together with the condition, not one part alone"}.get(
                        got.shape[1], "the channels are z_t (2), the latent mask (1), the masked image's latents (2)")
            raise ExerciseError(f"{name} ({case}): got {got.shape[1]} channels, expected 2 + 1 + 2 = 5: {what}.")
        latents = encoder(images * (1 - pixel_mask))
        m = want[:, 2:3]
        mistakes = {
            "the parts are in the wrong order: the UNet reads z_t in its first channels (those it denoises), then "
            "the condition, [z_t, m, E(x (1 - m))].": torch.cat([m, latents, z_t], 1),
            "the condition's two parts are swapped: [z_t, m, E(x (1 - m))], the mask before the masked image's "
            "latents (the order the model was trained with).": torch.cat([z_t, latents, m], 1),
            "the latent mask is inverted: it is 1 in the hole, as the pixel mask.": torch.cat([z_t, 1 - m, latents], 1),
            "the mask was shrunk by averaging: a latent cell that covers part of the hole got a fraction. A cell "
            "belongs to the hole if any pixel it covers does: F.adaptive_max_pool2d (or max_pool2d with the factor).":
                torch.cat([z_t, F.adaptive_avg_pool2d(pixel_mask, 4), latents], 1),
            "the mask was shrunk by nearest-neighbour sampling, which misses the edges of the hole. A cell belongs "
            "to the hole if any pixel it covers does: F.adaptive_max_pool2d.":
                torch.cat([z_t, F.interpolate(pixel_mask, size=4, mode="nearest"), latents], 1),
        }
        known_mistake(got, mistakes, name, case, want)
        expect_tensor(got, want, name, case)
    passed(name, "[z_t, max-pooled hole, E(images * (1 - mask))] along the channels; the hole's content never reaches "
                 "the encoder")

