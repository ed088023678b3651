"""Checkers for exercise 05 (the training objective): the target of each prediction type, the
conversion of a network output back to (x0, eps), min-SNR-gamma weights and the loss of LDM eq. (1).
References: minildm.diffusion, with tables from minildm.schedules.NoiseSchedule."""

from __future__ import annotations

import torch
from torch import nn

from minildm import diffusion as ref
from minildm.checks import (
    ExerciseError,
    expect_loss_gradients,
    expect_tensor,
    expect_value_error,
    known_mistake,
    passed,
    run,
    written_here,
)
from minildm.schedules import NoiseSchedule


def _expect_value_error(fn, name: str, *args) -> None:
    """An unknown prediction type must raise ValueError."""
    expect_value_error(fn, name, "prediction='score'", *args, why=f"names the valid choices {ref.PREDICTIONS}")


def _batch(seed: int, T: int = 1000):
    """A schedule, data, noise and one timestep per sample (first and last steps included)."""
    schedule = NoiseSchedule.from_name("scaled_linear", T)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, T - 1, *torch.randint(1, T - 1, (2,), generator=g).tolist()])
    return schedule, x0, eps, t


def check_training_target(fn) -> None:
    """fn(prediction, x0, eps, alpha_bar_t (B, 1, 1, 1)) -> eps, x0 or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    name = "training_target"
    written_here(fn, name)
    for seed in (0, 1):
        schedule, x0, eps, t = _batch(seed)
        ab = schedule.at("alpha_bar", t, x0)  # (B, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        for prediction in ref.PREDICTIONS:
            case = f"prediction={prediction!r}, t={t.tolist()}"
            got = run(fn, name, case, prediction, x0, eps, ab)
            if prediction == "v":
                known_mistake(got, {
                    "the sign of v is flipped: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.": b * x0 - a * eps,
                    "the coefficients of v are swapped: eps is scaled by sqrt(alpha_bar), x0 by "
                    "sqrt(1 - alpha_bar).": b * eps - a * x0,
                    "the square roots are missing: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.":
                        ab * eps - (1 - ab) * x0,
                }, name, case)
            expect_tensor(got, ref.training_target(prediction, x0, eps, t, schedule), name, case)
    _expect_value_error(fn, name, "score", x0, eps, ab)
    passed(name, "eps, x0 and v = sqrt(ab) eps - sqrt(1 - ab) x0 per sample; unknown types raise ValueError")


def _inversion_mistakes(prediction: str, out, x_t, ab) -> tuple[dict, dict]:
    """Typical wrong ways to solve x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (and v's definition) for (x0, eps):
    ({message: wrong x0_hat}, {message: wrong eps_hat})."""
    a, b = ab.sqrt(), (1 - ab).sqrt()
    roots = "the square roots are missing: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."
    if prediction == "eps":  # x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
        return {roots: (x_t - (1 - ab) * out) / ab,
                "the two coefficients are swapped: x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar).":
                    (x_t - a * out) / b,
                "the noise must be subtracted from x_t, not added.": (x_t + b * out) / a}, {}
    if prediction == "x0":  # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        return {}, {roots: (x_t - ab * out) / (1 - ab),
                    "the two coefficients are swapped: eps_hat = (x_t - sqrt(alpha_bar) x0_hat) / "
                    "sqrt(1 - alpha_bar).": (x_t - b * out) / a}
    if prediction == "v":  # x0 = sqrt(ab) x_t - sqrt(1 - ab) v, eps = sqrt(1 - ab) x_t + sqrt(ab) v
        sign = "the sign of v is flipped: x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."
        swap = "the coefficients are swapped: x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."
        return ({sign: a * x_t + b * out, swap: b * x_t - a * out},
                {"the sign of v is flipped: eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v.": b * x_t - a * out,
                 "the coefficients are swapped: eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v.": a * x_t + b * out})
    return {}, {}


def check_to_x0_and_eps(fn) -> None:
    """fn(prediction, model_output, x_t, alpha_bar_t) -> (x0_hat, eps_hat), as the samplers need them."""
    name = "to_x0_and_eps"
    written_here(fn, name)
    for seed in (0, 1):
        schedule, x0, eps, t = _batch(seed)
        ab = schedule.at("alpha_bar", t, x0)
        x_t = schedule.q_sample(x0, t, eps)
        g = torch.Generator().manual_seed(seed + 10)
        for prediction in ref.PREDICTIONS:
            # Round trip: the exact target must give back the x0 and eps that made x_t.
            target = ref.training_target(prediction, x0, eps, t, schedule)
            case = f"prediction={prediction!r}, output = the exact target, t={t.tolist()}"
            got = run(fn, name, case, prediction, target, x_t, ab)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise ExerciseError(f"{name} ({case}): return a tuple (x0_hat, eps_hat), got {type(got).__name__}"
                                    + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "") + ".")
            for i, which in ((0, "x0_hat"), (1, "eps_hat")):
                known_mistake(got[i], _inversion_mistakes(prediction, target, x_t, ab)[i], name, f"{case}, {which}")
            expect_tensor(got[0], x0, name, case + ": x0_hat must be the x0 that made x_t", atol=2e-4)
            expect_tensor(got[1], eps, name, case + ": eps_hat must be the noise that made x_t", atol=2e-4)
            # Any other output: compare with the package.
            output = torch.randn(x0.shape, generator=g)
            case = f"prediction={prediction!r}, a random network output, t={t.tolist()}"
            got = run(fn, name, case, prediction, output, x_t, ab)
            want = ref.to_x0_and_eps(output, x_t, t, schedule, prediction)
            expect_tensor(got[0], want[0], name, case + ", x0_hat", atol=1e-4)
            expect_tensor(got[1], want[1], name, case + ", eps_hat", atol=1e-4)
    _expect_value_error(fn, name, "score", output, x_t, ab)
    passed(name, "(x0, eps) recovered exactly from each target; matches minildm.diffusion.to_x0_and_eps")


def check_min_snr_weight(fn) -> None:
    """fn(snr (B,), gamma, prediction) -> (B,) min-SNR-gamma weights for that target (Hang et al. 2023)."""
    name = "min_snr_weight"
    written_here(fn, name)
    snr = NoiseSchedule.from_name("cosine", 20).snr[[0, 3, 8, 12, 19]].float()  # from about 6e3 down to 3e-7
    for gamma in (5.0, 1.0):
        for prediction in ref.PREDICTIONS:
            case = f"prediction={prediction!r}, gamma={gamma}, SNR={[f'{s:.3g}' for s in snr.tolist()]}"
            got = run(fn, name, case, snr, gamma, prediction)
            x0_weight = snr.clamp(max=gamma)
            mistakes = {"this is max(SNR, gamma); min-SNR caps the weight: min(SNR, gamma).": snr.clamp(min=gamma)}
            if prediction != "x0":
                mistakes[f"this is min(SNR, gamma), the weight for x0-prediction; for {prediction!r} divide it by "
                         f"the factor between the errors ({'SNR' if prediction == 'eps' else 'SNR + 1'})."] = x0_weight
            if prediction == "v":
                mistakes["this is the eps weight min(SNR, gamma) / SNR; v's error is (SNR + 1) times the x0 error: "
                         "divide by SNR + 1."] = (gamma / snr).clamp(max=1)
            if prediction == "eps":
                mistakes["this is the v weight min(SNR, gamma) / (SNR + 1); eps's error is SNR times the x0 "
                         "error: divide by SNR."] = x0_weight / (snr + 1)
                mistakes["gamma / SNR without the cap at 1: the eps weight is min(SNR, gamma) / SNR = "
                         "min(1, gamma / SNR)."] = gamma / snr
            want = ref.min_snr_weight(snr, gamma, prediction)
            known_mistake(got, mistakes, name, case, want)
            expect_tensor(got, want, name, case)
    zero = torch.tensor([0.0, 1.0])
    got = run(fn, name, "eps at SNR = 0", zero, 5.0, "eps")
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        raise ExerciseError(f"{name} (prediction='eps' at SNR = 0, the last step of a zero-terminal-SNR schedule): "
                            "got NaN; min(SNR, gamma) / SNR is 0/0 there. Write it as min(1, gamma / SNR), "
                            "e.g. (gamma / snr).clamp(max=1), which is 1 at SNR = 0.")
    expect_tensor(got, torch.tensor([1.0, 1.0]), name, "prediction='eps', gamma=5 at SNR 0 and 1: weight 1")
    _expect_value_error(fn, name, snr, 5.0, "score")
    passed(name, "min(SNR, gamma) in x0 units, divided by SNR (eps) or SNR + 1 (v); finite at SNR = 0")


class _ProbeModel(nn.Module):
    """A small deterministic 'denoiser' that depends on x_t and t and remembers what it was given."""

    def __init__(self, channels: int, T: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG is untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.T = T
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, context=None):
        self.inputs.append((x_t.detach().clone(), torch.as_tensor(t).clone()))
        return self.conv(x_t) * (1 + torch.as_tensor(t, dtype=x_t.dtype) / self.T).view(-1, 1, 1, 1)


def check_diffusion_loss(fn) -> None:
    """fn(model, x0, t, noise, schedule, prediction) -> scalar mean squared error of LDM eq. (1)."""
    name = "diffusion_loss"
    written_here(fn, name)
    T = 100
    schedule = NoiseSchedule.from_name("cosine", T)
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for seed, prediction in enumerate(ref.PREDICTIONS):
        case = f"prediction={prediction!r}"
        # The reference draws t, then the noise, from its generator: draw the same ones here.
        g = torch.Generator().manual_seed(seed)
        t = schedule.sample_timesteps(4, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        reference_model = _ProbeModel(3, T)
        want, logs = ref.diffusion_loss(reference_model, x0, schedule, prediction,
                                        generator=torch.Generator().manual_seed(seed))
        if not torch.equal(logs["t"], t):
            raise RuntimeError("checker out of sync with minildm.diffusion.diffusion_loss (it draws t differently)")
        model = _ProbeModel(3, T)
        got = run(fn, name, case, model, x0, t, noise, schedule, prediction)
        if not model.inputs:
            raise ExerciseError(f"{name} ({case}): the model was never called; compute output = model(x_t, t).")
        x_t, t_seen = model.inputs[-1]
        expect_tensor(t_seen, t, name, case + ": the timesteps given to the model")
        expect_tensor(x_t, schedule.q_sample(x0, t, noise), name,
                      case + ": the model's input must be x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise")
        if isinstance(got, torch.Tensor) and got.ndim != 0:
            raise ExerciseError(f"{name} ({case}): expected one number (a 0-dim tensor), got shape "
                                f"{tuple(got.shape)}: average over the batch and over every element.")
        with torch.no_grad():  # the same probe model's output, for the typical wrong losses
            out = _ProbeModel(3, T)(schedule.q_sample(x0, t, noise), t)
            target = ref.training_target(prediction, x0, noise, t, schedule)
            other = {"eps": x0, "x0": noise, "v": noise}[prediction]
            known_mistake(got, {
                "the loss is summed; eq. (1) is an expectation: take the mean over the batch and every element.":
                    (out - target).pow(2).sum(),
                "the mean over the batch of per-image sums; take the mean over every element as well.":
                    (out - target).pow(2).flatten(1).sum(1).mean(),
                f"the target is wrong for prediction={prediction!r}: use training_target (the "
                f"{'noise' if prediction == 'eps' else 'clean data' if prediction == 'x0' else 'velocity v'}), "
                "not that one.": (out - other).pow(2).mean(),
                "that is the mean absolute error; eq. (1) squares the error.": (out - target).abs().mean(),
            }, name, case)
        expect_tensor(got, want.detach(), name, case + ": the loss value")
        expect_loss_gradients(got, want, model, reference_model, name, case)
    passed(name, "model sees x_t and t, loss = mean squared error to the target, gradients reach the model")
