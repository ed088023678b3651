"""Noise schedules and the forward process q(x_t | x_0) (course stage 3).

The forward process adds Gaussian noise in T small steps (Ho et al. 2020, eq. 2):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),     t = 0 .. T-1 here (0-based)

and because Gaussians compose, any step can be reached from x_0 in one jump (eq. 4):

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s<=t} (1 - beta_s).

Everything about a schedule follows from the betas; one number summarises each step, the
signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t), which falls from large (almost clean)
to small (almost pure noise).

Conventions: timesteps are 0-based integers 0..T-1 in int64 tensors of shape (B,). Tables are
computed in float64; lookups (`NoiseSchedule.at`) hand out float32 copies for float32 data.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from minildm.device import may_read_values

# ---------------------------------------------------------------------------------------------
# Beta schedules: each returns a float64 tensor of T betas.
# ---------------------------------------------------------------------------------------------


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be a positive int, got {T!r}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas linear from beta_start to beta_end (Ho et al. 2020, Sec. 4; endpoints chosen for T=1000)."""
    _check_T(T)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"linear betas need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The LDM default: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end), then squared."""
    _check_T(T)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"scaled-linear betas need 0 < beta_start <= beta_end < 1, got {beta_start}, "
                         f"{beta_end}")
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def betas_from_alpha_bar_fn(alpha_bar_fn, T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha_bar(u), u in [0, 1] with alpha_bar(0) = 1, into T betas.

    Step t (0-based) ends at u = (t+1)/T, so beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T),
    clipped at max_beta so that no step destroys the signal completely (Nichol & Dhariwal 2021, Sec. 3.2).
    """
    _check_T(T)
    u = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) from 0 to 1
    ab = alpha_bar_fn(u)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi/2).

    The small offset s keeps beta from being tiny near u = 0; the last beta (where f(1) = 0) is clipped.
    """

    def f(u):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar_fn(lambda u: f(u) / f(torch.zeros((), dtype=torch.float64)), T, max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """A sigmoid-shaped alpha_bar (Jabri et al. 2022; Chen 2023, "On the importance of noise scheduling").

    With sig(z) = 1 / (1 + exp(-z)), the formula used here is

        alpha_bar(u) = (sig(end/tau) - sig((start + u (end - start))/tau)) / (sig(end/tau) - sig(start/tau)),

    which falls from exactly 1 at u = 0 to exactly 0 at u = 1 (that last beta is clipped at max_beta).
    A larger tau makes the curve closer to linear in u; (start, end) pick which part of the sigmoid is used.
    """
    if tau <= 0 or start >= end:
        raise ValueError(f"sigmoid betas need tau > 0 and start < end; got tau={tau}, start={start}, "
                         f"end={end}")

    def alpha_bar(u):
        v_start, v_end = (torch.sigmoid(torch.tensor(v / tau, dtype=torch.float64)) for v in (start, end))
        return (v_end - torch.sigmoid((start + u * (end - start)) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar_fn(alpha_bar, T, max_beta)


def _rescaled_for_T(fn, beta_start: float, beta_end: float):
    """A linear schedule's T=1000 endpoints scaled by 1000/T, so alpha_bar_{T-1} stays about the same."""

    def betas(T: int) -> torch.Tensor:
        _check_T(T)
        scale = 1000 / T
        if beta_end * scale >= 1:
            raise ValueError(f"a linear schedule with T={T} would need beta_end = {beta_end} * 1000/T = "
                             f"{beta_end * scale:.3g} >= 1; use T >= {math.floor(1000 * beta_end) + 1} "
                             "or the 'cosine' / 'sigmoid' schedule")
        return fn(T, beta_start * scale, beta_end * scale)

    return betas


BETA_SCHEDULES = {
    "linear": _rescaled_for_T(linear_betas, 1e-4, 0.02),
    "scaled_linear": _rescaled_for_T(scaled_linear_betas, 0.00085, 0.012),
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def make_betas(name: str, T: int) -> torch.Tensor:
    """Betas of a named schedule: one of BETA_SCHEDULES ("linear", "scaled_linear", "cosine", "sigmoid").

    The linear endpoints (1e-4..0.02 and 0.00085..0.012) are per-step values tuned for T=1000; for another T
    they are multiplied by 1000/T (as Nichol & Dhariwal 2021 do), so that sum(betas), and with it how close
    alpha_bar gets to 0, stays about the same. Cosine and sigmoid are defined in continuous time already.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
    return BETA_SCHEDULES[name](T)


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, notation above eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: make the last step pure noise (alpha_bar_{T-1} = 0, SNR = 0).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    the betas are then read back from the ratios of consecutive alpha_bars (the last beta becomes 1).
    A model must then predict v (or x0) at the last step: eps carries no information about x_0 there.
    """
    sqrt_ab = alpha_bar_from_betas(betas.to(torch.float64)).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------
# The schedule object: every per-step quantity the losses and samplers look up.
# ---------------------------------------------------------------------------------------------

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class NoiseSchedule(nn.Module):
    """All per-step tables of a schedule, computed once in float64 from the betas.

    Tables (float64, on the CPU, each of length T; index t = 0..T-1):
        betas, alphas = 1 - betas, alpha_bar = cumprod(alphas), alpha_bar_prev (alpha_bar_{t-1}, 1 at t=0),
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar,
        snr = alpha_bar / (1 - alpha_bar), log_snr,
        sigmas = sqrt((1 - alpha_bar) / alpha_bar)   (the "variance exploding" view x_t / sqrt(alpha_bar) =
                                                      x_0 + sigma_t eps used by Karras / DPM-Solver samplers),
        posterior_variance, posterior_mean_coef_x0, posterior_mean_coef_xt   (Ho et al. eqs. 6-7:
            q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance I)).

    `at(name, t, like)` looks a table up for a batch of timesteps. The float64 tables stay on the CPU and serve
    float64 data (exact references for tests); float32 copies are module buffers (`<name>_f32`), so they move with
    `.to(device)` together with the model that holds the schedule (a `DiffusionTask`), and serve float32/16 data on
    any device (Apple's MPS has no float64). They are not saved in checkpoints: they follow from the betas.
    """

    TABLES = ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
              "snr", "log_snr", "sigmas",
              "posterior_variance", "posterior_mean_coef_x0", "posterior_mean_coef_xt")

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-d tensor, got shape {tuple(betas.shape)}")
        if not (betas > 0).all() or not (betas[:-1] < 1).all() or not betas[-1] <= 1:
            raise ValueError("betas must lie in (0, 1) (the last may be exactly 1 for a zero-terminal-SNR "
                             f"schedule); got min {betas.min().item():.3g}, max {betas.max().item():.3g}")
        self.name, self.T = name, len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bar = alpha_bar_from_betas(betas)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        self.snr = self.alpha_bar / (1 - self.alpha_bar)
        self.log_snr = self.alpha_bar.log() - torch.log1p(-self.alpha_bar)
        self.sigmas = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()  # inf where alpha_bar = 0
        # Posterior q(x_{t-1} | x_t, x_0), Ho et al. eq. 7 (at t = 0: variance 0, mean = x_0).
        one_minus_ab = 1 - self.alpha_bar
        self.posterior_variance = betas * (1 - self.alpha_bar_prev) / one_minus_ab
        self.posterior_mean_coef_x0 = self.alpha_bar_prev.sqrt() * betas / one_minus_ab
        self.posterior_mean_coef_xt = self.alphas.sqrt() * (1 - self.alpha_bar_prev) / one_minus_ab
        for table in self.TABLES:
            self.register_buffer(f"{table}_f32", getattr(self, table).float(), persistent=False)

    @classmethod
    def from_name(cls, name: str = "scaled_linear", T: int = 1000, zero_terminal_snr: bool = False):
        """The schedule of `make_betas(name, T)`, optionally rescaled to zero terminal SNR (Lin et al.)."""
        betas = make_betas(name, T)
        if zero_terminal_snr:
            betas, name = rescale_zero_terminal_snr(betas), name + "+zero_terminal_snr"
        return cls(betas, name=name)

    @property
    def device(self) -> torch.device:
        """Where the float32 tables are (`.to(device)` moves them)."""
        return self.alpha_bar_f32.device

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.name!r}, T={self.T}, alpha_bar from {self.alpha_bar[0].item():.4f} "
                f"to {self.alpha_bar[-1].item():.3g}, device={self.device})")

    def check_timesteps(self, t, batch: int | None = None) -> torch.Tensor:
        """Validate timesteps and return them as an int64 tensor of shape (batch,).

        Accepts a Python int (broadcast to the batch) or an integer tensor of shape () or (batch,).
        """
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):  # int, numpy int
            t = torch.tensor(int(t))
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"timesteps must be an int or an integer tensor, got {type(t).__name__}")
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"timesteps must be integers (int64 tensor of shape (B,)), got dtype {t.dtype}; "
                             "use t.long() if they are whole numbers")
        if t.ndim > 1 or (batch is not None and t.ndim == 1 and len(t) != batch):
            raise ValueError(f"timesteps must have shape (B,) = ({batch},), got {tuple(t.shape)}")
        if t.numel() > 0 and may_read_values(t):  # reads t on the host (skipped where that would stall the GPU)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi > self.T - 1:
                bad = lo if lo < 0 else hi
                raise ValueError(f"timestep {bad} out of range: this schedule has T={self.T} steps, "
                                 f"valid t are 0..{self.T - 1}")
        t = t.long()
        return t.expand(batch) if (batch is not None and t.ndim == 0) else t

    def at(self, name: str, t, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t, shaped (B, 1, ..., 1) to broadcast against `like` (B, ...)."""
        if name not in self.TABLES:
            raise ValueError(f"unknown schedule table {name!r}; choose one of {self.TABLES}")
        table = getattr(self, name) if like.dtype == torch.float64 else getattr(self, f"{name}_f32")
        table = table.to(like.device)  # a no-op when the schedule is already where the data is
        broadcast = (-1, *([1] * (like.ndim - 1)))
        if isinstance(t, int) and not isinstance(t, bool):  # one step for the whole batch, as in a sampler:
            self.check_timesteps(t)  # checked on the host, and indexing with a Python int is a view, so the CPU
            return table[t].to(like.dtype).expand(like.shape[0]).view(broadcast)  # never waits for the GPU
        t = self.check_timesteps(t, like.shape[0])
        return table[t.to(like.device)].to(like.dtype).view(broadcast)  # (B, 1, ..., 1)

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (Ho et al. eq 4)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; "
                             "they must match")
        return self.at("sqrt_alpha_bar", t, x0) * x0 + self.at("sqrt_one_minus_alpha_bar", t, x0) * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None):
        """t ~ U{0..T-1}: an int64 tensor of shape (batch,), by default on the generator's device."""
        if device is None:
            device = generator.device if generator is not None else self.device
        return torch.randint(0, self.T, (batch,), generator=generator, device=device)
