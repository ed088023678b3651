"""Checkers of exercises 02-05 (autoencoder, schedules, UNet blocks, objectives) accept a correct answer and
reject the unfilled stub and typical wrong answers with a message that says what is wrong."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minildm import autoencoder as ref
from minildm import diffusion, schedules, unet
from minildm.checks import ExerciseError
from minildm.checks import stage02 as s02
from minildm.checks import stage03 as s03
from minildm.checks import stage04 as s04
from minildm.checks import stage05 as s05


def unfilled(*args):
    raise NotImplementedError()


# ---- correct answers in the exercises' signatures, built on the package --------------------------------


def q_sample(x0, t, noise, alpha_bar):
    """Through minildm.schedules.NoiseSchedule: rebuild the betas that give this alpha_bar."""
    betas = 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return schedules.NoiseSchedule(betas).q_sample(x0, t, noise)


def split_heads(x, heads):
    if x.shape[-1] % heads:
        raise ValueError("channels not divisible by heads")
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def cross_attention(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    """minildm.unet.Attention run with the given weights."""
    with torch.random.fork_rng(devices=[]):  # building the layer draws (unused) initial weights
        layer = unet.Attention(x.shape[-1], context.shape[-1], heads, w_q.shape[0] // heads)
    weights = {"to_q.weight": w_q, "to_k.weight": w_k, "to_v.weight": w_v, "to_out.weight": w_out,
               "to_out.bias": b_out}
    return torch.func.functional_call(layer, weights, (x, context))


def training_target(prediction, x0, eps, ab):
    targets = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
    if prediction not in targets:
        raise ValueError(f"unknown prediction {prediction!r}")
    return targets[prediction]


def to_x0_and_eps(prediction, out, x_t, ab):
    a, b = ab.sqrt(), (1 - ab).sqrt()
    pairs = {"eps": lambda: ((x_t - b * out) / a, out), "x0": lambda: (out, (x_t - a * out) / b),
             "v": lambda: (a * x_t - b * out, b * x_t + a * out)}
    if prediction not in pairs:
        raise ValueError(f"unknown prediction {prediction!r}")
    return pairs[prediction]()


def diffusion_loss(model, x0, t, noise, schedule, prediction="eps"):
    target = diffusion.training_target(prediction, x0, noise, t, schedule)
    return (model(schedule.q_sample(x0, t, noise), t) - target).pow(2).mean()


# ---- typical wrong answers -------------------------------------------------------------------------


def cosine_unclipped(T, s=0.008, max_beta=0.999):
    ab = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return 1 - ab[1:] / ab[:-1]


def cosine_off_by_one(T, s=0.008, max_beta=0.999):
    ab = torch.cos((torch.arange(T, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def cosine_without_offset(T, s=0.008, max_beta=0.999):
    return schedules.cosine_betas(T, 0.0, max_beta)


def rescale_alpha_bar_not_sqrt(betas):
    ab = schedules.alpha_bar_from_betas(betas)
    ab = (ab - ab[-1]) * ab[0] / (ab[0] - ab[-1])
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def rescale_shift_only(betas):
    a = schedules.alpha_bar_from_betas(betas).sqrt()
    ab = (a - a[-1]) ** 2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def embedding_sin_first(t, dim):
    e = unet.timestep_embedding(t, dim)
    h = dim // 2
    return torch.cat([e[:, h:2 * h], e[:, :h], e[:, 2 * h:]], 1)


def embedding_interleaved(t, dim):
    e = unet.timestep_embedding(t, dim)
    h = dim // 2
    return torch.cat([rearrange(torch.stack([e[:, :h], e[:, h:2 * h]], -1), "b h two -> b (h two)"), e[:, 2 * h:]], 1)


def cross_attention_keys_from_x(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    return cross_attention(x, x, w_q, w_k, w_v, w_out, b_out, heads)


def cross_attention_no_bias(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    return cross_attention(x, context, w_q, w_k, w_v, w_out, torch.zeros_like(b_out), heads)


def cross_attention_wrong_head_layout(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    q, k, v = (rearrange(p, "b n (d h) -> b h n d", h=heads) for p in (x @ w_q.T, context @ w_k.T, context @ w_v.T))
    return rearrange(unet.attention_reference(q, k, v), "b h n d -> b n (h d)") @ w_out.T + b_out


def target_v_sign_flipped(prediction, x0, eps, ab):
    return -training_target(prediction, x0, eps, ab) if prediction == "v" else training_target(prediction, x0, eps, ab)


def target_accepts_anything(prediction, x0, eps, ab):
    return training_target(prediction, x0, eps, ab) if prediction in ("x0", "v") else eps


def to_x0_and_eps_v_sign(prediction, out, x_t, ab):
    if prediction != "v":
        return to_x0_and_eps(prediction, out, x_t, ab)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    return a * x_t + b * out, b * x_t - a * out


def loss_model_sees_x0(model, x0, t, noise, schedule, prediction="eps"):
    return (model(x0, t) - diffusion.training_target(prediction, x0, noise, t, schedule)).pow(2).mean()


def loss_summed(model, x0, t, noise, schedule, prediction="eps"):
    return diffusion_loss(model, x0, t, noise, schedule, prediction) * x0.numel()


def loss_per_sample(model, x0, t, noise, schedule, prediction="eps"):
    out = model(schedule.q_sample(x0, t, noise), t)
    return (out - diffusion.training_target(prediction, x0, noise, t, schedule)).pow(2).flatten(1).mean(1)


CHECKERS = [
    # (checker, correct answer, [(wrong answer, expected message fragment), ...])
    (s03.check_cosine_betas, schedules.cosine_betas, [
        (lambda T, s, m: schedules.cosine_betas(T, s, m).float(), "float64"),
        (cosine_unclipped, "clip the betas"),
        (cosine_off_by_one, "one beta per step"),
        (cosine_without_offset, "values are off"),
    ]),
    (s03.check_alpha_bar_from_betas, schedules.alpha_bar_from_betas, [
        (lambda b: torch.cumprod(b, 0), "cumulative product of the betas"),
        (lambda b: torch.prod(1 - b), "single number"),
        (lambda b: torch.cumsum(1 - b, 0), "cumulative sum"),
    ]),
    (s03.check_q_sample, q_sample, [
        (lambda x0, t, n, ab: q_sample(x0, t[:1].expand_as(t), n, ab), "timestep of the first one"),
        (lambda x0, t, n, ab: ab[t].float().view(-1, 1, 1, 1) * x0 + (1 - ab[t].float()).view(-1, 1, 1, 1) * n,
         "square roots are missing"),
        (lambda x0, t, n, ab: ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * n, "raised RuntimeError"),  # no reshape
        (lambda x0, t, n, ab: ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * n,
         "cast the looked-up values"),
    ]),
    (s03.check_rescale_zero_terminal_snr, schedules.rescale_zero_terminal_snr, [
        (lambda b: schedules.alpha_bar_from_betas(schedules.rescale_zero_terminal_snr(b)), "this is alpha_bar"),
        (rescale_alpha_bar_not_sqrt, "shifted and scaled alpha_bar itself"),
        (rescale_shift_only, "first alpha_bar changed"),
        (lambda b: b.clone(), "ends at"),
    ]),
    (s04.check_timestep_embedding, unet.timestep_embedding, [
        (embedding_sin_first, "swapped"),
        (embedding_interleaved, "interleaved"),
        (lambda t, dim: unet.timestep_embedding(t, dim - dim % 2), "append one column of zeros"),
        (lambda t, dim: F.pad(unet.timestep_embedding(t, dim - dim % 2, max_period=1000.0), (0, dim % 2)),
         "values are off"),
    ]),
    (s04.check_attention, unet.attention_reference, [
        (lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, "not scaled"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2) @ v, "weigh the 4 values"),
        (lambda q, k, v: unet.attention_reference(q, k, v).detach(), "no gradient"),
    ]),
    (s04.check_split_heads, split_heads, [
        (lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h), "split as \\(d, heads\\)"),
        (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "plain reshape"),
        (lambda x, h: rearrange(x, "b n (h d) -> b h n d", h=h), "raise a ValueError"),  # no check of its own
    ]),
    (s04.check_cross_attention, cross_attention, [
        (cross_attention_keys_from_x, "raised RuntimeError"),  # context_dim != query_dim: shapes clash
        (cross_attention_no_bias, "b_out is missing"),
        (cross_attention_wrong_head_layout, "values are off"),
        (lambda *args: cross_attention(*args).detach(), "no gradient"),
    ]),
    (s05.check_training_target, training_target, [
        (target_v_sign_flipped, "sign of v is flipped"),
        (lambda p, x0, eps, ab: eps, "prediction='x0'.*values are off"),
        (target_accepts_anything, "raise a ValueError"),
    ]),
    (s05.check_to_x0_and_eps, to_x0_and_eps, [
        (lambda p, out, x_t, ab: to_x0_and_eps(p, out, x_t, ab)[0], "return a tuple"),
        (to_x0_and_eps_v_sign, "prediction='v'.*x0_hat must be the x0"),
    ]),
    (s05.check_min_snr_weight, diffusion.min_snr_weight, [
        (lambda snr, gamma, p: snr.clamp(max=gamma), "weight for x0-prediction"),
        (lambda snr, gamma, p: snr.clamp(max=gamma) / snr if p == "eps" else diffusion.min_snr_weight(snr, gamma, p),
         "got NaN"),
    ]),
    (s05.check_diffusion_loss, diffusion_loss, [
        (loss_model_sees_x0, "model's input must be x_t"),
        (loss_summed, "the loss value"),
        (loss_per_sample, "expected one number"),
        (lambda *args: diffusion_loss(*args).detach(), "no gradient"),
    ]),
]


STAGE02 = [
    # (checker, reference, [(wrong answer, expected message fragment), ...])
    (s02.check_reparameterize, ref.reparameterize, [
        (lambda m, lv, n: m + torch.exp(lv) * n, "values are off"),  # used the variance, not sigma
        (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).detach(), "no gradient"),
    ]),
    (s02.check_kl_divergence, ref.kl_divergence, [
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(), "expected shape"),  # summed over the batch too
        (lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3)), "values are off"),  # forgot the 1/2
    ]),
    (s02.check_nearest_code, ref.nearest_code, [
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> b (h w) c"), e[None]).argmax(-1)
         .reshape(z.shape[0], *z.shape[2:]), "entries differ"),  # farthest, not nearest
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> (b h w) c"), e).argmin(-1), "expected shape"),
    ]),
    (s02.check_straight_through, ref.straight_through, [
        (lambda z, zq: zq, "no gradient path"),
        (lambda z, zq: z, "values are off"),
        (lambda z, zq: z + (zq - z), "backward"),  # no detach: gradient w.r.t. z vanishes
    ]),
]


@pytest.mark.parametrize("checker, correct, wrong", STAGE02 + CHECKERS, ids=lambda x: getattr(x, "__name__", ""))
def test_checker_accepts_a_correct_answer_and_rejects_wrong_ones(checker, correct, wrong, capsys):
    checker(correct)
    assert capsys.readouterr().out.startswith("PASS")
    with pytest.raises(ExerciseError, match="not implemented yet"):
        checker(unfilled)
    for answer, message in wrong:
        with pytest.raises(ExerciseError, match=message):
            checker(answer)


def test_checkers_leave_the_global_random_state_alone():
    """A notebook's torch.manual_seed must mean the same before and after a graded cell."""
    torch.manual_seed(0)
    s04.check_cross_attention(cross_attention)
    s05.check_diffusion_loss(diffusion_loss)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
