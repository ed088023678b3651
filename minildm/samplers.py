"""Samplers: from pure noise to data with a trained denoiser (course stage 8).

Every sampler here has the same skeleton:
1. ask the model for its prediction at (x_t, t) -- `model_output`, with classifier-free guidance if asked;
2. turn it into (x0_hat, eps_hat) with `to_x0_and_eps` (so eps-, x0- and v-models all work);
3. take one step to a less noisy x.
They differ in step 3 and in the timesteps they visit; `sample(..., sampler=...)` runs any of them:

    "ddpm"      ancestral sampling (Ho et al. 2020), stochastic         all T timesteps
    "ddim"      DDIM (Song et al. 2021): eta = 0 an ODE, eta = 1 DDPM   `uniform_timesteps`
    "euler"     Euler's method on the probability-flow ODE (Karras)     `karras_timesteps` (rho = 7)
    "heun"      Heun's 2nd-order method on the same ODE (Karras)        `karras_timesteps`, 2 model calls a step
    "dpmpp_2m"  DPM-Solver++(2M) (Lu et al. 2022), 2nd-order multistep  `karras_timesteps`

Two views of one noisy sample. The schedule writes x_t = a x_0 + b eps with a = sqrt(alpha_bar_t) and
b = sqrt(1 - alpha_bar_t); divided by a it is the "variance exploding" view of Karras et al. (2022):

    y = x_t / a = x_0 + sigma eps,     sigma = b / a = sqrt((1 - alpha_bar_t) / alpha_bar_t)  (schedule.sigmas).

The deterministic samplers all solve one ODE, the probability-flow ODE (Karras et al. eq. 3 with s(t) = 1):

    dy / dsigma = (y - D(y; sigma)) / sigma = eps_hat,      D = the model's x0_hat,

from sigma_max (t = T-1) down to sigma = 0. DDIM with eta = 0 is Euler's method on it (Song et al. Sec. 4.3),
so "ddim" and "euler" differ only in their timesteps; "heun" and "dpmpp_2m" are second order: halving the
step size divides their error by 4, not 2 (tests/test_samplers.py measures it).

Conventions shared by every sampler:
- the model only ever sees integer timesteps in 0..T-1 (the ones it was trained on), as an int64 tensor (B,);
- a run starts from x = torch.randn(shape, generator=generator), the generator's first draw, so two samplers
  with the same seed start from the same noise and their samples can be compared one to one;
- the last step jumps from the last timestep (t = 0) to the model's x0 guess, which is the sample;
- per-step coefficients are Python floats from the float64 tables on the host: a step only queues GPU work.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import NamedTuple

import torch

from minildm.diffusion import check_prediction, predict_eps_from_x0, to_x0_and_eps
from minildm.schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")
DEFAULT_STEPS = 50  # steps=None for every sampler but "ddpm" (which runs all T)


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


def check_guidance(guidance_scale) -> float:
    """Classifier-free guidance as the course uses it: out_uncond + s (out_cond - out_uncond) with s >= 1.

    Ho & Salimans (2022, eq. 6) write it as (1 + w) eps_cond - w eps_uncond with w >= 0, i.e. s = 1 + w: s = 1 is the
    conditional model alone (guidance off), s > 1 pushes each sample towards its condition. Below 1 the formula
    still computes something, but not guidance: s in (0, 1) blends towards the unconditional model, s = 0 *is* the
    unconditional model and s < 0 pushes away from the condition; none of these samples the course's guided
    distribution p(x | c)^s p(x)^(1 - s) with s >= 1, so `sample`, `generate` and the applications refuse them
    (an error, not a warning). To sample without a condition, pass the empty caption ("") with scale 1.
    `model_output` itself computes any scale (exercise 09 and the tests use it on toy models). Returns the scale
    as a float."""
    if (not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool)
            or not math.isfinite(guidance_scale) or guidance_scale < 1):
        raise ValueError(f"guidance_scale must be a number >= 1 (1 = no guidance, 2-5 follows the caption more "
                         f"closely); got {guidance_scale!r}. To ignore the caption, pass the empty caption \"\"")
    return float(guidance_scale)


def _check_shape_and_device(shape, schedule: NoiseSchedule, device):
    shape = tuple(shape)
    if len(shape) < 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (batch, ...) with positive sizes, e.g. (16, 4, 8, 8); got {shape}")
    return shape, torch.device(device) if device is not None else schedule.device


@torch.no_grad()
def ddpm_sample(model, shape, schedule: NoiseSchedule, context=None, prediction: str = "eps",
                generator: torch.Generator | None = None, device=None, return_trajectory: bool = False,
                clip_x0: float | None = None, progress: bool = False, guidance_scale: float = 1.0,
                uncond_context=None, trajectory_every: int | None = None, variance: str = "beta_tilde",
                callback=None):
    """DDPM ancestral sampling: all T steps from x_{T-1} ~ N(0, I) down to t = 0.

    Each step draws x_{t-1} from the posterior q(x_{t-1} | x_t, x_0 = x0_hat) (Ho et al. eq. 7):

        x_{t-1} = coef_x0_t x0_hat + coef_xt_t x_t + sqrt(beta_tilde_t) z,   z ~ N(0, I),  no noise at t = 0,

    where x0_hat comes from the model (optionally clipped to [-clip_x0, clip_x0], e.g. 1.0 for pixels).
    `variance` picks the noise added per step (Ho et al. Sec. 3.2): "beta_tilde" (the posterior variance,
    exact if the data were a single point) or "beta" (beta_t, exact for data ~ N(mu, I)); both work well.
    `shape` is (B, ...) of the samples; `context` has batch B (or is None). Returns x, or
    (x, [Snapshot, ...]) every `trajectory_every` steps (default T // 10) and at t = 0 if return_trajectory.
    `callback(step, t, x_t, x0_hat)`, if given, is called at every step (as in `sample`).
    """
    check_prediction(prediction)
    check_guidance(guidance_scale)
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose 'beta_tilde' or 'beta'")
    variance_table = "posterior_variance" if variance == "beta_tilde" else "betas"
    shape, device = _check_shape_and_device(shape, schedule, device)
    every = trajectory_every or max(schedule.T // 10, 1)
    x = torch.randn(shape, generator=generator, device=device)
    trajectory = []
    steps = reversed(range(schedule.T))
    if progress:
        from minildm.progress import progress_bar

        steps = progress_bar(steps, total=schedule.T, desc="DDPM")
    for i in steps:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # (B,) for the model
        out = model_output(model, x, t, context, guidance_scale, uncond_context)
        # The schedule lookups take the Python int i: no host-device round trip per step (see NoiseSchedule.at)
        x0_hat, _ = to_x0_and_eps(out.float(), x, i, schedule, prediction)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        if return_trajectory and (i % every == 0 or i == schedule.T - 1):
            trajectory.append(Snapshot(i, x.cpu(), x0_hat.cpu()))
        if callback is not None:
            callback(schedule.T - 1 - i, i, x, x0_hat)
        mean = schedule.at("posterior_mean_coef_x0", i, x) * x0_hat
        mean = mean + schedule.at("posterior_mean_coef_xt", i, x) * x
        if i > 0:
            noise = torch.randn(shape, generator=generator, device=device)
            x = mean + schedule.at(variance_table, i, x).sqrt() * noise
        else:
            x = mean
    return (x, trajectory) if return_trajectory else x


# ---------------------------------------------------------------------------------------------
# Which timesteps a sampler visits
# ---------------------------------------------------------------------------------------------


def uniform_timesteps(T: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced from T-1 down to 0, rounded to integers (both ends always included).

    This is the "linspace" spacing: it starts at the pure-noise end t = T-1, where x ~ N(0, I) is the right
    start (Lin et al. 2024, Sec. 3.3, on spacings that skip it), and steps = T gives T-1, T-2, ..., 0.
    """
    _check_steps(steps, T)
    if steps == 1:
        return [T - 1]
    # floor(v + 0.5), not round(): round-half-to-even could give two equal timesteps
    return [math.floor((T - 1) * (steps - 1 - i) / (steps - 1) + 0.5) for i in range(steps)]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """The noise levels of Karras et al. 2022, eq. 5, from sigma_max down to sigma_min (the final 0 not included):

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0 .. N-1.

    Evenly spaced in sigma^(1/rho): rho = 1 is uniform in sigma, larger rho crowds the steps at low noise, where
    the ODE bends most; rho = 7 is the paper's choice.
    """
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"Karras sigmas need 0 < sigma_min <= sigma_max < inf, got {sigma_min} and {sigma_max}")
    if steps == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list[int]:
    """Karras sigmas (rho spacing between sigma_0 and sigma_{T-1} of the schedule), each moved to the timestep
    whose sigma is nearest on a log scale; the samplers then use that timestep's own sigma.

    Why nearest and not interpolated: the model was trained on integer timesteps only, the conversion to
    (x0_hat, eps_hat) needs alpha_bar at the queried timestep, and a recorded CUDA graph keeps int64 timesteps.
    The price: where the schedule has fewer timesteps than the spacing wants (many steps near sigma_min, or
    the steep end of a cosine schedule), two sigmas can land on one timestep; they are merged, so the list can be
    shorter than `steps` (scaled_linear, T = 1000: 49 timesteps for 50 steps, 20 for 20).
    A zero-terminal-SNR schedule has sigma = inf at T-1: the list starts there and spaces the other steps - 1
    from sigma_{T-2} (only "dpmpp_2m" can start at infinite sigma; Euler and Heun refuse).
    """
    _check_steps(steps, schedule.T)
    sigmas, top = schedule.sigmas, schedule.T - 1
    finite = math.isfinite(sigmas[top])
    if not finite:  # zero terminal SNR: keep T-1 as the first timestep, space the rest below it
        if steps == 1 or top == 0:
            return [top]
        steps, top = steps - 1, top - 1
    wanted = torch.tensor(karras_sigmas(float(sigmas[0]), float(sigmas[top]), steps, rho), dtype=torch.float64)
    nearest = (wanted.log()[:, None] - sigmas.log()[None, :]).abs().argmin(dim=1)  # (steps,); log(inf) never wins
    return ([] if finite else [schedule.T - 1]) + sorted(set(nearest.tolist()), reverse=True)


def _check_steps(steps, T: int) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int from 1 to T={T} (the schedule's number of timesteps), got "
                         f"{steps!r}; fewer steps sample faster, more follow the model more closely")


def _check_timesteps_list(timesteps, T: int) -> list[int]:
    """An explicit timestep sequence: strictly decreasing integers in [0, T-1]."""
    ts = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    ok = len(ts) > 0 and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ts)
    if not ok or not all(0 <= t <= T - 1 for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"explicit timesteps must be strictly decreasing integers in [0, {T - 1}], e.g. "
                         f"uniform_timesteps({T}, 20); got {ts[:8]}{' ...' if len(ts) > 8 else ''}")
    return [int(t) for t in ts]


def sampler_timesteps(schedule: NoiseSchedule, sampler: str, steps=None) -> list[int]:
    """The timesteps `sample(..., sampler=sampler, steps=steps)` visits, after checking both (clear errors for an
    unknown sampler and for a step count the schedule cannot provide: not an int, below 1 or above T).

    steps=None: all T for "ddpm", min(50, T) for the others; an int: `uniform_timesteps` for "ddpm" and "ddim",
    `karras_timesteps` for "euler", "heun" and "dpmpp_2m" (which may merge a few, so the list can be shorter);
    an explicit sequence of strictly decreasing timesteps is checked and returned as a list."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    T = schedule.T
    if steps is None:
        steps = T if sampler == "ddpm" else min(DEFAULT_STEPS, T)
    if isinstance(steps, (list, tuple, range, torch.Tensor)):
        return _check_timesteps_list(steps, T)
    _check_steps(steps, T)
    return uniform_timesteps(T, steps) if sampler in ("ddpm", "ddim") else karras_timesteps(schedule, steps)


def model_calls(schedule: NoiseSchedule, sampler: str, steps=None) -> int:
    """How many times `sample` calls the model per run (the NFE, number of function evaluations): one per timestep,
    except Heun, which makes two per step but one on its last (to sigma = 0), 2 n - 1 for n timesteps. With
    classifier-free guidance each call is one batch of 2B (conditional and unconditional together)."""
    n = len(sampler_timesteps(schedule, sampler, steps))
    return 2 * n - 1 if sampler == "heun" else n


def pick_frames(trajectory: list, n: int = 8) -> list:
    """n frames of a trajectory, evenly spread from its first to its last, both included: the last frame of
    `sample(..., return_trajectory=True)` is t = 0, whose x0_hat is the sample. (Slicing with a stride,
    trajectory[::k][:n], would drop the end whenever the trajectory is longer than n k frames.)"""
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int (the number of frames to show), got {n!r}")
    if len(trajectory) <= n:
        return list(trajectory)
    if n == 1:
        return [trajectory[-1]]
    last = len(trajectory) - 1
    return [trajectory[math.floor(i * last / (n - 1) + 0.5)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# One step of each method (Python-float coefficients: no GPU sync)
# ---------------------------------------------------------------------------------------------


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """The noise level of a DDIM step (Song et al. 2021, eq. 16):

        sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).

    For consecutive timesteps and eta = 1 this is sqrt(beta_tilde_t), the standard deviation of DDPM's posterior
    q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7); eta = 0 adds no noise.
    """
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


def ddim_step(x0_hat, eps_hat, alpha_bar_t: float, alpha_bar_prev: float, eta: float = 0.0, noise=None):
    """One DDIM step from timestep t to an earlier one, "prev" (Song et al. 2021, eq. 12):

        x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma noise,

    with sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta): "where the model thinks x_0 is", noised back to
    level prev partly along the predicted noise direction and partly with fresh noise. alpha_bar_prev = 1 (the
    step after t = 0) returns x0_hat. The alpha_bars are Python floats; `noise` ~ N(0, I) is needed when sigma > 0.
    """
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))  # max(.., 0): rounding at alpha_bar_prev = 1
    x_prev = math.sqrt(alpha_bar_prev) * x0_hat + direction * eps_hat
    if sigma > 0:
        if noise is None:
            raise ValueError(f"this DDIM step adds noise (eta={eta}, sigma={sigma:.3g}): pass noise ~ N(0, I) "
                             "shaped like x0_hat, or eta=0 for a deterministic step")
        x_prev = x_prev + sigma * noise
    return x_prev


def euler_step(x, denoised, sigma: float, sigma_next: float):
    """One Euler step of the probability-flow ODE in the "variance exploding" view y = x_0 + sigma eps
    (Karras et al. 2022, Algorithm 1, lines 4-5, with sigma(t) = t and s(t) = 1):

        d = (x - denoised) / sigma,        x_next = x + (sigma_next - sigma) d.

    d is the slope dy/dsigma (it equals the model's eps_hat); at sigma_next = 0 the step lands on `denoised`.
    """
    return x + (sigma_next - sigma) * (x - denoised) / sigma


# ---------------------------------------------------------------------------------------------
# The samplers behind `sample`: each takes the start x (VP scale) and its timesteps, returns the sample
# ---------------------------------------------------------------------------------------------


class _Denoiser:
    """(x_t, t) -> (x0_hat, eps_hat): guidance, conversion and clipping in one place; records the trajectory
    (about 10 frames: every n // 10-th step and the last) and calls the callback once per step."""

    def __init__(self, model, schedule, prediction, context, guidance_scale, uncond_context, clip_x0,
                 callback, record: bool, n_steps: int):
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.context, self.guidance_scale, self.uncond_context = context, guidance_scale, uncond_context
        self.clip_x0, self.callback, self.record = clip_x0, callback, record
        self.every, self.n_steps, self.trajectory = max(n_steps // 10, 1), n_steps, []

    def __call__(self, x, t: int, step: int | None = None):
        """Pass `step` (its index) for a step's main evaluation; None (Heun's correction) records nothing."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # (B,) for the model
        out = model_output(self.model, x, t_batch, self.context, self.guidance_scale, self.uncond_context)
        x0_hat, eps_hat = to_x0_and_eps(out.to(x.dtype), x, t, self.schedule, self.prediction)
        if self.clip_x0 is not None:  # clip x0 and make eps agree with it (both enter the DDIM step)
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
            eps_hat = predict_eps_from_x0(x, t, x0_hat, self.schedule)
        if step is not None:
            if self.record and (step % self.every == 0 or step == self.n_steps - 1):
                self.trajectory.append(Snapshot(t, x.cpu(), x0_hat.cpu()))
            if self.callback is not None:
                self.callback(step, t, x, x0_hat)
        return x0_hat, eps_hat


def _ddim_loop(denoise: _Denoiser, x, timesteps: list[int], eta: float, generator, steps_iter):
    """DDIM (Song et al. 2021, eq. 12) over `timesteps`, then to x_0; eta = 1 is DDPM on these timesteps."""
    alpha_bar = denoise.schedule.alpha_bar.tolist() + [1.0]  # host floats; alpha_bar "after t = 0" is 1
    for i in steps_iter:
        t = timesteps[i]
        x0_hat, eps_hat = denoise(x, t, i)
        ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 and ab_prev < 1 else None
        x = ddim_step(x0_hat, eps_hat, alpha_bar[t], ab_prev, eta, noise)
    return x


def _karras_loop(denoise: _Denoiser, x, timesteps: list[int], heun: bool, steps_iter):
    """Euler or Heun on dy/dsigma = (y - D(y; sigma)) / sigma (Karras et al. 2022, Algorithm 1; Euler is
    Algorithm 1 without its 2nd-order correction), sigma from sigma(timesteps[0]) down to 0.

    The state is y = x_t / sqrt(alpha_bar_t) = x_t sqrt(1 + sigma^2); the model sees x_t = y / sqrt(1 + sigma^2)
    (Karras et al. Table 1, c_in of the VP model). Heun corrects each step with the slope at its end point,
    d' = (y_next - D(y_next; sigma_next)) / sigma_next, and takes the mean slope; the last step (to sigma = 0)
    stays Euler, so Heun makes 2 n - 1 model calls for n steps.
    """
    sigmas = denoise.schedule.sigmas
    if not all(math.isfinite(sigmas[t]) for t in timesteps):
        raise ValueError("Euler and Heun need finite sigmas, but alpha_bar = 0 at t = T-1 (zero terminal SNR) "
                         "makes sigma infinite there; use sampler='ddim' or 'dpmpp_2m' (with a v-prediction model)")
    sig = [float(sigmas[t]) for t in timesteps] + [0.0]
    y = x * math.sqrt(1 + sig[0] ** 2)
    for i in steps_iter:
        s, s_next = sig[i], sig[i + 1]
        x0_hat, _ = denoise(y / math.sqrt(1 + s**2), timesteps[i], i)
        y_next = euler_step(y, x0_hat, s, s_next)
        if heun and s_next > 0:
            x0_next, _ = denoise(y_next / math.sqrt(1 + s_next**2), timesteps[i + 1])
            slope = ((y - x0_hat) / s + (y_next - x0_next) / s_next) / 2
            y_next = y + (s_next - s) * slope
        y = y_next
    return y  # at sigma = 0, y = x_0


def _dpmpp_2m_loop(denoise: _Denoiser, x, timesteps: list[int], steps_iter):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): an exponential integrator for the data-prediction ODE in
    lambda = log(alpha / sigma), in the paper's notation alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) (so
    lambda = -log of Karras's sigma), steps h_i = lambda_i - lambda_{i-1} > 0, and D_i a linear extrapolation of
    the last two x0 predictions:

        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2},     r_i = h_{i-1} / h_i.

    With D_i = x0_hat_{i-1} (the first step, which has no history) this is exactly a DDIM step (eta = 0). The last
    step goes to lambda = inf (clean data) and is first order too: it returns the model's x0_hat at t = 0.
    `sample` runs it on Karras sigmas: second order means error ~ h^2 in the steps h in lambda, and on uniformly
    spaced timesteps the step next to t = 0 shrinks only like log(T / steps) in lambda (sigma_t ~ sqrt(t) there),
    which held the measured order to about 1.4 (tests/test_samplers.py); Karras sigmas give the full 2.
    """
    ab = denoise.schedule.alpha_bar
    alpha = [math.sqrt(ab[t]) for t in timesteps] + [1.0]
    sigma = [math.sqrt(1 - ab[t]) for t in timesteps] + [0.0]
    lam = [0.5 * float(denoise.schedule.log_snr[t]) for t in timesteps] + [math.inf]  # -inf where alpha_bar = 0
    x0_prev = None
    for i in steps_iter:
        x0_hat, _ = denoise(x, timesteps[i], i)
        h = lam[i + 1] - lam[i]
        if x0_prev is None or math.isinf(h):
            d = x0_hat
        else:
            r = (lam[i] - lam[i - 1]) / h  # inf after a zero-terminal-SNR first step: then 1 / (2 r) = 0
            d = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0_hat
    return x


@torch.no_grad()
def sample(model, shape, schedule: NoiseSchedule, sampler: str = "ddpm", steps=None, context=None,
           prediction: str = "eps", generator: torch.Generator | None = None, device=None,
           guidance_scale: float = 1.0, uncond_context=None, eta: float = 0.0, return_trajectory: bool = False,
           clip_x0: float | None = None, progress: bool = False, callback=None, x_start: torch.Tensor | None = None):
    """Draw samples of `shape` (B, ...) with any sampler of SAMPLERS; returns x, or (x, [Snapshot, ...]).

    sampler:  "ddpm", "ddim", "euler", "heun" or "dpmpp_2m" (see the module docstring).
    steps:    how many steps, an int from 1 to T (anything else is an error); None means all T for "ddpm" and
              min(50, T) for the others. "ddpm" with fewer
              than T steps samples the respaced process (Nichol & Dhariwal 2021, Sec. 4), i.e. DDIM with eta = 1.
              "ddpm" and "ddim" step through `uniform_timesteps`, the others through `karras_timesteps` (which
              may merge a few steps). Heun makes 2 steps - 1 model calls, the others one per step. `steps` may
              also be an explicit sequence of strictly decreasing timesteps, e.g. uniform_timesteps(T, 20).
    eta:      DDIM's noise, 0 (deterministic) to 1 (DDPM's posterior variance); only for sampler="ddim".
    context, guidance_scale, uncond_context: passed to `model_output` (classifier-free guidance when the scale
              is not 1); the context is never looked at, so it may be any tensor, e.g. token ids. A scale below 1
              is an error (`check_guidance` says why); 1 turns guidance off.
    prediction: what the model predicts, "eps", "x0" or "v".
    clip_x0:  clamp each x0_hat to [-clip_x0, clip_x0] (e.g. 1.0 for pixels), eps_hat made to agree.
    return_trajectory: also return about 10 Snapshots (t, x_t, x0_hat) on the CPU, the last at the last timestep
              (t = 0), whose x0_hat is the returned sample.
    callback: callback(step, t, x_t, x0_hat), called once per step (not for Heun's correction); the tensors are
              the live ones: clone what you keep.
    x starts as torch.randn(shape, generator=generator, device=device) (device: the schedule's by default), or as
              `x_start` (shaped `shape`): a state already at timesteps[0], e.g. an image noised to that level by
              q(x_t | x_0) (SDEdit, `minildm.applications.img2img`); then `steps` are usually explicit timesteps.

    Pure noise is the exact start only if alpha_bar_{T-1} = 0. The deterministic samplers (DDIM with eta = 0,
    Euler, Heun, DPM-Solver++) carry the start's error to the end: along a data direction of standard deviation s
    the sample mean comes out shrunk towards 0 by a fraction of about s sqrt(alpha_bar_{T-1}) -- 7% for s = 1 on
    scaled_linear, T = 1000 (alpha_bar_{T-1} = 0.0047), 0.6% on linear. DDPM's fresh noise washes it out;
    a zero-terminal-SNR schedule removes it (Lin et al. 2024).
    """
    timesteps = sampler_timesteps(schedule, sampler, steps)  # checks the sampler's name and the steps
    check_prediction(prediction)
    check_guidance(guidance_scale)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {eta}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to sampler='ddim' (sampler={sampler!r} has no eta; 'ddpm' is "
                         "DDIM with eta = 1)")
    T = schedule.T
    shape, device = _check_shape_and_device(shape, schedule, device)
    if x_start is not None and tuple(x_start.shape) != shape:
        raise ValueError(f"x_start has shape {tuple(x_start.shape)} but the samples are {shape}; they must match")
    if sampler == "ddpm" and timesteps == list(range(T - 1, -1, -1)) and x_start is None:
        return ddpm_sample(model, shape, schedule, context, prediction, generator, device, return_trajectory,
                           clip_x0, progress, guidance_scale, uncond_context, callback=callback)

    denoise = _Denoiser(model, schedule, prediction, context, guidance_scale, uncond_context, clip_x0, callback,
                        return_trajectory, len(timesteps))
    x = torch.randn(shape, generator=generator, device=device) if x_start is None else x_start.to(device)
    steps_iter = range(len(timesteps))
    if progress:
        from minildm.progress import progress_bar

        steps_iter = progress_bar(steps_iter, desc=sampler)
    if sampler in ("ddpm", "ddim"):
        x = _ddim_loop(denoise, x, timesteps, 1.0 if sampler == "ddpm" else eta, generator, steps_iter)
    elif sampler in ("euler", "heun"):
        x = _karras_loop(denoise, x, timesteps, sampler == "heun", steps_iter)
    else:
        x = _dpmpp_2m_loop(denoise, x, timesteps, steps_iter)
    return (x, denoise.trajectory) if return_trajectory else x
