"""Noise schedules and q(x_t | x_0): closed forms, statistics, errors."""

import math

import numpy as np
import pytest
import torch

from minildm.schedules import (
    BETA_SCHEDULES,
    NoiseSchedule,
    alpha_bar_from_betas,
    cosine_betas,
    linear_betas,
    make_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sigmoid_betas,
)


def test_linear_betas_endpoints_and_monotone():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert (b.diff() > 0).all()
    torch.testing.assert_close(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = scaled_linear_betas(1000)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.012, rel=1e-12)
    step = (0.012**0.5 - 0.00085**0.5) / 999
    torch.testing.assert_close(b.sqrt().diff(), torch.full((999,), step, dtype=torch.float64))


def test_cosine_alpha_bar_matches_closed_form_except_clipped_steps():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s=s)
    clipped = betas >= 0.999
    assert clipped.tolist() == [False] * (T - 1) + [True]  # only the last step (f(1) = 0) is clipped

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_from_betas(betas)[:-1], expected[:-1], rtol=1e-10, atol=1e-13)


def test_sigmoid_matches_its_formula_and_is_monotone():
    T, start, end, tau = 500, -3.0, 3.0, 0.7
    ab = alpha_bar_from_betas(sigmoid_betas(T, start, end, tau))

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def g(u):
        return (sig(end / tau) - sig((start + u * (end - start)) / tau)) / (sig(end / tau) - sig(start / tau))

    expected = torch.tensor([g((t + 1) / T) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(ab[:-1], expected, rtol=1e-9, atol=1e-12)
    assert (ab.diff() < 0).all() and (ab > 0).all() and (ab < 1).all()


def test_make_betas_names_and_rescaling_for_other_T():
    assert sorted(BETA_SCHEDULES) == ["cosine", "linear", "scaled_linear", "sigmoid"]
    torch.testing.assert_close(make_betas("linear", 1000), linear_betas(1000))
    torch.testing.assert_close(make_betas("scaled_linear", 1000), scaled_linear_betas(1000))
    b200 = make_betas("linear", 200)  # endpoints x 1000/200: the total noise added stays the same
    assert b200[0].item() == pytest.approx(5e-4) and b200[-1].item() == pytest.approx(0.1)
    assert b200.sum().item() == pytest.approx(linear_betas(1000).sum().item(), rel=1e-9)
    with pytest.raises(ValueError, match=r"unknown noise schedule 'quadratic'.*cosine.*linear.*sigmoid"):
        make_betas("quadratic", 100)
    with pytest.raises(ValueError, match="T >= 21"):
        make_betas("linear", 10)


def test_zero_terminal_snr_rescaling():
    old = make_betas("scaled_linear", 1000)
    new = rescale_zero_terminal_snr(old)
    ab_old, ab_new = alpha_bar_from_betas(old), alpha_bar_from_betas(new)
    assert ab_new[-1].item() == 0.0 and new[-1].item() == pytest.approx(1.0)
    assert ab_new[0].item() == pytest.approx(ab_old[0].item(), rel=1e-12)
    # Algorithm 1 is affine in sqrt(alpha_bar): new = (old - old_last) * old_first / (old_first - old_last)
    r_old = ab_old.sqrt()
    expected = (r_old - r_old[-1]) * r_old[0] / (r_old[0] - r_old[-1])
    torch.testing.assert_close(ab_new.sqrt(), expected, rtol=1e-10, atol=1e-12)
    sched = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    assert sched.snr[-1].item() == 0.0 and (sched.snr.diff() < 0).all()
    assert math.isinf(sched.sigmas[-1].item()) and sched.log_snr[-1].item() == -math.inf


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_schedule_tables(name):
    s = NoiseSchedule.from_name(name, T=300)
    ab, ab_prev, alphas = s.alpha_bar, s.alpha_bar_prev, s.alphas
    torch.testing.assert_close(ab, torch.cumprod(1 - s.betas, 0))
    assert (ab.diff() < 0).all() and (ab > 0).all() and (ab < 1).all()
    torch.testing.assert_close(s.snr, ab / (1 - ab))
    torch.testing.assert_close(s.log_snr, s.snr.log())
    torch.testing.assert_close(s.sigmas, ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(s.posterior_variance, s.betas * (1 - ab_prev) / (1 - ab))
    # The posterior by plain Gaussian conditioning: given x0, x_{t-1} has variance P = 1 - ab_{t-1},
    # Cov(x_{t-1}, x_t) = sqrt(alpha_t) P, Var(x_t) = 1 - ab_t.
    P = 1 - ab_prev
    gain = alphas.sqrt() * P / (1 - ab)
    torch.testing.assert_close(s.posterior_mean_coef_xt, gain)
    torch.testing.assert_close(s.posterior_mean_coef_x0, ab_prev.sqrt() - gain * ab.sqrt())
    torch.testing.assert_close(s.posterior_variance, P - gain * alphas.sqrt() * P)
    assert s.posterior_variance[0].item() == 0.0 and s.posterior_mean_coef_x0[0].item() == pytest.approx(1.0)


def test_lookup_shapes_and_dtypes():
    s = NoiseSchedule.from_name("cosine", 100)
    t = torch.tensor([0, 5, 99])
    x32, x64 = torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    v32, v64 = s.at("alpha_bar", t, x32), s.at("alpha_bar", t, x64)
    assert v32.shape == (3, 1, 1, 1) and v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert torch.equal(v64.flatten(), s.alpha_bar[t]) and torch.equal(v32.flatten(), s.alpha_bar[t].float())
    assert torch.equal(s.at("snr", 7, x32).flatten(), s.snr[[7, 7, 7]].float())  # an int broadcasts
    assert torch.equal(s.at("snr", np.int64(7), x32), s.at("snr", torch.tensor(7), x32))
    assert s.to("cpu") is s


def test_q_sample_formula():
    s = NoiseSchedule.from_name("linear", 50)
    x0, noise, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0, 10, 20, 49])
    a, b = s.alpha_bar[t].sqrt().float(), (1 - s.alpha_bar[t]).sqrt().float()
    expected = a[:, None, None, None] * x0 + b[:, None, None, None] * noise
    torch.testing.assert_close(s.q_sample(x0, t, noise), expected)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_statistics(t):
    s, c, n = NoiseSchedule.from_name("scaled_linear", 1000), 1.5, 50_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1, 1, 1), c, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = s.q_sample(x0, torch.full((n,), t), noise).flatten()
    ab = s.alpha_bar[t].item()
    mean_se = math.sqrt((1 - ab) / n)  # standard error of the sample mean
    var_se = (1 - ab) * math.sqrt(2 / (n - 1))  # standard error of the sample variance (Gaussian)
    assert abs(xt.mean().item() - math.sqrt(ab) * c) < 5 * mean_se
    assert abs(xt.var().item() - (1 - ab)) < 5 * var_se


def test_sample_timesteps():
    s = NoiseSchedule.from_name("cosine", 20)
    t = s.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (4000,)
    assert set(t.tolist()) == set(range(20))
    t2 = s.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def test_timestep_errors():
    s = NoiseSchedule.from_name("scaled_linear", 1000)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"timestep 1000 out of range: this schedule has T=1000 steps, "
                                         r"valid t are 0\.\.999"):
        s.q_sample(x, torch.tensor([3, 1000]), x)
    with pytest.raises(ValueError, match="timestep -1 out of range"):
        s.at("snr", torch.tensor([-1, 0]), x)
    for bad in (-1, 1000):  # a Python int takes the sampler's path (a view of the table) and is checked too
        with pytest.raises(ValueError, match=f"timestep {bad} out of range"):
            s.at("snr", bad, x)
    with pytest.raises(ValueError, match=r"must be integers.*float32"):
        s.at("snr", torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\)"):
        s.at("snr", torch.tensor([0, 1, 2]), x)
    with pytest.raises(TypeError, match="int or an integer tensor"):
        s.at("snr", 3.0, x)
    with pytest.raises(ValueError, match="unknown schedule table 'alphabar'"):
        s.at("alphabar", 0, x)
    with pytest.raises(ValueError, match="noise has shape"):
        s.q_sample(x, 0, torch.zeros(2, 4))


def test_bad_betas_rejected():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError, match="1-d"):
        NoiseSchedule(torch.ones(2, 2) * 0.1)
    with pytest.raises(ValueError, match="positive int"):
        linear_betas(0)
