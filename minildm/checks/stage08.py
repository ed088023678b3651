"""Checkers for exercise 08 (samplers): one DDIM step (Song et al. 2021, eqs. 12 and 16) and one Euler step of the
probability-flow ODE (Karras et al. 2022, Algorithm 1). References: minildm.samplers.ddim_step and euler_step,
with alpha_bar from minildm.schedules.NoiseSchedule."""

from __future__ import annotations

import math

import torch

from minildm import samplers as ref
from minildm.checks import ExerciseError, expect_tensor, known_mistake, passed, run, written_here
from minildm.schedules import NoiseSchedule

FLOATS_HINT = ("The noise levels (alpha_bar_t, alpha_bar_prev; sigma, sigma_next) and eta are Python floats, as the "
               "package's samplers look them up on the host: use math.sqrt (or ** 0.5), not torch.sqrt.")


def _tensors(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(n)]


def _not_the_answer(mistakes: dict[str, torch.Tensor], want: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop the typical mistakes that happen to give the right answer in this case (e.g. sigma errors at eta = 0)."""
    return {m: w for m, w in mistakes.items() if not torch.allclose(w.double(), want.double(), rtol=1e-5, atol=1e-6)}


def check_ddim_step(fn) -> None:
    """fn(x_t, eps_hat, alpha_bar_t, alpha_bar_prev, eta, noise) -> x_prev (Song et al. eq. 12)."""
    name = "ddim_step"
    written_here(fn, name)
    ab = NoiseSchedule.from_name("scaled_linear", 1000).alpha_bar.tolist()
    cases = [  # (t, prev, eta); prev None = the last step, to clean data (alpha_bar_prev = 1)
        (999, 949, 0.0), (500, 480, 1.0), (200, 100, 0.5), (1, 0, 1.0), (30, 0, 0.0), (0, None, 1.0)]
    for seed, (t, prev, eta) in enumerate(cases):
        ab_t, ab_prev = ab[t], 1.0 if prev is None else ab[prev]
        case = (f"t={t} -> {'clean data' if prev is None else prev}: alpha_bar_t={ab_t:.4g}, "
                f"alpha_bar_prev={ab_prev:.4g}, eta={eta}")
        x_t, eps, noise = _tensors(seed)
        got = run(fn, name, case, x_t, eps, ab_t, ab_prev, eta, noise, hint=FLOATS_HINT)
        # the reference in float64: x0_hat from eps_hat, then the package's step
        x_t64, eps64, noise64 = x_t.double(), eps.double(), noise.double()
        x0 = (x_t64 - math.sqrt(1 - ab_t) * eps64) / math.sqrt(ab_t)
        sigma = ref.ddim_sigma(ab_t, ab_prev, eta)
        want = ref.ddim_step(x0, eps64, ab_t, ab_prev, eta, noise64)
        beta_sigma = eta * math.sqrt(1 - ab_t / ab_prev)
        direction = math.sqrt(max(1 - ab_prev - sigma**2, 0.0))
        known_mistake(got, _not_the_answer({
            "x_prev is the model's x0 guess brought back to level prev: sqrt(alpha_bar_prev) x0_hat + ..., but this "
            "is x0_hat itself (only right for the last step, alpha_bar_prev = 1).": x0,
            "x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t): the square roots are missing.":
                math.sqrt(ab_prev) * (x_t64 - (1 - ab_t) * eps64) / ab_t + direction * eps64 + sigma * noise64,
            "alpha_bar_t and alpha_bar_prev are swapped: x_prev uses sqrt(alpha_bar_prev) and "
            "sqrt(1 - alpha_bar_prev - sigma^2), the level you step to.": math.sqrt(ab_t) * x0
                + math.sqrt(max(1 - ab_t - sigma**2, 0.0)) * eps64 + sigma * noise64,
            "sigma is missing from the direction term: it is sqrt(1 - alpha_bar_prev - sigma^2) eps_hat, so that the "
            "variances add up to 1 - alpha_bar_prev.": math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps64
                + sigma * noise64,
            "the noise was multiplied by sigma^2; sigma is a standard deviation: add sigma * noise.":
                math.sqrt(ab_prev) * x0 + direction * eps64 + sigma**2 * noise64,
            "no noise was added: for eta > 0 the step adds sigma * noise (eq. 12).":
                math.sqrt(ab_prev) * x0 + direction * eps64,
            "sigma = eta sqrt(1 - alpha_bar_t / alpha_bar_prev) is the 'beta' variance of DDPM; eq. 16 also multiplies "
            "by sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)).": math.sqrt(ab_prev) * x0
                + math.sqrt(max(1 - ab_prev - beta_sigma**2, 0.0)) * eps64 + beta_sigma * noise64,
        }, want), name, case)
        expect_tensor(got, want.float(), name, case, atol=1e-5, rtol=1e-4)
    # eta = 1 between consecutive steps is DDPM's posterior, whose mean and variance stage 3 tabulated
    s = NoiseSchedule.from_name("linear", 100)
    t = 40
    x_t, eps, noise = (v.double() for v in _tensors(10))
    x0 = (x_t - s.sqrt_one_minus_alpha_bar[t] * eps) / s.sqrt_alpha_bar[t]
    want = (s.posterior_mean_coef_x0[t] * x0 + s.posterior_mean_coef_xt[t] * x_t
            + s.posterior_variance[t].sqrt() * noise).float()
    case = "eta=1 from t=40 to t=39 (linear, T=100): must be DDPM's posterior, Ho et al. eq. 7"
    got = run(fn, name, case, x_t.float(), eps.float(), float(s.alpha_bar[t]), float(s.alpha_bar[t - 1]), 1.0,
              noise.float(), hint=FLOATS_HINT)
    expect_tensor(got, want, name, case, atol=1e-5, rtol=1e-4)
    passed(name, "eq. 12 with sigma(eta) of eq. 16: deterministic at eta = 0, DDPM's posterior at eta = 1, x0_hat at "
                 "the last step")


def check_euler_step(fn) -> None:
    """fn(x, denoised, sigma, sigma_next) -> x + (sigma_next - sigma) (x - denoised) / sigma (Karras Alg. 1)."""
    name = "euler_step"
    written_here(fn, name)
    for seed, (sigma, sigma_next) in enumerate([(14.6, 9.0), (1.0, 0.5), (80.0, 79.0), (0.3, 0.0)]):
        case = f"sigma={sigma} -> sigma_next={sigma_next}"
        x, denoised, _ = _tensors(20 + seed)
        x = x * math.sqrt(1 + sigma**2)  # y = x_0 + sigma eps has standard deviation about sqrt(1 + sigma^2)
        got = run(fn, name, case, x, denoised, sigma, sigma_next, hint=FLOATS_HINT)
        if isinstance(got, torch.Tensor) and got.is_floating_point() and not torch.isfinite(got).all():
            raise ExerciseError(f"{name} ({case}): got inf or NaN. The slope d = (x - denoised) / sigma is taken "
                                "where you stand, at sigma; sigma_next can be 0 (the last step).")
        x64, d64 = x.double(), denoised.double()
        want = ref.euler_step(x64, d64, sigma, sigma_next)
        slope = (x64 - d64) / sigma
        known_mistake(got, _not_the_answer({
            "x moved away from the data: the slope is d = (x - denoised) / sigma (the noise direction eps_hat) and "
            "the step (sigma_next - sigma) d, whose factor is negative as the noise decreases; one of the two signs "
            "is flipped.": x64 - (sigma_next - sigma) * slope,
            "the slope was not divided by sigma: d = (x - denoised) / sigma.":
                x64 + (sigma_next - sigma) * (x64 - d64),
            "you returned `denoised`: the Euler step only lands there when sigma_next = 0.": d64,
            "the slope was divided by sigma_next; it is taken at sigma, where you stand.":
                x64 + (sigma_next - sigma) * (x64 - d64) / sigma_next if sigma_next > 0 else want,
        }, want), name, case)
        expect_tensor(got, want.float(), name, case, atol=1e-5, rtol=1e-4)
    # a single data point: the ODE's solution is the straight line y = x0 + sigma eps, which Euler follows exactly
    x0, eps, _ = _tensors(30)
    case = "one data point, denoised = x0 exactly: x = x0 + 5 eps must step to x0 + 2 eps"
    got = run(fn, name, case, x0 + 5.0 * eps, x0, 5.0, 2.0, hint=FLOATS_HINT)
    expect_tensor(got, x0 + 2.0 * eps, name, case, atol=1e-5, rtol=1e-4)
    passed(name, "x + (sigma_next - sigma) (x - denoised) / sigma; exact for one data point; lands on denoised at 0")
