"""The samplers (DDPM, DDIM, Euler, Heun, DPM-Solver++(2M)), checked with the exact denoisers of Gaussian and
Gaussian-mixture data sets, for which the right answers are known in closed form."""

import itertools
import math

import pytest
import torch

from minildm.gaussian import GaussianMixture, ddpm_moments, fitted_order
from minildm.samplers import (
    SAMPLERS,
    Snapshot,
    ddim_sigma,
    ddim_step,
    ddpm_sample,
    euler_step,
    karras_sigmas,
    karras_timesteps,
    model_calls,
    model_output,
    pick_frames,
    sample,
    sampler_timesteps,
    uniform_timesteps,
)
from minildm.schedules import NoiseSchedule

MU, S = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
N = 4000


def oracle(schedule, mu, s, prediction="eps", device="cpu"):
    """The exact denoiser for x0 ~ N(mu, diag(s^2)): E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), etc.
    (GaussianMixture's with one diagonal component, vectorised over t and on any device, for the GPU tests.)"""
    alpha_bar, mu, s = schedule.alpha_bar.to(device), mu.to(device), s.to(device)

    def model(x_t, t, context=None):
        ab = alpha_bar[t].to(x_t.dtype)[:, None]  # (B, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        denom = ab * s**2 + b**2
        eps = b * (x_t - a * mu) / denom
        x0 = mu + a * s**2 * (x_t - a * mu) / denom
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return model


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("linear", 200)


@pytest.fixture(scope="module")
def samples(sched):
    return ddpm_sample(oracle(sched, MU, S), (N, 2), sched, generator=torch.Generator().manual_seed(0))


def test_ddpm_with_exact_denoiser_reproduces_the_data(sched, samples):
    assert samples.shape == (N, 2) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    mean, std = samples.mean(0), samples.std(0)
    assert (mean - MU).abs().max() < 5 * S.max() / math.sqrt(N)
    # beta_tilde noise slightly under-disperses at T=200 (ddpm_moments: std 0.483 for 0.5, 0.979 for 1.0)
    torch.testing.assert_close(std, S, rtol=0.04 + 5 / math.sqrt(2 * N), atol=0)


def test_ddpm_moments_match_the_exact_recursion(sched, samples):
    m, V = ddpm_moments(sched, MU, S)
    mean_se, var_se = (V / N).sqrt(), V * math.sqrt(2 / (N - 1))
    assert ((samples.mean(0).double() - m).abs() < 5 * mean_se).all()
    assert ((samples.var(0).double() - V).abs() < 5 * var_se).all()
    assert (V.sqrt() / S.double() - 1).abs().max() < 0.04  # the bias the previous test allows for


def test_beta_variance_is_exact_for_unit_variance_data(sched):
    """With sigma_t^2 = beta_t the reverse step is exact for x0 ~ N(mu, I) (Ho et al. Sec. 3.2)."""
    s = torch.ones(2)
    m, V = ddpm_moments(sched, MU, s, variance="beta")
    torch.testing.assert_close(V, torch.ones(2, dtype=torch.float64), rtol=1e-3, atol=0)
    torch.testing.assert_close(m, MU.double(), rtol=0, atol=1e-3)
    g = torch.Generator().manual_seed(1)
    x = ddpm_sample(oracle(sched, MU, s), (N, 2), sched, variance="beta", generator=g)
    assert ((x.var(0) - 1).abs() < 5 * math.sqrt(2 / (N - 1))).all()


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_equals_ho_algorithm_2(variance):
    """Same noise draws, written as Ho et al.'s Algorithm 2:
    x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps_theta) / sqrt(alpha_t) + sigma_t z, no z at the end."""
    s = NoiseSchedule.from_name("cosine", 30)

    def model(x, t, context=None):  # any deterministic function of (x, t) will do
        return 0.3 * x + torch.sin(t.float())[:, None, None, None] * 0.1

    shape = (3, 2, 4, 4)
    got = ddpm_sample(model, shape, s, variance=variance, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float32).double()
    for i in reversed(range(s.T)):
        eps = model(x, torch.full((3,), i))
        x = (x - s.betas[i] / (1 - s.alpha_bar[i]).sqrt() * eps) / s.alphas[i].sqrt()
        if i > 0:
            sigma2 = s.posterior_variance[i] if variance == "beta_tilde" else s.betas[i]
            x = x + sigma2.sqrt() * torch.randn(shape, generator=g).double()
    torch.testing.assert_close(got, x.float(), rtol=1e-4, atol=1e-4)


def test_eps_x0_v_models_give_the_same_samples(sched):
    outs = [ddpm_sample(oracle(sched, MU, S, p), (64, 2), sched, prediction=p,
                        generator=torch.Generator().manual_seed(5)) for p in ("eps", "x0", "v")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)
    again = ddpm_sample(oracle(sched, MU, S), (64, 2), sched, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, outs[0])


def test_zero_terminal_snr_with_v_prediction():
    z = NoiseSchedule.from_name("linear", 200, zero_terminal_snr=True)
    n, g = 1000, torch.Generator().manual_seed(2)
    x = ddpm_sample(oracle(z, MU, S, "v"), (n, 2), z, prediction="v", generator=g)
    assert torch.isfinite(x).all() and (x.mean(0) - MU).abs().max() < 5 * S.max() / math.sqrt(n)
    with pytest.raises(ValueError, match="prediction='v'"):
        ddpm_sample(oracle(z, MU, S), (4, 2), z, prediction="eps")


def test_trajectory_and_clipping(sched):
    x, traj = ddpm_sample(oracle(sched, MU, S), (8, 2), sched, return_trajectory=True, trajectory_every=50,
                          generator=torch.Generator().manual_seed(3))
    assert all(isinstance(f, Snapshot) for f in traj)
    assert [f.t for f in traj] == [199, 150, 100, 50, 0]
    assert traj[-1].x0_hat.shape == (8, 2) and torch.equal(traj[-1].x0_hat, x)  # last step returns x0_hat
    x, traj = ddpm_sample(oracle(sched, MU, S), (8, 2), sched, variance="beta", return_trajectory=True)
    assert torch.equal(traj[-1].x0_hat, x)  # no noise at t = 0 with either variance
    x = ddpm_sample(lambda x, t, c: torch.full_like(x, 10.0), (8, 2), sched, prediction="x0", clip_x0=1.0)
    assert torch.equal(x, torch.ones(8, 2))


def test_classifier_free_guidance():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return context.expand_as(x)  # output = the context, so the guided value is easy to check

    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    cond, uncond = torch.full((3, 2), 2.0), torch.full((3, 2), 0.5)
    out = model_output(model, x, t, cond, guidance_scale=3.0, uncond_context=uncond)
    torch.testing.assert_close(out, torch.full((3, 2), 0.5 + 3.0 * (2.0 - 0.5)))
    assert calls == [6]  # one batched call of 2B
    assert torch.equal(model_output(model, x, t, cond), cond)
    with pytest.raises(ValueError, match="needs both a context and an uncond_context"):
        ddpm_sample(model, (3, 2), NoiseSchedule.from_name("linear", 50), context=cond, guidance_scale=2.0)


def test_sampler_errors(sched):
    model = oracle(sched, MU, S)
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        ddpm_sample(model, (4, 2), sched, prediction="noise")
    with pytest.raises(ValueError, match="shape must be"):
        ddpm_sample(model, (4,), sched)
    with pytest.raises(ValueError, match="unknown DDPM variance"):
        ddpm_sample(model, (4, 2), sched, variance="learned")
    with pytest.raises(ValueError, match=r"model output has shape \(4, 1\)"):
        ddpm_sample(lambda x, t, c: x[:, :1], (4, 2), sched)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ddpm_never_makes_the_cpu_wait_for_the_gpu():
    """A sampling step only queues GPU work: any host-device synchronisation (a timestep check on a GPU tensor,
    an .item()) raises under sync-debug mode "error". The samples still have the exact moments."""
    sched = NoiseSchedule.from_name("linear", 200).to("cuda")
    model = oracle(sched, MU, S, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = ddpm_sample(model, (N, 2), sched, generator=generator, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    m, V = ddpm_moments(sched, MU, S)
    assert (x.mean(0).cpu().double() - m).abs().max() < 5 * V.sqrt().max() / math.sqrt(N)


# =====================================================================================================================
# Stage 8: DDIM, Euler, Heun, DPM-Solver++(2M) and `sample`, one interface for all of them
# =====================================================================================================================


GAUSS = GaussianMixture([1.0], [[1.0, -2.0]], [[[0.36, 0.30], [0.30, 0.89]]])  # correlated: Sigma = A A^T, A = [[.6, 0], [.5, .8]]
MIXTURE = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [1.5, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]])
LDM = NoiseSchedule.from_name("scaled_linear", 1000)


def run(sampler, model, n, schedule, seed=0, **kwargs):
    return sample(model, (n, 2), schedule, sampler, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_uniform_timesteps():
    assert uniform_timesteps(1000, 1) == [999]
    assert uniform_timesteps(1000, 4) == [999, 666, 333, 0]
    assert uniform_timesteps(30, 30) == list(range(29, -1, -1))
    for steps in range(1, 31):  # distinct, in range, both ends: round-half-to-even would give [.., 2, 2, ..] at 23
        ts = uniform_timesteps(30, steps)
        assert len(set(ts)) == steps and ts[0] == 29 and ts[-1] == (0 if steps > 1 else 29)


def test_karras_sigmas_and_timesteps():
    s = karras_sigmas(0.01, 100.0, 5, rho=7.0)
    assert s[0] == pytest.approx(100.0) and s[-1] == pytest.approx(0.01)
    roots = torch.tensor(s, dtype=torch.float64) ** (1 / 7)  # eq. 5: evenly spaced in sigma^(1/rho)
    torch.testing.assert_close(roots.diff(), torch.full((4,), (0.01 ** (1 / 7) - 100 ** (1 / 7)) / 4,
                                                         dtype=torch.float64))
    assert karras_sigmas(0.5, 2.5, 3, rho=1.0) == pytest.approx([2.5, 1.5, 0.5])  # rho = 1: uniform in sigma
    ts = karras_timesteps(LDM, 20)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 20 and all(a > b for a, b in itertools.pairwise(ts))
    wanted = torch.tensor(karras_sigmas(float(LDM.sigmas[0]), float(LDM.sigmas[-1]), 20), dtype=torch.float64)
    got = LDM.sigmas[ts]  # each timestep's sigma is the nearest on a log scale: within half a timestep's ratio
    half_gap = (LDM.sigmas[1:] / LDM.sigmas[:-1]).log().max() / 2
    assert ((got / wanted).log().abs() <= half_gap + 1e-12).all()
    assert len(karras_timesteps(LDM, 50)) == 49  # two sigmas near sigma_min share t = 1 (documented)


def test_ddim_step_closed_forms(sched):
    """eta = 1 between consecutive timesteps is DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. eqs. 6-7):
    sigma^2 = beta_tilde_t and the mean is coef_x0 x0 + coef_xt x_t; eta = 0 adds no noise; t = 0 -> x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (1, 7, 100, 199):
        ab, ab_prev = float(sched.alpha_bar[t]), float(sched.alpha_bar[t - 1])
        assert ddim_sigma(ab, ab_prev, 1.0) ** 2 == pytest.approx(float(sched.posterior_variance[t]), rel=1e-9)
        assert ddim_sigma(ab, ab_prev, 0.0) == 0.0
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        mean = sched.posterior_mean_coef_x0[t] * x0 + sched.posterior_mean_coef_xt[t] * x_t
        torch.testing.assert_close(ddim_step(x0, eps, ab, ab_prev, 1.0, noise),
                                   mean + sched.posterior_variance[t].sqrt() * noise)
        torch.testing.assert_close(ddim_step(x0, eps, ab, ab_prev), math.sqrt(ab_prev) * x0
                                   + math.sqrt(1 - ab_prev) * eps)  # eta = 0: x_prev = q_sample(x0, prev, eps)
    assert torch.equal(ddim_step(x0, eps, float(sched.alpha_bar[0]), 1.0, 1.0, noise), x0)
    with pytest.raises(ValueError, match="pass noise"):
        ddim_step(x0, eps, 0.5, 0.6, eta=0.5)


def test_euler_step_is_exact_for_a_single_data_point():
    """For data = one point x0 the ODE solution is y(sigma) = x0 + sigma eps, a straight line: Euler is exact."""
    x0, eps = torch.tensor([0.3, -1.0]), torch.tensor([1.5, 0.2])
    for sigma, sigma_next in ((80.0, 20.0), (2.0, 0.5), (0.5, 0.0)):
        torch.testing.assert_close(euler_step(x0 + sigma * eps, x0, sigma, sigma_next), x0 + sigma_next * eps)


# The order of accuracy. Measured (scaled_linear, T = 1000, 256 samples; Karras counts are after merging):
#   ddim 20/40/80 steps: RMS error 9.3e-2, 4.8e-2, 2.5e-2 (slope 0.95);  euler 9.2e-2 .. 2.3e-2 (1.03)
#   heun 1.5e-2, 3.4e-3, 8.1e-4 (2.15);  dpmpp_2m 1.5e-2, 3.4e-3, 8.9e-4 (2.10).
# DPM-Solver++(2M) on uniform timesteps reaches only about 1.4 (see minildm.samplers._dpmpp_2m_loop).
ORDERS = {"ddim": (1, 0.15), "euler": (1, 0.15), "heun": (2, 0.3), "dpmpp_2m": (2, 0.3)}


@pytest.mark.parametrize("sampler", ORDERS)
def test_order_of_accuracy_against_the_exact_ode_solution(sampler):
    """Error of the final samples vs the closed-form ODE end point, at 20, 40, 80 steps: the slope of log(error)
    against log(steps) is the order, 1 for DDIM and Euler, 2 for Heun and DPM-Solver++(2M) (tolerance: 0.15, 0.3)."""
    n = 256
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))  # each run's first draw
    exact = GAUSS.ode_end(LDM, x_T)
    steps, errors = [], []
    for k in (20, 40, 80):
        x = run(sampler, GAUSS.model(LDM), n, LDM, steps=k)
        steps.append(len(sampler_timesteps(LDM, sampler, k)))  # Karras spacing merges a few at T = 1000
        errors.append(float((x.double() - exact).pow(2).sum(1).mean().sqrt()))
    assert steps == ([20, 40, 80] if sampler == "ddim" else [len(karras_timesteps(LDM, k)) for k in (20, 40, 80)])
    slope = fitted_order(steps, errors)
    order, tol = ORDERS[sampler]
    assert abs(slope - order) < tol, f"{sampler}: measured order {slope:.2f}, errors {errors}"


def test_fitted_order_reads_the_slope_of_a_power_law():
    steps = [5, 10, 20, 40]
    assert fitted_order(steps, [3.0 * k**-2 for k in steps]) == pytest.approx(2.0)
    assert fitted_order(steps, [0.1 * k**-1.0 * (1 + 0.01 * i) for i, k in enumerate(steps)]) == pytest.approx(
        1.0, abs=0.02)
    with pytest.raises(ValueError, match="positive errors"):
        fitted_order([10, 20], [0.1, 0.0])


def test_ddim_eta0_is_euler_and_dpmpp_2m_starts_as_ddim(sched):
    """Song et al. Sec. 4.3: DDIM (eta = 0) is Euler's method on the same timesteps; DPM-Solver++(2M)'s first and
    last steps are first order, so with two timesteps it is DDIM too (and differs from the third step on)."""
    model = GAUSS.model(sched)
    for ts in ([199, 120, 60, 20, 5, 0], [199, 150, 149, 3, 0]):
        torch.testing.assert_close(run("euler", model, 64, sched, steps=ts), run("ddim", model, 64, sched, steps=ts),
                                   rtol=1e-4, atol=1e-4)
    for ts in ([199], [150, 0]):
        torch.testing.assert_close(run("dpmpp_2m", model, 64, sched, steps=ts), run("ddim", model, 64, sched,
                                                                                    steps=ts), rtol=1e-4, atol=1e-4)
    ts = [199, 100, 30, 0]
    assert (run("dpmpp_2m", model, 64, sched, steps=ts) - run("ddim", model, 64, sched, steps=ts)).abs().max() > 1e-2


# Every sampler at about 100 model calls on `sched` (linear, T = 200): DDPM all 200 steps, Heun 50 steps (99 calls).
# Tolerance: 5 standard errors of the estimate plus a discretisation allowance of 6% of the largest covariance entry
# (measured with 4e4 samples: the largest deviation is Euler's, 5.1% on the Gaussian).
BUDGET = {"ddpm": None, "ddim": 100, "euler": 100, "heun": 50, "dpmpp_2m": 100}


def assert_moments(x, data: GaussianMixture, allowance=0.06):
    x = x.double()
    n, mean, centred = len(x), x.mean(0), x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]  # (n, D, D): the covariance is their mean
    mean_se, cov_se = (centred.var(0) / n).sqrt(), products.std(0) / math.sqrt(n)
    assert ((mean - data.mean).abs() < 5 * mean_se).all(), (mean, data.mean)
    cov_err = (products.mean(0) * n / (n - 1) - data.cov).abs()
    assert (cov_err < 5 * cov_se + allowance * data.cov.abs().max()).all(), (products.mean(0), data.cov)


def test_gaussian_mixture_closed_forms():
    """The mixture's draws have its closed-form moments, and its denoiser is E[x0 | x_t]: the error x0 - D(x_t) of
    the conditional mean is orthogonal to every function of x_t (checked on x_t, D and a nonlinear one, by Monte
    Carlo), which no other estimator achieves; for one Gaussian D is the linear formula mu + a Sigma C^-1 (x_t - a mu)."""
    g = torch.Generator().manual_seed(4)
    x0 = MIXTURE.sample(40000, generator=g)
    assert x0.shape == (40000, 2) and x0.dtype == torch.float64
    assert_moments(x0, MIXTURE, allowance=0.0)
    for ab in (0.9, 0.3, 0.02):
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        d = MIXTURE.x0_given_xt(x_t, ab)
        residual = x0 - d
        for f in (x_t, d, torch.tanh(x_t[:, :1] * x_t[:, 1:])):
            products = residual[:, :, None] * f[:, None, :]  # (n, 2, k): their means must vanish
            assert (products.mean(0).abs() < 5 * products.std(0) / math.sqrt(len(x0))).all(), (ab, products.mean(0))
    ab, x_t = 0.4, torch.randn(5, 2, generator=g, dtype=torch.float64)
    (mu,), (cov,) = GAUSS.means, GAUSS.covs
    c = ab * cov + (1 - ab) * torch.eye(2, dtype=torch.float64)
    linear = mu + math.sqrt(ab) * torch.linalg.solve(c, (x_t - math.sqrt(ab) * mu).T).T @ cov
    torch.testing.assert_close(GAUSS.x0_given_xt(x_t, ab), linear)
    torch.testing.assert_close(GAUSS.x0_given_xt(x_t, 1 - 1e-12), x_t, rtol=0, atol=1e-9)  # no noise: x_t itself


def test_gaussian_mixture_errors(sched):
    with pytest.raises(ValueError, match="positive weights summing to 1"):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]], [[[1.0]], [[1.0]]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="one Gaussian; this mixture has 2"):
        MIXTURE.ode_end(sched, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one int64 timestep per sample"):
        GAUSS.model(sched)(torch.zeros(2, 2), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="outside 0..199"):
        GAUSS.model(sched)(torch.zeros(2, 2), torch.tensor([200, 200]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reproduces_a_correlated_gaussian(sampler, sched):
    x = run(sampler, GAUSS.model(sched), 20000, sched, steps=BUDGET[sampler])
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert_moments(x, GAUSS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reproduces_a_gaussian_mixture(sampler, sched):
    n = 10000
    x = run(sampler, MIXTURE.model(sched), n, sched, seed=1, steps=BUDGET[sampler])
    assert_moments(x, MIXTURE)
    # and the weights of the two modes: P(x_1 < -0.25) in closed form (1-D marginals of the two components)
    z = (-0.25 - MIXTURE.means[:, 0]) / MIXTURE.covs[:, 0, 0].sqrt()
    p = float(MIXTURE.weights @ torch.special.ndtr(z))
    assert abs((x[:, 0] < -0.25).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_deterministic_samplers_carry_the_start_error_of_scaled_linear():
    """x_T ~ N(0, I) is not quite the noised data when alpha_bar_{T-1} = 0.0047 (scaled_linear): the ODE maps
    the start's mean error to a mean shrunk towards 0 (the closed form: ode_end is affine, its value at x_T = 0 is
    the sample mean): by s sqrt(alpha_bar_{T-1}) = 6.8% for s = 1, 3.4% for s = 0.5. Heun reproduces it; DDPM's
    fresh noise washes most of it out."""
    n, data = 20000, GaussianMixture([1.0], [[2.0, 3.0]], [[[1.0, 0.0], [0.0, 0.25]]])
    expected = data.ode_end(LDM, torch.zeros(1, 2))[0]
    torch.testing.assert_close(expected, data.mean * (1 - data.cov.diagonal().sqrt() * LDM.sqrt_alpha_bar[-1]),
                               rtol=2e-3, atol=0)
    se = (data.cov.diagonal() / n).sqrt()
    assert ((expected - data.mean).abs() > 10 * se).all()  # the effect is far larger than the noise
    heun = run("heun", data.model(LDM), n, LDM, steps=30).double().mean(0)
    assert ((heun - expected).abs() < 5 * se + 0.005).all(), (heun, expected)
    ddpm = run("ddpm", data.model(LDM), n, LDM, steps=100).double().mean(0)
    assert ((ddpm - data.mean).abs() < (expected - data.mean).abs() / 3).all(), (ddpm, expected)


def test_ddim_with_eta_1_at_all_T_steps_is_ddpm(sched, samples):
    """Same seed, same noise draws: the very same samples as ddpm_sample, so the same moments (ddpm_moments)."""
    x = sample(oracle(sched, MU, S), (N, 2), sched, "ddim", steps=sched.T, eta=1.0,
               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, samples, rtol=1e-4, atol=1e-4)
    m, V = ddpm_moments(sched, MU, S)
    assert ((x.mean(0).double() - m).abs() < 5 * (V / N).sqrt()).all()
    assert ((x.var(0).double() - V).abs() < 5 * V * math.sqrt(2 / (N - 1))).all()
    # "ddpm" with fewer steps is DDIM with eta = 1 on those timesteps; with all of them it is ddpm_sample itself
    model = GAUSS.model(sched)
    assert torch.equal(run("ddpm", model, 64, sched, steps=40), run("ddim", model, 64, sched, steps=40, eta=1.0))
    assert torch.equal(run("ddpm", model, 64, sched), ddpm_sample(model, (64, 2), sched,
                                                                  generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_eps_x0_and_v_models_give_the_same_samples(sampler, sched):
    steps = 30 if sampler != "ddpm" else None
    out = {p: run(sampler, MIXTURE.model(sched, p), 256, sched, steps=steps, prediction=p)
           for p in ("eps", "x0", "v")}
    torch.testing.assert_close(out["x0"], out["eps"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["v"], out["eps"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_passes_through(sampler, sched):
    """The context is token ids (B, 1) picking a mean shift. eps is affine in the mean, so guidance with scale g
    gives exactly the samples of the model conditioned on the shift u + g (c - u), in one batch of 2B a call."""
    table = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]], dtype=torch.float64)
    ids, uncond = torch.tensor([[1], [2], [1], [2]]), torch.zeros(4, 1, dtype=torch.long)
    calls, g = [], 2.5
    guided = run(sampler, GAUSS.model(sched, shift_of_context=lambda c: table[c[:, 0]], calls=calls), 4, sched,
                 steps=10, context=ids, guidance_scale=g, uncond_context=uncond)
    shift = table[uncond[:, 0]] + g * (table[ids[:, 0]] - table[uncond[:, 0]])
    direct = run(sampler, GAUSS.model(sched, shift_of_context=lambda c: shift), 4, sched, steps=10)
    torch.testing.assert_close(guided, direct, rtol=1e-4, atol=1e-4)
    assert {batch for _, batch in calls} == {8}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_calls_trajectory_and_callback(sampler, sched):
    calls, seen = [], []
    steps = None if sampler == "ddpm" else 20
    x, traj = run(sampler, GAUSS.model(sched, calls=calls), 8, sched, steps=steps, return_trajectory=True,
                  callback=lambda i, t, x_t, x0_hat: seen.append((i, t, x_t.shape, x0_hat.shape)))
    ts = (list(range(199, -1, -1)) if sampler == "ddpm" else uniform_timesteps(200, 20) if sampler == "ddim"
          else karras_timesteps(sched, 20))
    if sampler == "heun":  # each step's start, then its end, except on the last step (to sigma = 0)
        ts_calls = [u for t, t_next in itertools.pairwise(ts) for u in (t, t_next)] + [0]
    assert [t for t, _ in calls] == (ts_calls if sampler == "heun" else ts)
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(ts)) and seen[0][2:] == ((8, 2), (8, 2))
    assert all(isinstance(f, Snapshot) for f in traj) and traj[0].t == 199 and traj[-1].t == 0
    assert 5 <= len(traj) <= 12 and torch.equal(traj[-1].x0_hat, x)  # the last frame's x0 guess is the sample
    assert len(calls) == model_calls(sched, sampler, steps) == (2 * len(ts) - 1 if sampler == "heun" else len(ts))
    frames = pick_frames(traj, 4)  # what notebooks show: evenly spread, first and last (t = 0) included
    assert len(frames) == 4 and frames[0] is traj[0] and frames[-1] is traj[-1] and frames[-1].t == 0


def test_pick_frames():
    frames = list(range(11))  # e.g. DDPM at T = 1000: t = 999, 900, ..., 100, 0
    assert pick_frames(frames, 8) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert frames[:: len(frames) // 8][:8] == [0, 1, 2, 3, 4, 5, 6, 7]  # the stride slicing it replaces lost the end
    assert pick_frames(frames, 2) == [0, 10] and pick_frames(frames, 1) == [10] and pick_frames(frames, 20) == frames
    assert pick_frames(list(range(21)), 5) == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="positive int"):
        pick_frames(frames, 0)


def test_sampler_timesteps_and_model_calls():
    assert sampler_timesteps(LDM, "ddpm") == list(range(999, -1, -1)) and model_calls(LDM, "ddpm") == 1000
    assert sampler_timesteps(LDM, "ddim", 4) == uniform_timesteps(1000, 4) and model_calls(LDM, "ddim") == 50
    assert sampler_timesteps(LDM, "dpmpp_2m", 20) == karras_timesteps(LDM, 20)
    assert model_calls(LDM, "heun", 20) == 39 and model_calls(LDM, "euler", 50) == 49  # two sigmas merged
    assert sampler_timesteps(LDM, "euler", [500, 20, 0]) == [500, 20, 0] and model_calls(LDM, "heun", [9, 0]) == 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clip_x0(sampler, sched):
    """A model that always says x0 = 10, clipped to 1: the sample is 1. The deterministic samplers must also move x_t
    consistently with the clipped x0, along x_t = a_t 1 + b_t eps with one fixed eps: (x_t - a_t) / b_t stays put."""
    states = []
    x = run(sampler, lambda x, t, c: torch.full_like(x, 10.0), 8, sched, steps=5 if sampler != "ddpm" else None,
            prediction="x0", clip_x0=1.0, callback=lambda i, t, x_t, x0_hat: states.append((t, x_t.clone())))
    torch.testing.assert_close(x, torch.ones(8, 2))
    if sampler != "ddpm":
        eps = [(x_t - sched.sqrt_alpha_bar[t]) / sched.sqrt_one_minus_alpha_bar[t] for t, x_t in states]
        for e in eps[1:]:
            torch.testing.assert_close(e.float(), eps[0].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_zero_terminal_snr_with_v_prediction_for_every_sampler(sampler):
    z = NoiseSchedule.from_name("linear", 200, zero_terminal_snr=True)
    n = 2000
    x = run(sampler, GAUSS.model(z, "v"), n, z, prediction="v", steps=None if sampler == "ddpm" else 50)
    assert torch.isfinite(x).all()
    assert ((x.double().mean(0) - GAUSS.mean).abs() < 5 * (GAUSS.cov.diagonal() / n).sqrt()).all()


def test_sample_errors(sched):
    model = GAUSS.model(sched)

    def bad(match, **kwargs):
        with pytest.raises(ValueError, match=match):
            sample(model, (4, 2), sched, **kwargs)

    bad(r"unknown sampler 'dpm'; choose one of \('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m'\)", sampler="dpm")
    for sampler in SAMPLERS:  # a step count the schedule cannot provide: none, more than T, not an integer
        for steps in (0, -3, 201, 2.5, 20.0, True, "50"):
            bad(r"steps must be an int from 1 to T=200 \(the schedule's number of timesteps\), got", sampler=sampler,
                steps=steps)
        # guidance below 1 is not guidance (check_guidance's docstring): an error naming the fix, before any work
        for scale in (0.5, 0.0, -2.0, float("nan"), "3", None):
            bad(r"guidance_scale must be a number >= 1 \(1 = no guidance.*pass the empty caption", sampler=sampler,
                guidance_scale=scale, context=torch.zeros(4, 1), uncond_context=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        ddpm_sample(model, (4, 2), sched, guidance_scale=0.9)
    with pytest.raises(ValueError, match="unknown sampler 'DDIM'"):
        model_calls(sched, "DDIM", 20)
    bad("strictly decreasing integers in", sampler="euler", steps=[0, 50, 199])
    bad("strictly decreasing integers in", sampler="ddim", steps=[250, 0])
    bad("strictly decreasing integers in", sampler="ddim", steps=[])
    bad(r"eta=0.5 only applies to sampler='ddim'", sampler="heun", eta=0.5)
    bad(r"eta must lie in \[0, 1\]", sampler="ddim", eta=1.5)
    bad("unknown prediction type 'noise'", sampler="euler", prediction="noise")
    with pytest.raises(ValueError, match="shape must be"):
        sample(model, (4,), sched, "dpmpp_2m")
    with pytest.raises(ValueError, match="needs both a context and an uncond_context"):
        sample(model, (4, 2), sched, "heun", steps=3, context=torch.zeros(4, 1), guidance_scale=3.0)
    z = NoiseSchedule.from_name("linear", 200, zero_terminal_snr=True)
    for sampler in ("euler", "heun"):
        with pytest.raises(ValueError, match="zero terminal SNR"):
            sample(GAUSS.model(z, "v"), (4, 2), z, sampler, prediction="v")
    with pytest.raises(ValueError, match="train with prediction='v'"):
        sample(GAUSS.model(z), (4, 2), z, "ddim")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", SAMPLERS[1:])
def test_samplers_never_make_the_cpu_wait_for_the_gpu(sampler):
    """As for DDPM: under sync-debug mode "error" any host-device synchronisation in a step raises."""
    sched = NoiseSchedule.from_name("linear", 200).to("cuda")
    model = oracle(sched, MU, S, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sample(model, (N, 2), sched, sampler, generator=generator, device="cuda",
                   eta=0.5 if sampler == "ddim" else 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ((x.mean(0).cpu() - MU).abs() < 5 * S.max() / math.sqrt(N)).all()
