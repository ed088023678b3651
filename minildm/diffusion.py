"""Training objective: prediction targets, the loss of LDM eq. (1), loss weighting (course stage 5).

Given x_t = a x_0 + b eps with a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t) (so a^2 + b^2 = 1),
a network may predict one of three equivalent targets:

    "eps": the noise eps                         (Ho et al. 2020; LDM eq. 1)
    "x0":  the clean sample x_0
    "v":   v = a eps - b x_0                     (Salimans & Ho 2022, Sec. 4)

Knowing x_t and any one of them gives the other two (the functions below). The LDM loss (eq. 1) is

    L = E_{z, eps ~ N(0, I), t ~ U{0..T-1}} || eps - eps_theta(z_t, t, c) ||^2,

with z the latent of an image, c the conditioning; `diffusion_loss` computes it for any target,
optionally weighted per timestep with min-SNR-gamma (Hang et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minildm.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = (None, "min_snr")


@dataclass
class DiffusionConfig:
    """How the denoiser is trained and sampled."""

    space: str = "latent"  # "latent" (LDM) or "pixel" (the baseline)
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    prediction: str = "eps"  # "eps", "x0" or "v"
    weighting: str | None = None  # None (LDM eq. 1) or "min_snr"
    caption_drop: float = 0.1  # probability of training on the empty caption / null class (for guidance)
    condition: str = "text"  # "text" (captions), "class" (class labels) or "none" (unconditional)
    concat: str | None = None  # an image-shaped condition read by concatenation (stage 10): see applications.conditioned

    def __post_init__(self):
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"space must be 'latent' or 'pixel', got {self.space!r}")
        if not 0.0 <= self.caption_drop <= 1.0:
            raise ValueError(f"caption_drop is a probability in [0, 1], got {self.caption_drop}")
        if self.condition not in ("text", "class", "none"):
            raise ValueError(f"condition must be 'text', 'class' or 'none', got {self.condition!r}")



def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")


# ---- conversions between targets (all exact algebra on x_t = a x0 + b eps) ----------------------


def _ab(schedule: NoiseSchedule, t, like: torch.Tensor):
    """(a, b) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), shaped (B, 1, ..., 1) to broadcast with `like`."""
    return schedule.at("sqrt_alpha_bar", t, like), schedule.at("sqrt_one_minus_alpha_bar", t, like)


def predict_x0_from_eps(x_t, t, eps, schedule: NoiseSchedule) -> torch.Tensor:
    """x0 = (x_t - b eps) / a. Undefined where alpha_bar_t = 0 (zero terminal SNR)."""
    a, b = _ab(schedule, t, x_t)
    return (x_t - b * eps) / a


def predict_eps_from_x0(x_t, t, x0, schedule: NoiseSchedule) -> torch.Tensor:
    """eps = (x_t - a x0) / b."""
    a, b = _ab(schedule, t, x_t)
    return (x_t - a * x0) / b


def v_target(x0, eps, t, schedule: NoiseSchedule) -> torch.Tensor:
    """v = a eps - b x0 (Salimans & Ho 2022, Sec. 4 / Appendix D)."""
    a, b = _ab(schedule, t, x0)
    return a * eps - b * x0


def x0_from_v(x_t, t, v, schedule: NoiseSchedule) -> torch.Tensor:
    """x0 = a x_t - b v  (since a x_t - b v = (a^2 + b^2) x0)."""
    a, b = _ab(schedule, t, x_t)
    return a * x_t - b * v


def eps_from_v(x_t, t, v, schedule: NoiseSchedule) -> torch.Tensor:
    """eps = b x_t + a v  (since b x_t + a v = (a^2 + b^2) eps)."""
    a, b = _ab(schedule, t, x_t)
    return b * x_t + a * v


def to_x0_and_eps(model_output, x_t, t, schedule: NoiseSchedule, prediction: str = "eps"):
    """Turn a network output of type `prediction` into (x0_hat, eps_hat). Every sampler goes through here."""
    check_prediction(prediction)
    if model_output.shape != x_t.shape:
        raise ValueError(f"model output has shape {tuple(model_output.shape)} but x_t has {tuple(x_t.shape)}")
    if prediction == "eps":
        # Checked on the host table, so a sampler's step (t a Python int) never waits for the GPU here.
        if (schedule.alpha_bar[schedule.check_timesteps(t, x_t.shape[0]).cpu()] == 0).any():
            raise ValueError("eps-prediction cannot recover x0 at a step with alpha_bar = 0 (the last step "
                             "of a zero-terminal-SNR schedule); train with prediction='v' (Lin et al. 2024)")
        return predict_x0_from_eps(x_t, t, model_output, schedule), model_output
    if prediction == "x0":
        return model_output, predict_eps_from_x0(x_t, t, model_output, schedule)
    return x0_from_v(x_t, t, model_output, schedule), eps_from_v(x_t, t, model_output, schedule)


# ---- the loss ----------------------------------------------------------------------------------------


def training_target(prediction: str, x0, eps, t, schedule: NoiseSchedule) -> torch.Tensor:
    """What the network should output for x_t = q_sample(x0, t, eps)."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_target(x0, eps, t, schedule)


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Sec. 3.4).

    The idea is to weight the error in x0-space by min(SNR_t, gamma): high-SNR (nearly clean) steps
    stop dominating training. Errors in the other targets are multiples of the x0 error,
        ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2,   ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2,
    so the same weighting reads, per target:
        x0: min(SNR, gamma)     eps: min(SNR, gamma) / SNR     v: min(SNR, gamma) / (SNR + 1).
    """
    check_prediction(prediction)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 (not 0/0) at SNR = 0
    clipped = snr.clamp(max=gamma)
    return clipped if prediction == "x0" else clipped / (snr + 1)


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps",
                   weighting: str | None = None, context=None, generator: torch.Generator | None = None,
                   gamma: float = 5.0, t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
    """The denoising loss of LDM eq. (1) for one batch; returns (loss, logs).

    model:   any callable model(x_t, t, context) -> tensor shaped like x_t (e.g. the UNet).
    x0:      (B, ...) clean data (latents z for latent diffusion, pixels for the baseline).
    weighting: None (plain mean, eq. 1) or "min_snr" (min-SNR-gamma weights, `min_snr_weight`).
    t, eps:  the timesteps (B,) and the noise (shaped like x0), drawn here (from `generator`) when None.
    logs:    detached tensors: "loss", "mse" (unweighted), "mse_per_sample" (B,) and "t" (B,),
             enough to plot the loss against t.
    """
    check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    B = x0.shape[0]
    if t is None:
        t = schedule.sample_timesteps(B, generator=generator, device=x0.device)  # (B,)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if t.shape != (B,) or eps.shape != x0.shape:
        raise ValueError(f"t {tuple(t.shape)} and eps {tuple(eps.shape)} must have shapes {(B,)} and "
                         f"{tuple(x0.shape)} for x0 of shape {tuple(x0.shape)}")
    x_t = schedule.q_sample(x0, t, eps)
    output = model(x_t, t, context)
    if output.shape != x0.shape:
        raise ValueError(f"model returned shape {tuple(output.shape)} for inputs of shape {tuple(x0.shape)}; "
                         "a denoiser must return a tensor shaped like its input")
    target = training_target(prediction, x0, eps, t, schedule)
    mse = (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = 1.0 if weighting is None else min_snr_weight(schedule.at("snr", t, mse), gamma, prediction)
    loss = (weight * mse).mean()
    logs = {"loss": loss.detach(), "mse": mse.detach().mean(), "mse_per_sample": mse.detach(), "t": t}
    return loss, logs
