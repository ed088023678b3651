"""Prediction targets, the diffusion loss (checked against the exact denoiser of Gaussian data), EMA."""

import io
import math

import pytest
import torch
from torch import nn

from minildm.diffusion import (
    diffusion_loss,
    eps_from_v,
    min_snr_weight,
    predict_eps_from_x0,
    predict_x0_from_eps,
    to_x0_and_eps,
    training_target,
    v_target,
    x0_from_v,
)
from minildm.ema import EMA
from minildm.schedules import NoiseSchedule


def gaussian_posterior(schedule, x_t, t, mu, s):
    """For x0 ~ N(mu, diag(s^2)): exact E[x0 | x_t], E[eps | x_t] and Var(x0 | x_t), per dimension."""
    ab = schedule.alpha_bar.to(x_t.device)[t].to(x_t.dtype)[:, None]  # (B, 1) for 2-d data
    a, b2 = ab.sqrt(), 1 - ab
    denom = ab * s**2 + b2  # Var(x_t) per dimension
    eps = b2.sqrt() * (x_t - a * mu) / denom
    x0 = mu + a * s**2 * (x_t - a * mu) / denom
    var_x0 = s**2 * b2 / denom  # then Var(eps | x_t) = SNR var_x0 and Var(v | x_t) = (SNR + 1) var_x0
    return x0, eps, var_x0


def oracle(schedule, mu, s, prediction):
    def model(x_t, t, context=None):
        x0, eps, _ = gaussian_posterior(schedule, x_t, t, mu, s)
        ab = schedule.alpha_bar.to(x_t.device)[t].to(x_t.dtype)[:, None]
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]

    return model


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("cosine", 400)


def test_conversions_round_trip(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 250, 398, 399])
    x_t = sched.q_sample(x0, t, eps)
    close = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(predict_x0_from_eps(x_t, t, eps, sched), x0, **close)
    torch.testing.assert_close(predict_eps_from_x0(x_t, t, x0, sched), eps, **close)
    v = v_target(x0, eps, t, sched)
    torch.testing.assert_close(x0_from_v(x_t, t, v, sched), x0, **close)
    torch.testing.assert_close(eps_from_v(x_t, t, v, sched), eps, **close)
    for prediction in ("eps", "x0", "v"):
        target = training_target(prediction, x0, eps, t, sched)
        x0_hat, eps_hat = to_x0_and_eps(target, x_t, t, sched, prediction)
        torch.testing.assert_close(x0_hat, x0, **close)
        torch.testing.assert_close(eps_hat, eps, **close)
    assert training_target("eps", x0, eps, t, sched) is eps and training_target("x0", x0, eps, t, sched) is x0


def test_v_definition(sched):
    x0, eps = torch.ones(2, 1, dtype=torch.float64), torch.full((2, 1), 2.0, dtype=torch.float64)
    t = torch.tensor([7, 300])
    a, b = sched.alpha_bar[t].sqrt(), (1 - sched.alpha_bar[t]).sqrt()
    torch.testing.assert_close(v_target(x0, eps, t, sched).flatten(), 2 * a - b)


def test_errors_scale_with_snr_as_min_snr_assumes(sched):
    """||eps err||^2 = SNR ||x0 err||^2, ||v err||^2 = (SNR+1) ||x0 err||^2: the basis of min_snr_weight."""
    g = torch.Generator().manual_seed(1)
    x_t, x0, wrong_x0 = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 50, 150, 300, 390])
    snr = sched.snr[t]
    err_x0 = (x0 - wrong_x0).pow(2).sum(1)
    eps, wrong_eps = predict_eps_from_x0(x_t, t, x0, sched), predict_eps_from_x0(x_t, t, wrong_x0, sched)
    err_eps = (eps - wrong_eps).pow(2).sum(1)
    v_true, v_wrong = v_target(x0, eps, t, sched), v_target(wrong_x0, wrong_eps, t, sched)
    torch.testing.assert_close(err_eps, snr * err_x0)
    torch.testing.assert_close((v_true - v_wrong).pow(2).sum(1), (snr + 1) * err_x0)


def test_min_snr_weights_hand_values():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0], dtype=torch.float64)

    def check(got, want):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))

    check(min_snr_weight(snr, 5.0, "eps"), [1.0, 1.0, 1.0, 0.25])
    check(min_snr_weight(snr, 5.0, "x0"), [0.0, 0.5, 5.0, 5.0])
    check(min_snr_weight(snr, 5.0, "v"), [0.0, 0.5 / 1.5, 5 / 6, 5 / 21])
    check(min_snr_weight(snr[1:], 1.0, "eps"), [1.0, 0.2, 0.05])


def test_eps_prediction_refused_where_alpha_bar_is_zero():
    z = NoiseSchedule.from_name("linear", 100, zero_terminal_snr=True)
    x_t, t = torch.randn(2, 3), torch.tensor([10, 99])
    with pytest.raises(ValueError, match="prediction='v'"):
        to_x0_and_eps(torch.zeros(2, 3), x_t, t, z, "eps")
    x0_hat, eps_hat = to_x0_and_eps(torch.ones(2, 3), x_t, t, z, "v")
    torch.testing.assert_close(x0_hat[1], -torch.ones(3))  # at SNR 0: x0 = -v, eps = x_t
    torch.testing.assert_close(eps_hat[1], x_t[1])


MU, S = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", [None, "min_snr"])
def test_loss_of_exact_denoiser_matches_closed_form(sched, prediction, weighting):
    """The exact posterior mean's expected loss at t is the target's posterior variance, per dimension."""
    n, g = 20_000, torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(n, 2, generator=g)
    model = oracle(sched, MU, S, prediction)
    loss, logs = diffusion_loss(model, x0, sched, prediction, weighting, generator=g)
    t, mse = logs["t"], logs["mse_per_sample"]
    _, _, var_x0 = gaussian_posterior(sched, torch.zeros(n, 2), t, MU, S)
    snr = sched.snr[t].float()
    factor = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    expected_mse = factor * var_x0.mean(1)  # E[mse | t]   (B,)
    weight = torch.ones_like(snr) if weighting is None else min_snr_weight(snr, 5.0, prediction)
    expected = (weight * expected_mse).mean()
    se = (weight * (mse - expected_mse)).std() / math.sqrt(n)  # Monte-Carlo standard error given t
    assert abs(loss.item() - expected.item()) < 5 * se.item()
    assert logs["mse"].item() == pytest.approx(mse.mean().item())
    # a wrong model does worse: the zero predictor's eps-loss is E||eps||^2 = 1 per dimension
    if prediction == "eps" and weighting is None:
        zero_loss, _ = diffusion_loss(lambda x, t, c: torch.zeros_like(x), x0, sched, "eps", generator=g)
        assert zero_loss.item() == pytest.approx(1.0, abs=0.03) and loss.item() < 0.6 * zero_loss.item()


def test_min_snr_loss_is_the_same_for_every_target(sched):
    """Min-SNR-gamma weights the x0-space error by min(SNR, gamma) whatever the network predicts, so the same
    denoiser written as an eps-, x0- or v-model (same t and noise) gets exactly the same weighted loss."""
    x0 = MU + S * torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
    def loss(prediction, weighting):
        model, g = oracle(sched, MU, S, prediction), torch.Generator().manual_seed(4)
        return diffusion_loss(model, x0, sched, prediction, weighting, generator=g)[0].item()

    losses = [loss(p, "min_snr") for p in ("eps", "x0", "v")]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-4)
    plain = [loss(p, None) for p in ("eps", "x0", "v")]
    assert max(plain) - min(plain) > 0.05  # without weighting the three targets weight the steps differently


def test_loss_calls_model_with_xt_t_context_and_backpropagates(sched):
    seen = {}
    net = nn.Linear(3, 3)

    def model(x, t, context):
        seen.update(t=t, context=context, x=x)
        return net(x)

    x0, ctx = torch.randn(8, 3), torch.randn(8, 5, 4)
    g = torch.Generator().manual_seed(0)
    loss, _ = diffusion_loss(model, x0, sched, "v", context=ctx, generator=g)
    loss.backward()
    assert seen["context"] is ctx and seen["t"].dtype == torch.int64 and seen["t"].shape == (8,)
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    # the same generator state reproduces t, eps and x_t exactly
    g2 = torch.Generator().manual_seed(0)
    t = sched.sample_timesteps(8, generator=g2)
    eps = torch.randn(8, 3, generator=g2)
    torch.testing.assert_close(seen["x"], sched.q_sample(x0, t, eps))
    torch.testing.assert_close(loss, (net(seen["x"]) - v_target(x0, eps, t, sched)).pow(2).mean())


def test_loss_errors(sched):
    x0 = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'"):
        diffusion_loss(lambda x, t, c: x, x0, sched, prediction="epsilon")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        diffusion_loss(lambda x, t, c: x, x0, sched, weighting="snr")
    with pytest.raises(ValueError, match=r"model returned shape \(4, 2\)"):
        diffusion_loss(lambda x, t, c: x[:, :2], x0, sched)
    with pytest.raises(ValueError, match="unknown prediction type"):
        min_snr_weight(torch.ones(2), prediction="score")


# ---- EMA -----------------------------------------------------------------------------------------------


def _set(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_ema_update_formula_and_copy_to():
    net = nn.Linear(2, 2)
    _set(net, 1.0)
    ema = EMA(net, decay=0.9, warmup=False)
    _set(net, 3.0)
    ema.update(net)  # 0.9 * 1 + 0.1 * 3 = 1.2
    _set(net, -1.0)
    ema.update(net)  # 0.9 * 1.2 + 0.1 * (-1) = 0.98
    for v in ema.shadow.values():
        torch.testing.assert_close(v, torch.full_like(v, 0.98))
    with ema.applied(net):
        assert torch.allclose(net.weight, torch.tensor(0.98))
    assert torch.equal(net.weight, torch.full((2, 2), -1.0))  # restored
    ema.copy_to(net)
    assert torch.allclose(net.bias, torch.tensor(0.98))


def test_ema_warmup_decay_and_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.4)
    assert ema.next_decay() == pytest.approx(2 / 11)
    _set(net, 0.0)
    w0 = ema.shadow["0.weight"].clone()
    net.train()
    net(torch.randn(16, 2) + 4)  # changes BatchNorm's running stats
    ema.update(net)  # d = 2/11
    torch.testing.assert_close(ema.shadow["0.weight"], w0 * 2 / 11)
    torch.testing.assert_close(ema.buffers["1.running_mean"], net[1].running_mean)
    decays = []
    for _ in range(5):
        decays.append(ema.next_decay())
        ema.update(net)
    assert decays == pytest.approx([3 / 12, 4 / 13, 5 / 14, 0.4, 0.4])  # (1+n)/(10+n) until it reaches 0.4


def test_ema_state_dict_round_trip_and_mismatch():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.99)
    for _ in range(3):
        _set(net, torch.rand(()).item())
        ema.update(net)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(nn.Linear(3, 2), decay=0.5, warmup=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.num_updates == 3 and other.decay == 0.99 and other.warmup
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])
    with pytest.raises(ValueError, match="another model"):
        ema.update(nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(3, 2, bias=False)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(net, decay=1.5)
