"""Checkers for exercise 03 (noise schedules and the forward process): the cosine beta schedule,
alpha-bar, q(x_t | x_0) and the zero-terminal-SNR rescaling. References: minildm.schedules."""

from __future__ import annotations

import torch

from minildm import schedules as ref
from minildm.checks import ExerciseError, expect_tensor, known_mistake, passed, run, written_here

# Schedules are float64 tables: compare them to (nearly) double precision, or the smallest betas
# (about 1e-5 at the start of a cosine schedule) would hide errors below the default tolerance.
F64 = {"atol": 1e-10, "rtol": 1e-7}


def _expect_float64(got, name: str, case: str) -> None:
    if isinstance(got, torch.Tensor) and got.dtype != torch.float64:
        raise ExerciseError(f"{name} ({case}): expected a float64 tensor, got {got.dtype}. Schedules are "
                            "tables computed once in double precision: create them with dtype=torch.float64.")


def _cosine_mistakes(T: int, s: float, max_beta: float) -> dict[str, torch.Tensor]:
    """message -> the (clipped) betas a typical wrong cosine schedule gives."""
    u = torch.arange(T + 1, dtype=torch.float64) / T  # u = t / T for t = 0..T

    def f(u, shift=s, squash=1 + s, power=2):
        return torch.cos((u + shift) / squash * torch.pi / 2) ** power

    def betas(ab):
        return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)

    ab = f(u) / f(torch.zeros((), dtype=torch.float64))
    return {
        "the offset s is missing: f(u) = cos^2((u + s) / (1 + s) * pi / 2); without it the first betas are "
        "nearly 0.": betas(f(u, 0.0, 1.0) / f(torch.zeros((), dtype=torch.float64), 0.0, 1.0)),
        "the cosine is not squared: f(u) = cos^2((u + s) / (1 + s) * pi / 2).":
            betas(f(u, power=1) / f(torch.zeros((), dtype=torch.float64), power=1)),
        "(u + s) must be divided by (1 + s), so that f(1) = cos^2(pi / 2) = 0 at the last step.":
            betas(f(u, squash=1.0) / f(torch.zeros((), dtype=torch.float64), squash=1.0)),
        "this is alpha_bar(t / T), not the betas: beta_t = 1 - alpha_bar((t + 1) / T) / alpha_bar(t / T).":
            ab[1:].clamp(max=max_beta),
        "the ratio is upside down (betas come out negative): beta_t = 1 - alpha_bar((t + 1) / T) / "
        "alpha_bar(t / T), the next value over the current one.": (1 - ab[:-1] / ab[1:]).clamp(max=max_beta),
    }


def check_cosine_betas(fn) -> None:
    """fn(T, s, max_beta) -> (T,) float64 betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""
    name = "cosine_betas"
    written_here(fn, name)
    for T, s, max_beta in [(10, 0.008, 0.999), (1000, 0.008, 0.999), (50, 0.0, 0.9), (7, 0.1, 0.999)]:
        case = f"T={T}, s={s}, max_beta={max_beta}"
        got = run(fn, name, case, T, s, max_beta)
        expected = ref.cosine_betas(T, s, max_beta)
        _expect_float64(got, name, case)
        if isinstance(got, torch.Tensor) and got.shape != expected.shape:
            raise ExerciseError(f"{name} ({case}): expected shape ({T},), got {tuple(got.shape)}: one beta per "
                                f"step, from the T+1 values alpha_bar(u) at u = 0, 1/T, ..., 1.")
        known_mistake(got, _cosine_mistakes(T, s, max_beta), name, case, expected)
        if isinstance(got, torch.Tensor) and got.max() > max_beta + 1e-12:
            raise ExerciseError(f"{name} ({case}): the largest beta is {got.max().item():.6g} > max_beta = "
                                f"{max_beta}; clip the betas with .clamp(max=max_beta).")
        expect_tensor(got, expected, name, case, **F64)
    passed(name, "float64, one beta per step, clipped at max_beta, matches 1 - alpha_bar((t+1)/T) / alpha_bar(t/T)")


def check_alpha_bar_from_betas(fn) -> None:
    """fn(betas (T,)) -> alpha_bar (T,) = cumulative product of (1 - betas)."""
    name = "alpha_bar_from_betas"
    written_here(fn, name)
    cases = {"linear betas, T=1000": ref.make_betas("linear", 1000),
             "cosine betas, T=20": ref.cosine_betas(20),
             "hand-made betas [0.1, 0.2, 0.5]": torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64),
             "float32 betas (the result keeps the dtype)": ref.make_betas("scaled_linear", 100).float()}
    for case, betas in cases.items():
        got = run(fn, name, case, betas)
        known_mistake(got, {
            "this is the cumulative product of the betas; alpha_t = 1 - beta_t is what survives of the signal "
            "at each step, and alpha_bar_t multiplies those.": torch.cumprod(betas, 0),
            "this is the cumulative sum of (1 - beta); alpha_bar is a product, because each step scales the "
            "signal by sqrt(1 - beta_t).": torch.cumsum(1 - betas, 0),
            "the product is shifted by one step (it starts at 1): alpha_bar_0 = 1 - beta_0 already includes the "
            "first step; take torch.cumprod(1 - betas, 0) as it is.":
                torch.cat([torch.ones_like(betas[:1]), torch.cumprod(1 - betas, 0)[:-1]]),
            "this is the cumulative product of sqrt(1 - beta), the coefficient sqrt(alpha_bar) of x0; alpha_bar "
            "itself is the product of (1 - beta), without the square root.": torch.cumprod((1 - betas).sqrt(), 0),
        }, name, case)
        if isinstance(got, torch.Tensor) and got.ndim == 0:
            raise ExerciseError(f"{name} ({case}): returned a single number; return one alpha_bar per step, "
                                f"shape ({len(betas)},): use torch.cumprod, not torch.prod.")
        expect_tensor(got, ref.alpha_bar_from_betas(betas), name, case, **F64)
    passed(name, "alpha_bar_t = prod_{s<=t} (1 - beta_s), one value per step, dtype kept")


def _q_sample_mistakes(x0, t, noise, alpha_bar) -> dict[str, torch.Tensor]:
    ab = alpha_bar.to(x0.dtype)
    per_sample = ab[t].view(-1, 1, 1, 1)
    first_t = ab[t[0]]
    out = {
        "every sample used the timestep of the first one: index alpha_bar with the whole tensor t, "
        "alpha_bar[t] (shape (B,)), so that each image gets its own noise level.":
            first_t.sqrt() * x0 + (1 - first_t).sqrt() * noise,
        "the square roots are missing: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, so that the "
        "variance is alpha_bar_t + (1 - alpha_bar_t) = 1.": per_sample * x0 + (1 - per_sample) * noise,
        "x0 and noise have swapped coefficients: the signal is scaled by sqrt(alpha_bar_t), which starts "
        "near 1 (t = 0 is almost clean).": (1 - per_sample).sqrt() * x0 + per_sample.sqrt() * noise,
    }
    if x0.shape[-1] == len(t):
        along_w = ab[t]  # (B,) broadcast against the last axis: the silent broadcasting bug
        out["alpha_bar[t] has shape (B,) and was broadcast along the image width (the last axis), not the batch: "
            "reshape it to (B, 1, 1, 1), e.g. alpha_bar[t].view(-1, 1, 1, 1)."] = (
            along_w.sqrt() * x0 + (1 - along_w).sqrt() * noise)
    return out


def check_q_sample(fn) -> None:
    """fn(x0 (B, C, H, W), t (B,) int64, noise like x0, alpha_bar (T,)) -> x_t like x0 (Ho et al. eq. 4)."""
    name = "q_sample"
    written_here(fn, name)
    hint = "alpha_bar[t] has shape (B,): reshape it to (B, 1, 1, 1) so that it broadcasts over C, H, W."
    schedule = ref.NoiseSchedule(ref.cosine_betas(50))
    g = torch.Generator().manual_seed(0)
    cases = [  # (description, x0 shape, t, dtype)
        ("batch of 4 at t = [3, 49, 0, 20], x0 (4, 3, 5, 6)", (4, 3, 5, 6), [3, 49, 0, 20], torch.float32),
        ("batch of 4 at t = [10, 30, 40, 1], x0 (4, 2, 3, 4): width equals batch size", (4, 2, 3, 4),
         [10, 30, 40, 1], torch.float32),
        ("batch of 3, float64 x0 (3, 1, 4, 4)", (3, 1, 4, 4), [0, 25, 49], torch.float64),
    ]
    for case, shape, t, dtype in cases:
        x0, noise = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
        t = torch.tensor(t)
        got = run(fn, name, case, x0, t, noise, schedule.alpha_bar, hint=hint)
        if isinstance(got, torch.Tensor) and got.dtype != x0.dtype:
            raise ExerciseError(f"{name} ({case}): expected dtype {x0.dtype} (that of x0), got {got.dtype}: "
                                "alpha_bar is float64, so cast the looked-up values with .to(x0.dtype).")
        known_mistake(got, _q_sample_mistakes(x0, t, noise, schedule.alpha_bar), name, case)
        expect_tensor(got, schedule.q_sample(x0, t, noise), name, case)
    # Statistics of q(x_t | x_0): for a fixed x0 = 1 and many noise draws, mean sqrt(ab), variance 1 - ab.
    t = torch.tensor([5, 40])
    x0, noise = torch.ones(2, 1, 100, 100), torch.randn(2, 1, 100, 100, generator=g)
    x_t = run(fn, name, "statistics", x0, t, noise, schedule.alpha_bar, hint=hint)
    for i in range(2):
        ab = schedule.alpha_bar[t[i]].item()
        mean, var = x_t[i].mean().item(), x_t[i].var().item()
        if abs(mean - ab**0.5) > 0.05 or abs(var - (1 - ab)) > 0.05:
            raise ExerciseError(f"{name} (statistics at t={t[i].item()}, x0 = 1): x_t has mean {mean:.3f} and "
                                f"variance {var:.3f}, but q(x_t | x0) has mean sqrt(alpha_bar) = {ab**0.5:.3f} "
                                f"and variance 1 - alpha_bar = {1 - ab:.3f}.")
    passed(name, "each sample gets its own alpha_bar[t], mean sqrt(alpha_bar) x0, variance 1 - alpha_bar")


def _rescaled_without_sqrt(ab: torch.Tensor) -> torch.Tensor:
    """The typical mistake: Algorithm 1 applied to alpha_bar instead of sqrt(alpha_bar)."""
    ab = (ab - ab[-1]) * ab[0] / (ab[0] - ab[-1])
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def check_rescale_zero_terminal_snr(fn) -> None:
    """fn(betas (T,) float64) -> betas whose alpha_bar ends at exactly 0 (Lin et al. 2024, Algorithm 1)."""
    name = "rescale_zero_terminal_snr"
    written_here(fn, name)
    for case, betas in {"scaled-linear, T=1000": ref.make_betas("scaled_linear", 1000),
                        "linear, T=100": ref.make_betas("linear", 100),
                        "cosine, T=10": ref.cosine_betas(10)}.items():
        got = run(fn, name, case, betas.clone())
        _expect_float64(got, name, case)
        expected = ref.rescale_zero_terminal_snr(betas)
        ab = ref.alpha_bar_from_betas(betas)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            known_mistake(got, {"this is alpha_bar, not the betas: return 1 - alphas, where alphas are the "
                                 "ratios alpha_bar_t / alpha_bar_{t-1}.": ref.alpha_bar_from_betas(expected),
                                 "you shifted and scaled alpha_bar itself; Lin et al. shift and scale "
                                 "sqrt(alpha_bar) (the coefficient of x0 in x_t), then square it.":
                                     _rescaled_without_sqrt(ab),
                                 "these are the alphas alpha_bar_t / alpha_bar_{t-1}; the betas are 1 - alphas.":
                                     1 - expected,
                                 "this is the rescaled sqrt(alpha_bar); square it, then read the betas back from "
                                 "the ratios of consecutive alpha_bars.": ref.alpha_bar_from_betas(expected).sqrt()},
                           name, case)
            new_ab = ref.alpha_bar_from_betas(got.double())
            if abs(new_ab[-1].item()) > 1e-10:
                raise ExerciseError(f"{name} ({case}): the new alpha_bar ends at {new_ab[-1].item():.3g}, not 0: "
                                    "shift sqrt(alpha_bar) down by its last value so that the SNR of the last "
                                    "step is exactly 0.")
            if abs(new_ab[0].item() - ab[0].item()) > 1e-10:
                raise ExerciseError(f"{name} ({case}): the first alpha_bar changed from {ab[0].item():.6g} to "
                                    f"{new_ab[0].item():.6g}: after the shift, scale sqrt(alpha_bar) by "
                                    "first / (first - last) so that the first step is as clean as before.")
        expect_tensor(got, expected, name, case, **F64)
    passed(name, "last alpha_bar is 0 (last beta 1), first unchanged, matches Lin et al. Algorithm 1")
