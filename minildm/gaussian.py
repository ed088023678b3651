"""Data sets whose exact denoiser is known in closed form: Gaussians and mixtures of Gaussians (course stage 8).

A trained network only approximates E[x_0 | x_t]. For Gaussian data (and mixtures of Gaussians) that conditional
mean has a closed form, so a sampler run with it as "the model" has nothing to blame but itself: its samples must
have the data's moments, and a deterministic sampler must land where the exact probability-flow ODE lands, with an
error that shrinks with the number of steps at the order the method claims. `tests/test_samplers.py` and notebook 08
check every sampler of `minildm.samplers` this way.

The closed form. Given component k, x_0 ~ N(mu_k, Sigma_k) and x_t = a x_0 + b eps (a = sqrt(alpha_bar_t),
b = sqrt(1 - alpha_bar_t)) is Gaussian too, N(a mu_k, C_k) with C_k = a^2 Sigma_k + b^2 I. Bayes' rule for the
component, then the Gaussian conditional mean inside it:

    E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + a Sigma_k C_k^{-1} (x_t - a mu_k)),    r_k ∝ w_k N(x_t; a mu_k, C_k),

and eps and v follow from it: eps_hat = (x_t - a x0_hat) / b, v_hat = a eps_hat - b x0_hat (`minildm.diffusion`).
Everything is computed in float64, in the eigenbasis of each Sigma_k = U diag(lam) U^T, where C_k = U diag(a^2 lam +
b^2) U^T is diagonal.
"""

from __future__ import annotations

import math

import torch

from minildm.schedules import NoiseSchedule


class GaussianMixture:
    """Data x_0 ~ sum_k w_k N(mu_k, Sigma_k) in D dimensions, with its exact denoiser.

    weights (K,), means (K, D), covs (K, D, D) symmetric positive definite; one component is a Gaussian."""

    def __init__(self, weights, means, covs):
        self.weights, self.means, self.covs = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, covs))
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D) or not self.weights.sum().isclose(
                torch.tensor(1.0, dtype=torch.float64)) or (self.weights <= 0).any():
            raise ValueError(f"a mixture needs K positive weights summing to 1, K means (K, D) and K covariances "
                             f"(K, D, D); got shapes {tuple(self.weights.shape)}, {tuple(self.means.shape)}, "
                             f"{tuple(self.covs.shape)} and weights {self.weights.tolist()}")
        self.lam, self.U = torch.linalg.eigh(self.covs)  # (K, D) eigenvalues, (K, D, D) eigenvectors
        if (self.lam <= 0).any():
            raise ValueError("every covariance must be positive definite (all eigenvalues > 0)")

    @property
    def mean(self) -> torch.Tensor:
        """E[x_0] = sum_k w_k mu_k, (D,)."""
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        """Cov[x_0] = sum_k w_k (Sigma_k + mu_k mu_k^T) - E[x_0] E[x_0]^T, (D, D)."""
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(self.mean, self.mean)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x_0 (n, D), float64: a component by its weight, then mu_k + U_k sqrt(lam_k) z."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + ((z * self.lam[k].sqrt())[:, None, :] * self.U[k]).sum(-1)

    def x0_given_xt(self, x_t: torch.Tensor, alpha_bar: float, shift=0.0) -> torch.Tensor:
        """E[x_0 | x_t] at noise level alpha_bar (module docstring), (B, D) float64. `shift` (B, D) moves every
        mean, e.g. a per-sample condition."""
        a, x = math.sqrt(alpha_bar), x_t.double()
        log_r, x0 = [], []
        for w, mu, lam, U in zip(self.weights, self.means, self.lam, self.U):
            mu = mu + shift
            z, c = (x - a * mu) @ U, alpha_bar * lam + (1 - alpha_bar)  # x_t - a mu along U, and C_k's eigenvalues
            log_r.append(w.log() - 0.5 * (z**2 / c).sum(1) - 0.5 * c.log().sum())  # log w_k N(x_t; a mu_k, C_k) + const
            x0.append(mu + (z * a * lam / c) @ U.T)  # mu_k + a Sigma_k C_k^{-1} (x_t - a mu_k)
        return (torch.stack(log_r).softmax(0)[..., None] * torch.stack(x0)).sum(0)

    def model(self, schedule: NoiseSchedule, prediction: str = "eps", shift_of_context=None, calls=None):
        """The exact denoiser as a model: model(x_t, t, context) -> eps, x0 or v, in x_t's dtype, like a trained
        network. It checks that t is one valid int64 timestep for the whole batch, (B,). `shift_of_context(context)`
        -> (B, D) turns the context into a mean shift (a conditional model); `calls`, a list, collects
        (t, batch size) of every call."""

        def model(x_t, t, context=None):
            if t.dtype != torch.long or t.shape != (x_t.shape[0],) or not (t == t[0]).all():
                raise ValueError(f"the exact denoiser takes one int64 timestep per sample, all equal; got {t}")
            if not 0 <= int(t[0]) <= schedule.T - 1:
                raise ValueError(f"timestep {int(t[0])} is outside 0..{schedule.T - 1}")
            if calls is not None:
                calls.append((int(t[0]), x_t.shape[0]))
            ab = float(schedule.alpha_bar[t[0]])
            a, b = math.sqrt(ab), math.sqrt(1 - ab)
            shift = 0.0 if shift_of_context is None else shift_of_context(context)
            x0 = self.x0_given_xt(x_t, ab, shift)
            eps = (x_t.double() - a * x0) / b
            return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction].to(x_t.dtype)

        return model

    def ode_end(self, schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
        """(One Gaussian only.) Where the exact probability-flow ODE takes the start x_T, as the deterministic
        samplers run it: from y = x_T / sqrt(alpha_bar_{T-1}) at sigma_max down to sigma_0 (t = 0), then the last
        step's x0_hat. (B, D) float64.

        With D(y; sigma) = mu + Sigma (Sigma + sigma^2 I)^{-1} (y - mu), each eigen-direction of Sigma (variance
        lam) obeys d(y - mu)/dsigma = sigma (y - mu) / (lam + sigma^2), so y - mu scales like sqrt(lam + sigma^2):
        it is multiplied by sqrt((lam + sigma_0^2) / (lam + sigma_max^2)), then by lam / (lam + sigma_0^2) (that
        is D at sigma_0)."""
        if len(self.weights) != 1:
            raise ValueError(f"ode_end has a closed form for one Gaussian; this mixture has {len(self.weights)}")
        (mu,), (lam,), (U,) = self.means, self.lam, self.U
        ab_T = schedule.alpha_bar[-1]
        if ab_T == 0:
            raise ValueError("ode_end needs alpha_bar_{T-1} > 0 (a zero-terminal-SNR schedule starts at sigma = inf)")
        smax2, s02 = (1 - ab_T) / ab_T, schedule.sigmas[0] ** 2
        z = (x_T.double() / ab_T.sqrt() - mu) @ U
        return mu + (z * lam / ((lam + s02) * (lam + smax2)).sqrt()) @ U.T


def ddpm_moments(schedule: NoiseSchedule, mu, s, variance: str = "beta_tilde") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance of DDPM's samples (all T steps) with the exact denoiser of x_0 ~ N(mu, diag(s^2)).

    Each DDPM step is linear in x_t plus independent Gaussian noise, so mean m and variance V (per coordinate)
    follow a recursion from m = 0, V = 1 (x_{T-1} ~ N(0, I)): with E[x_0 | x_t] = mu + k (x_t - a mu),
    k = a s^2 / (a^2 s^2 + b^2), and the posterior-mean coefficients c0, ct of x_0 and x_t (Ho et al. eq. 7),

        m <- c0 (mu + k (m - a mu)) + ct m,     V <- (c0 k + ct)^2 V + sigma_t^2   (no noise at t = 0),

    sigma_t^2 = beta_tilde_t or beta_t (`variance`). Returns (m, V), float64 tensors shaped like mu."""
    mu, s = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    m, V = torch.zeros_like(mu), torch.ones_like(mu)
    noise_var = schedule.posterior_variance if variance == "beta_tilde" else schedule.betas
    for i in reversed(range(schedule.T)):
        ab = schedule.alpha_bar[i]
        a = ab.sqrt()
        k = a * s**2 / (ab * s**2 + 1 - ab)
        c0, ct = schedule.posterior_mean_coef_x0[i], schedule.posterior_mean_coef_xt[i]
        m = c0 * (mu + k * (m - a * mu)) + ct * m
        V = (c0 * k + ct) ** 2 * V + (noise_var[i] if i > 0 else 0.0)
    return m, V


def fitted_order(steps, errors) -> float:
    """The order of accuracy measured from errors at several step counts: minus the least-squares slope of
    log(error) against log(steps). A method of order p has error ~ C steps^(-p), a straight line of slope -p on a
    log-log plot."""
    x = torch.as_tensor(steps, dtype=torch.float64).log()
    y = torch.as_tensor(errors, dtype=torch.float64).log()
    if x.numel() < 2 or x.numel() != y.numel() or not torch.isfinite(y).all():
        raise ValueError(f"fitted_order needs >= 2 step counts and as many positive errors; got {list(steps)} "
                         f"and {list(errors)}")
    return float(-((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum())
