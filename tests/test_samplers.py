"""DDPM ancestral sampling, checked with the exact denoiser of a Gaussian data set."""

import math

import pytest
import torch

from minildm.samplers import Snapshot, ddpm_sample, model_output
from minildm.schedules import NoiseSchedule

MU, S = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
N = 4000


def oracle(schedule, mu, s, prediction="eps", device="cpu"):
    """The exact denoiser for x0 ~ N(mu, diag(s^2)): E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), etc."""
    alpha_bar, mu, s = schedule.alpha_bar.to(device), mu.to(device), s.to(device)

    def model(x_t, t, context=None):
        ab = alpha_bar[t].to(x_t.dtype)[:, None]  # (B, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        denom = ab * s**2 + b**2
        eps = b * (x_t - a * mu) / denom
        x0 = mu + a * s**2 * (x_t - a * mu) / denom
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return model


def exact_moments(schedule, mu, s, variance="beta_tilde"):
    """Mean and variance of DDPM samples with the oracle: every step is linear-Gaussian in x_t, so
    m <- c0 (mu + k (m - a mu)) + ct m and V <- (c0 k + ct)^2 V + sigma^2, from m = 0, V = 1 (float64)."""
    mu, s = mu.double(), s.double()
    m, V = torch.zeros_like(mu), torch.ones_like(mu)
    noise_var = schedule.posterior_variance if variance == "beta_tilde" else schedule.betas
    for i in reversed(range(schedule.T)):
        ab = schedule.alpha_bar[i]
        a = ab.sqrt()
        k = a * s**2 / (ab * s**2 + 1 - ab)  # E[x0 | x_t] = mu + k (x_t - a mu)
        c0, ct = schedule.posterior_mean_coef_x0[i], schedule.posterior_mean_coef_xt[i]
        m = c0 * (mu + k * (m - a * mu)) + ct * m
        V = (c0 * k + ct) ** 2 * V + (noise_var[i] if i > 0 else 0.0)
    return m, V


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
    # beta_tilde noise slightly under-disperses at T=200 (exact_moments: std 0.483 for 0.5, 0.979 for 1.0)
    torch.testing.assert_close(std, S, rtol=0.04 + 5 / math.sqrt(2 * N), atol=0)


def test_ddpm_moments_match_the_exact_recursion(sched, samples):
    m, V = exact_moments(sched, MU, S)
    mean_se, var_se = (V / N).sqrt(), V * math.sqrt(2 / (N - 1))
    assert ((samples.mean(0).double() - m).abs() < 5 * mean_se).all()
    assert ((samples.var(0).double() - V).abs() < 5 * var_se).all()
    assert (V.sqrt() / S.double() - 1).abs().max() < 0.04  # the bias the previous test allows for


def test_beta_variance_is_exact_for_unit_variance_data(sched):
    """With sigma_t^2 = beta_t the reverse step is exact for x0 ~ N(mu, I) (Ho et al. Sec. 3.2)."""
    s = torch.ones(2)
    m, V = exact_moments(sched, MU, s, variance="beta")
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
    m, V = exact_moments(sched, MU, S)
    assert (x.mean(0).cpu().double() - m).abs().max() < 5 * V.sqrt().max() / math.sqrt(N)
