"""Checkers of exercises 01-11 (data, autoencoder, schedules, UNet blocks, objectives, latents, evaluation, samplers,
guidance, applications, real data) accept a correct answer and
reject the unfilled stub and typical wrong answers with a message that says what is wrong."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minildm import checks, diffusion, judge, metrics, schedules, unet
from minildm import regularizers as ref
from minildm.checks import ExerciseError
from minildm.checks import stage02 as s02
from minildm.checks import stage03 as s03
from minildm.checks import stage04 as s04
from minildm.checks import stage05 as s05
from minildm.checks import stage07 as s07
from minildm.checks import stage08 as s08
from minildm.checks import stage09 as s09

STAGES = (s02, s03, s04, s05, s07, s08, s09)


@pytest.fixture(autouse=True)
def answers_from_this_file_count_as_written_in_a_notebook(monkeypatch):
    """The answers below live in this test module, not in a notebook's __main__: the checkers' guard
    (`written_here`, tested at the end of this file with the `real_guard` fixture) would refuse them all."""
    for stage in STAGES:
        monkeypatch.setattr(stage, "written_here", lambda fn, name: None)


@pytest.fixture
def real_guard(monkeypatch):
    for stage in STAGES:
        monkeypatch.setattr(stage, "written_here", checks.written_here)


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


def cosine_variant(T, s, max_beta, power=2, squash=True, inverted=False, alpha_bar=False):
    """The cosine schedule with one typical change: cos not squared, (u + s) not divided by (1 + s), ratio inverted,
    alpha_bar(t / T) returned for t = 1..T instead of the betas."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    ab = torch.cos((u + s) / ((1 + s) if squash else 1) * math.pi / 2) ** power
    if alpha_bar:
        return (ab / ab[0])[1:].clamp(max=max_beta)
    ratio = ab[:-1] / ab[1:] if inverted else ab[1:] / ab[:-1]
    return (1 - ratio).clamp(max=max_beta)


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


def embedding_with_frequencies(t, dim, freqs):
    half = dim // 2
    angles = t.float()[:, None] * freqs(torch.arange(half, dtype=torch.float32), half)[None]
    return F.pad(torch.cat([angles.cos(), angles.sin()], 1), (0, dim % 2))


def cross_attention_scaled_by_inner(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    q, k, v = (rearrange(p, "b n (h d) -> b h n d", h=heads) for p in (x @ w_q.T, context @ w_k.T, context @ w_v.T))
    out = (q @ k.transpose(-2, -1) / math.sqrt(w_q.shape[0])).softmax(-1) @ v
    return rearrange(out, "b h n d -> b n (h d)") @ w_out.T + b_out


def cross_attention_one_head(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    return cross_attention(x, context, w_q, w_k, w_v, w_out, b_out, 1)


def cross_attention_keys_from_x(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    return cross_attention(x, x, w_q, w_k, w_v, w_out, b_out, heads)


def cross_attention_no_bias(x, context, w_q, w_k, w_v, w_out, b_out, heads):
    return cross_attention(x, context, w_q, w_k, w_v, w_out, torch.zeros_like(b_out), heads)


def cross_attention_wrong_head_layout(x, context, w_q, w_k, w_v, w_out, b_out, heads, merge="(h d)"):
    q, k, v = (rearrange(p, "b n (d h) -> b h n d", h=heads) for p in (x @ w_q.T, context @ w_k.T, context @ w_v.T))
    return rearrange(unet.attention_reference(q, k, v), f"b h n d -> b n {merge}") @ w_out.T + b_out


def target_v_sign_flipped(prediction, x0, eps, ab):
    return -training_target(prediction, x0, eps, ab) if prediction == "v" else training_target(prediction, x0, eps, ab)


def target_accepts_anything(prediction, x0, eps, ab):
    return training_target(prediction, x0, eps, ab) if prediction in ("x0", "v") else eps


def to_x0_and_eps_v_sign(prediction, out, x_t, ab):
    if prediction != "v":
        return to_x0_and_eps(prediction, out, x_t, ab)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    return a * x_t + b * out, b * x_t - a * out


def to_x0_and_eps_no_roots(prediction, out, x_t, ab):
    if prediction != "eps":
        return to_x0_and_eps(prediction, out, x_t, ab)
    return (x_t - (1 - ab) * out) / ab, out


def to_x0_and_eps_x0_swapped(prediction, out, x_t, ab):
    if prediction != "x0":
        return to_x0_and_eps(prediction, out, x_t, ab)
    return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()


def loss_wrong_target(model, x0, t, noise, schedule, prediction="eps"):
    return (model(schedule.q_sample(x0, t, noise), t) - x0).pow(2).mean()  # x0 as the target, whatever the type


def loss_absolute(model, x0, t, noise, schedule, prediction="eps"):
    target = diffusion.training_target(prediction, x0, noise, t, schedule)
    return (model(schedule.q_sample(x0, t, noise), t) - target).abs().mean()


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
        (cosine_without_offset, "offset s is missing"),
        (lambda T, s, m: cosine_variant(T, s, m, power=1), "not squared"),
        (lambda T, s, m: cosine_variant(T, s, m, squash=False), "divided by \\(1 \\+ s\\)"),
        (lambda T, s, m: cosine_variant(T, s, m, alpha_bar=True), "this is alpha_bar"),
        (lambda T, s, m: cosine_variant(T, s, m, inverted=True), "ratio is upside down"),
        (lambda T, s, m: schedules.cosine_betas(T, s, m) * 0.99, "values are off"),
    ]),
    (s03.check_alpha_bar_from_betas, schedules.alpha_bar_from_betas, [
        (lambda b: torch.cumprod(b, 0), "cumulative product of the betas"),
        (lambda b: torch.prod(1 - b), "single number"),
        (lambda b: torch.cumsum(1 - b, 0), "cumulative sum"),
        (lambda b: torch.cat([torch.ones_like(b[:1]), torch.cumprod(1 - b, 0)[:-1]]), "shifted by one step"),
        (lambda b: torch.cumprod((1 - b).sqrt(), 0), "product of sqrt\\(1 - beta\\)"),
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
        (lambda b: 1 - schedules.rescale_zero_terminal_snr(b), "these are the alphas"),
        (lambda b: schedules.alpha_bar_from_betas(schedules.rescale_zero_terminal_snr(b)).sqrt(),
         "rescaled sqrt\\(alpha_bar\\)"),
    ]),
    (s04.check_timestep_embedding, unet.timestep_embedding, [
        (embedding_sin_first, "swapped"),
        (embedding_interleaved, "interleaved"),
        (lambda t, dim: unet.timestep_embedding(t, dim - dim % 2), "append one column of zeros"),
        (lambda t, dim: F.pad(unet.timestep_embedding(t, dim - dim % 2, max_period=1000.0), (0, dim % 2)),
         "values are off"),
        (lambda t, dim: embedding_with_frequencies(t, dim, lambda i, half: torch.exp(math.log(1e4) * i / half)),
         "the frequencies grow"),
        (lambda t, dim: embedding_with_frequencies(t, dim, lambda i, half: torch.exp(-math.log(1e4) * i / dim)),
         "divided by dim"),
        (lambda t, dim: embedding_with_frequencies(t, dim, lambda i, half: torch.exp(-math.log(1e4) * i / (half - 1))),
         "divided by half - 1"),
    ]),
    (s04.check_attention, unet.attention_reference, [
        (lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, "not scaled"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2) @ v, "weigh the 4 values"),
        (lambda q, k, v: unet.attention_reference(q, k, v).detach(), "no gradient"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(-1) @ v, "divided by d"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])).softmax(-1) @ v, "width of the values"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2) @ v
         if k.shape[-2] == 4 and q.shape[-1] == 16 else unet.attention_reference(q, k, v), "over the queries"),
    ]),
    (s04.check_split_heads, split_heads, [
        (lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h), "split as \\(d, heads\\)"),
        (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "plain reshape"),
        (lambda x, h: rearrange(x, "b n (h d) -> b h n d", h=h), "raise a ValueError"),  # no check of its own
        (lambda x, h: rearrange(x, "b n (h d) -> b n h d", h=h), "not moved in front of the tokens"),
    ]),
    (s04.check_cross_attention, cross_attention, [
        (cross_attention_keys_from_x, "raised RuntimeError"),  # context_dim != query_dim: shapes clash
        (cross_attention_no_bias, "b_out is missing"),
        (cross_attention_wrong_head_layout, "split into heads as \\(head_dim, heads\\)"),
        (lambda *a: cross_attention_wrong_head_layout(*a, merge="(d h)"), "split into heads \\(and merged back\\)"),
        (cross_attention_scaled_by_inner, "1 / sqrt\\(heads \\* head_dim\\)"),
        (cross_attention_one_head, "not split into heads"),
        (lambda *args: cross_attention(*args).detach(), "no gradient"),
    ]),
    (s05.check_training_target, training_target, [
        (target_v_sign_flipped, "sign of v is flipped"),
        (lambda p, x0, eps, ab: eps, "prediction='x0'.*values are off"),
        (target_accepts_anything, "raise a ValueError"),
    ]),
    (s05.check_to_x0_and_eps, to_x0_and_eps, [
        (lambda p, out, x_t, ab: to_x0_and_eps(p, out, x_t, ab)[0], "return a tuple"),
        (to_x0_and_eps_v_sign, "prediction='v'.*x0_hat.*sign of v is flipped"),
        (to_x0_and_eps_no_roots, "prediction='eps'.*square roots are missing"),
        (to_x0_and_eps_x0_swapped, "prediction='x0'.*eps_hat.*coefficients are swapped"),
    ]),
    (s05.check_min_snr_weight, diffusion.min_snr_weight, [
        (lambda snr, gamma, p: snr.clamp(max=gamma), "weight for x0-prediction"),
        (lambda snr, gamma, p: snr.clamp(max=gamma) / snr if p == "eps" else diffusion.min_snr_weight(snr, gamma, p),
         "got NaN"),
        (lambda snr, gamma, p: snr.clamp(min=gamma), "max\\(SNR, gamma\\)"),
        (lambda snr, gamma, p: diffusion.min_snr_weight(snr, gamma, "eps" if p == "v" else p), "this is the eps weight"),
        (lambda snr, gamma, p: diffusion.min_snr_weight(snr, gamma, "v" if p == "eps" else p), "this is the v weight"),
        (lambda snr, gamma, p: gamma / snr if p == "eps" else diffusion.min_snr_weight(snr, gamma, p),
         "without the cap at 1"),
    ]),
    (s05.check_diffusion_loss, diffusion_loss, [
        (loss_model_sees_x0, "model's input must be x_t"),
        (loss_summed, "the loss is summed"),
        (loss_wrong_target, "prediction='eps'.*the target is wrong"),
        (loss_absolute, "mean absolute error"),
        (loss_per_sample, "expected one number"),
        (lambda *args: diffusion_loss(*args).detach(), "no gradient"),
    ]),
]


STAGE02 = [
    # (checker, reference, [(wrong answer, expected message fragment), ...])
    # The common mistakes get their own message (named before the generic "values are off"):
    (s02.check_reparameterize, ref.reparameterize, [
        (lambda m, lv, n: m + torch.exp(lv) * n, "by exp\\(logvar\\), the variance"),
        (lambda m, lv, n: m + lv * n, "by logvar itself"),
        (lambda m, lv, n: m + torch.exp(lv / 2), "the noise is missing"),
        (lambda m, lv, n: m + n, "logvar is missing"),
        (lambda m, lv, n: m + torch.exp(lv / 3) * n, "values are off"),  # no named mistake: the generic message
        (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).detach(), "no gradient"),
    ]),
    (s02.check_kl_divergence, ref.kl_divergence, [
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(), "returned a single number"),  # over the batch too
        (lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3)), "factor 1/2 is missing"),
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).mean((1, 2, 3)), "you averaged over C, H, W"),
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 + lv).sum((1, 2, 3)), "sign of the logvar term"),
        (lambda m, lv: 0.5 * (m**2 + (lv / 2).exp() - 1 - lv).sum((1, 2, 3)), "standard deviation"),
        (lambda m, lv: 0.5 * (m + lv.exp() - 1 - lv).sum((1, 2, 3)), "mean must enter squared"),
        (lambda m, lv: 0.4 * (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3)), "values are off"),
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum((2, 3)), "summed over the wrong axes"),  # (B, C)
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum((0, 2, 3)), "summed over the wrong axes"),  # (C,)
        (lambda m, lv: m.sum(), "returned a single number"),  # issue 14: passed the old hidden test
    ]),
    (s02.check_nearest_code, ref.nearest_code, [
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> b (h w) c"), e[None]).argmax(-1)
         .reshape(z.shape[0], *z.shape[2:]), "farthest codes"),
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> (b h w) c"), e).argmin(-1), "reshape it back"),
        (lambda z, e: torch.cdist(z.reshape(-1, z.shape[1]), e).argmin(-1).view(z.shape[0], *z.shape[2:]),
         "mixes channels and positions"),
        (lambda z, e: e[ref.nearest_code(z, e)], "not the code vectors"),
    ]),
    (s02.check_straight_through, ref.straight_through, [
        (lambda z, zq: zq, "no gradient path"),
        (lambda z, zq: z, "the output equals z"),
        (lambda z, zq: zq + (z - zq).detach(), "the output equals z"),  # detached the wrong term
        (lambda z, zq: z + (zq - z), "gradient w.r.t. z is zero"),  # no detach: gradient w.r.t. z vanishes
    ]),
]


# ---- exercise 07 (evaluation): correct answers and typical wrong ones ------------------------------------


def feature_statistics(x):
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples")
    return metrics.feature_statistics(x)


def gaussian_fd(mu1, cov1, mu2, cov2):
    if mu1.shape != mu2.shape:
        raise ValueError("different dimensions")
    return metrics.gaussian_frechet_distance(mu1, cov1, mu2, cov2)


def psd_sqrt_unclamped(a):
    w, v = torch.linalg.eigh(a)
    return (v * w.sqrt()) @ v.T


def fd_parts(mu1, cov1, mu2, cov2, middle=None, outer_sqrt=True):
    """||mu1 - mu2||^2, tr S1 + tr S2 and tr((S1^{1/2} S2 S1^{1/2})^{1/2}), each piece replaceable."""
    root = psd_sqrt_unclamped(cov1)
    m = root @ cov2 @ root if middle is None else middle
    w = torch.linalg.eigvalsh(m)
    return (mu1 - mu2).pow(2).sum(), cov1.trace() + cov2.trace(), w.clamp_min(0).sqrt().sum() if outer_sqrt else w.sum()


def fd_without_cross_term(*args):
    d2, tr, _ = fd_parts(*args)
    return d2 + tr


def fd_with_cov_not_its_root(mu1, cov1, mu2, cov2):
    d2, tr, cross = fd_parts(mu1, cov1, mu2, cov2, middle=cov1 @ cov2 @ cov1)
    return d2 + tr - 2 * cross


def fd_without_outer_sqrt(*args):
    d2, tr, cross = fd_parts(*args, outer_sqrt=False)
    return d2 + tr - 2 * cross


def fd_elementwise_sqrt(mu1, cov1, mu2, cov2):
    root = cov1.sqrt()  # entry by entry: NaN where a covariance is negative
    return (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * (root @ cov2 @ root).sqrt().trace()


def fd_entrywise_root(mu1, cov1, mu2, cov2):
    root = cov1.sqrt()
    return fd_without_cross_term(mu1, cov1, mu2, cov2) - 2 * torch.linalg.eigvalsh(root @ cov2 @ root).sqrt().sum()


def fd_trace_of_entrywise_sqrt(mu1, cov1, mu2, cov2):
    root = psd_sqrt_unclamped(cov1)
    return fd_without_cross_term(mu1, cov1, mu2, cov2) - 2 * torch.sqrt(root @ cov2 @ root).trace()


def fd_unclamped(mu1, cov1, mu2, cov2):
    root = psd_sqrt_unclamped(cov1)
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).sqrt().sum()
    return (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross


def fd_without_width_check(mu1, cov1, mu2, cov2):
    """Right on every valid input (torchmetrics' way: S1 S2 has the eigenvalues of S1^{1/2} S2 S1^{1/2})."""
    cross = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def fd_through_eigvals(mu1, cov1, mu2, cov2):
    if mu1.shape != mu2.shape:
        raise ValueError("different dimensions")
    return fd_without_width_check(mu1, cov1, mu2, cov2)


def object_correct(read, attributes):
    present = attributes[..., 0] >= 0
    cell = attributes[..., 3].clamp(min=0)
    seen = torch.gather(read, 1, cell[..., None].expand(-1, -1, 3))
    return (seen == attributes[..., :3]).all(-1) & present


def object_correct_wraps(read, attributes):
    seen = read[torch.arange(len(read))[:, None], attributes[..., 3]]
    return (seen == attributes[..., :3]).all(-1)


def object_correct_by_slot(read, attributes):
    return (read[:, :3] == attributes[..., :3]).all(-1) & (attributes[..., 0] >= 0)


def object_correct_without_size(read, attributes):
    seen = torch.gather(read, 1, attributes[..., 3].clamp(min=0)[..., None].expand(-1, -1, 3))
    return (seen[..., :2] == attributes[..., :2]).all(-1) & (attributes[..., 0] >= 0)


def caption_accuracy_variant(read, attributes, mistake=None):
    """The report from per-object correctness; `mistake` names one typical error to make."""
    present = attributes[..., 0] >= 0
    n = int(present.sum())
    cell = attributes[..., 3].clamp(min=0)
    seen = torch.gather(read, 1, cell[..., None].expand(-1, -1, 3))
    right = {"place": seen[..., 0] >= 0}
    for i, key in enumerate(("shape", "colour", "size")):
        right[key] = seen[..., i] == attributes[..., i]
    right["object"] = object_correct(read, attributes)
    captioned = torch.zeros(read.shape[:2], dtype=torch.bool)
    captioned[torch.arange(len(read))[:, None].expand_as(cell)[present], cell[present]] = True
    extra = (read[..., 0] >= 0) & ~captioned
    result = {key: (value & present).sum().item() / n for key, value in right.items()}
    ok = right["object"] | ~present
    result["caption"] = (ok.all(1) & ~extra.any(1)).float().mean().item()
    result["extra_per_image"] = extra.sum(1).float().mean().item()
    result.update(objects=n, images=len(read))
    if mistake == "extras ignored":
        result["caption"] = ok.all(1).float().mean().item()
    if mistake == "absent rows count":
        result["caption"] = (right["object"].all(1) & ~extra.any(1)).float().mean().item()
    if mistake == "divide by B * 3":
        result["object"] = right["object"].sum().item() / present.numel()
    if mistake == "empty cells skipped":
        filled = right["place"] & present
        result["colour"] = (right["colour"] & filled).sum().item() / filled.sum().item()
    if mistake == "every occupied cell":
        result["extra_per_image"] = (read[..., 0] >= 0).sum(1).float().mean().item()
    if mistake == "tensor counts":
        result["objects"] = present.sum()
    return result


STAGE07 = [
    (s07.check_feature_statistics, feature_statistics, [
        (lambda x: (x.mean(0), (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)), "biased covariance, divided by N"),
        (lambda x: (x.mean(0), x.T @ x / (len(x) - 1)), "mean was not subtracted"),
        (lambda x: (x.mean(0), torch.cov(x)), "torch.cov of features.T"),
        (lambda x: (x.mean(0), torch.diag(x.var(0))), "only the variances"),
        (lambda x: (x.mean(0), (x - x.mean(1, keepdim=True)).T @ (x - x.mean(1, keepdim=True)) / (len(x) - 1)),
         "along the wrong axis"),
        (lambda x: metrics.feature_statistics(x)[1], "return a tuple"),
        (lambda x: (x.mean(0), (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)), "single sample.*ValueError"),
    ]),
    (s07.check_gaussian_frechet_distance, gaussian_fd, [
        (fd_without_cross_term, "cross term .* is missing"),
        (lambda *a: fd_without_cross_term(*a) - fd_parts(*a)[2], "needs its factor 2"),
        (fd_without_outer_sqrt, "misses the outer square root"),
        (fd_with_cov_not_its_root, "not S1 itself"),
        (lambda *a: fd_parts(*a)[0].sqrt() + fd_parts(*a)[1] - 2 * fd_parts(*a)[2], "must be squared"),
        (fd_elementwise_sqrt, "entry by entry"),
        (fd_entrywise_root, "square root of each entry"),
        (fd_trace_of_entrywise_sqrt, "not of its diagonal entries"),
        (fd_unclamped, "against itself.*clamp eigenvalues to 0"),
        (lambda mu1, cov1, mu2, cov2: metrics.gaussian_frechet_distance(mu1, cov1, mu2, cov2) * torch.ones(2),
         "expected one number"),
        (fd_without_width_check, "5-D and a 4-D.*raised RuntimeError; raise a ValueError"),
    ]),
    (s07.check_object_correct, object_correct, [
        (object_correct_wraps, "last cell"),
        (object_correct_by_slot, "looked up in cell k"),
        (object_correct_without_size, "size was not compared"),
        (lambda read, attributes: object_correct(read, attributes).long(), "bool tensor"),
    ]),
    (s07.check_caption_accuracy, caption_accuracy_variant, [
        (lambda r, a: caption_accuracy_variant(r, a, "extras ignored"), "require no extra objects"),
        (lambda r, a: caption_accuracy_variant(r, a, "absent rows count"), "cannot make a caption wrong"),
        (lambda r, a: caption_accuracy_variant(r, a, "divide by B * 3"), "divide by the number of captioned"),
        (lambda r, a: caption_accuracy_variant(r, a, "empty cells skipped"), "empty cell counts as a wrong colour"),
        (lambda r, a: caption_accuracy_variant(r, a, "every occupied cell"), "counted every occupied cell"),
        (lambda r, a: caption_accuracy_variant(r, a, "tensor counts"), "'objects' must be the int"),
        (lambda r, a: {k: v for k, v in caption_accuracy_variant(r, a).items() if k != "caption"}, "missing"),
    ]),
]



def test_stage07_fd_checker_accepts_the_eigvals_of_s1_s2_route(capsys):
    s07.check_gaussian_frechet_distance(fd_through_eigvals)
    assert capsys.readouterr().out.startswith("PASS")


def test_stage07_hand_made_caption_case_matches_its_closed_form():
    """The checker's 4 hand-made images, scored by minildm.judge.caption_accuracy, give the counts by hand:
    6 captioned objects, one read with a wrong colour, one missing; 1 of 4 captions right; 1 extra object."""
    read, attributes, _ = s07._hand_case()
    got = judge.caption_accuracy(read, attributes)
    assert got == pytest.approx({"place": 5 / 6, "shape": 5 / 6, "colour": 4 / 6, "size": 5 / 6, "object": 4 / 6,
                                 "caption": 1 / 4, "extra_per_image": 1 / 4, "objects": 6, "images": 4})


# ---- exercise 08 (samplers): correct answers and typical wrong ones --------------------------------------------


from minildm import samplers


def ddim_step(x_t, eps, ab_t, ab_prev, eta, noise, mistake=None):
    """The package's step after x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t); `mistake` makes one typical error."""
    a, b = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    x0 = (x_t - b * eps) / a if mistake != "no sqrt in x0" else (x_t - (1 - ab_t) * eps) / ab_t
    sigma = samplers.ddim_sigma(ab_t, ab_prev, eta)
    if mistake == "beta sigma":
        sigma = eta * math.sqrt(1 - ab_t / ab_prev)
    if mistake == "swapped":
        ab_t, ab_prev = ab_prev, ab_t
    direction = math.sqrt(max(1 - ab_prev - (sigma**2 if mistake != "direction without sigma" else 0), 0))
    noise_term = {"sigma^2 noise": sigma**2 * noise, "no noise": 0 * noise}.get(mistake, sigma * noise)
    return math.sqrt(ab_prev) * x0 + direction * eps + noise_term


def ddim_step_returns_x0(x_t, eps, ab_t, ab_prev, eta, noise):
    return (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)


def ddim_step_torch_sqrt(x_t, eps, ab_t, ab_prev, eta, noise):
    return torch.sqrt(ab_prev) * ddim_step_returns_x0(x_t, eps, ab_t, ab_prev, eta, noise)


STAGE08 = [
    (s08.check_ddim_step, ddim_step, [
        (ddim_step_returns_x0, "this is x0_hat itself"),
        (lambda *a: ddim_step(*a, mistake="no sqrt in x0"), "square roots are missing"),
        (lambda *a: ddim_step(*a, mistake="swapped"), "are swapped"),
        (lambda *a: ddim_step(*a, mistake="direction without sigma"), "sigma is missing from the direction term"),
        (lambda *a: ddim_step(*a, mistake="sigma^2 noise"), "multiplied by sigma\\^2"),
        (lambda *a: ddim_step(*a, mistake="no noise"), "no noise was added"),
        (lambda *a: ddim_step(*a, mistake="beta sigma"), "'beta' variance of DDPM"),
        (ddim_step_torch_sqrt, "raised TypeError.*Python floats"),
        (lambda *a: 1.001 * ddim_step(*a), "values are off"),
    ]),
    (s08.check_euler_step, samplers.euler_step, [
        (lambda x, d, s, s_next: x - (s_next - s) * (x - d) / s, "moved away from the data"),
        (lambda x, d, s, s_next: x + (s_next - s) * (d - x) / s, "moved away from the data"),
        (lambda x, d, s, s_next: x + (s_next - s) * (x - d), "not divided by sigma"),
        (lambda x, d, s, s_next: d, "you returned `denoised`"),
        (lambda x, d, s, s_next: x + (s_next - s) * (x - d) / s_next, "divided by sigma_next"),
        (lambda x, d, s, s_next: samplers.euler_step(x, d, s, s_next) if s_next > 0 else x - s * (x - d) / s_next,
         "got inf or NaN"),
        (lambda x, d, s, s_next: samplers.euler_step(x, d, s, s_next).double(), "expected dtype torch.float32"),
    ]),
]



# ---- exercise 09 (guidance): correct answers and typical wrong ones ----------------------------------------------


from minildm import text


def guided(combine):
    """An answer in the exercise's signature that runs both passes and combines (out_c, out_u, w) with `combine`."""
    def answer(model, x, t, context, w, uncond):
        return combine(model(x, t, context), model(x, t, uncond), w)
    return answer


def guidance_one_batch_wrong_chunk(model, x, t, context, w, uncond):
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, context])).chunk(2)  # swapped
    return out_u + w * (out_c - out_u)


def guidance_both_halves(model, x, t, context, w, uncond):
    return model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, context]))


def drop(rule):
    """A condition-dropout answer: rule(u (n,), p) -> which captions to drop, from the generator's draw."""
    def answer(captions, p, generator):
        if not 0 <= p <= 1:
            raise ValueError("p must lie in [0, 1]")
        dropped = rule(torch.rand(len(captions), generator=generator), p)
        return ["" if d else c for c, d in zip(captions, dropped.tolist())]
    return answer


def drop_in_place(captions, p, generator):
    for i, d in enumerate((torch.rand(len(captions), generator=generator) < p).tolist()):
        if d:
            captions[i] = ""
    return captions


def drop_global_rng(captions, p, generator):
    return text.drop_captions(captions, p)  # the global generator, not the one given


def drop_bernoulli(captions, p, generator):
    if not 0 <= p <= 1:
        raise ValueError("p must lie in [0, 1]")
    keep = torch.bernoulli(torch.full((len(captions),), 1 - p), generator=generator).bool()
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


STAGE09 = [
    (s09.check_model_output, samplers.model_output, [
        (guided(lambda c, u, w: c + w * (u - c)), "the two predictions are swapped"),
        (guidance_one_batch_wrong_chunk, "swapped.*order torch.cat put them in"),
        (guided(lambda c, u, w: c + w * (c - u)), "Ho & Salimans' own convention"),
        (guided(lambda c, u, w: w * (c - u)), "add it to the unconditional prediction"),
        (guided(lambda c, u, w: w * c), "scales the conditional prediction"),
        (guided(lambda c, u, w: (c + u) / 2), "average of the two predictions"),
        (lambda model, x, t, context, w, uncond: model(x, t, context), "never saw uncond_context"),
        (lambda model, x, t, context, w, uncond: model(x, t, uncond), "never saw the context"),
        (guidance_both_halves, "returned 6 rows for 3 images"),
        (guided(lambda c, u, w: u + 1.01 * w * (c - u)), "values are off"),
    ]),
    (s09.check_drop_captions, text.drop_captions, [
        (drop(lambda u, p: u >= p), "probability is inverted"),
        (drop(lambda u, p: (u[:1] < p).expand(len(u))), "(every|no) caption was dropped.*each caption on its own"),
        (lambda captions, p, g: ["<pad>" if c == "" else c for c in text.drop_captions(captions, p, g)],
         "became '<pad>'"),
        (drop_in_place, "changed the list it was given"),
        (lambda captions, p, g: torch.rand(len(captions), generator=g) < p, "expected a list of 2000 str"),
        (drop_global_rng, "ignores the generator"),
        (drop_bernoulli, "differ from the prescribed draw"),
        (lambda captions, p, g: text.drop_captions(captions, min(max(p, 0.0), 1.0), g), "raise a ValueError"),
    ]),
]



# ---- the guard every checker calls first: the student's own function, not the package's answer ------------------

import functools

KL_SOURCE = """
import torch
from minildm import regularizers
from minildm.checks import stage02 as checks

def kl_divergence(mean, logvar):
    return 0.5 * torch.sum(mean**2 + torch.exp(logvar) - 1.0 - logvar, dim=(1, 2, 3))

def wrapper(mean, logvar):
    return regularizers.kl_divergence(mean, logvar)

def through_the_checkers(mean, logvar):
    return checks.ref.kl_divergence(mean, logvar)

def imports_inside(mean, logvar):
    from minildm.regularizers import kl_divergence as answer
    return answer(mean, logvar)

def in_a_default(mean, logvar, answer=regularizers.kl_divergence):
    return answer(mean, logvar)

def calls_a_notebook_wrapper(mean, logvar):
    return [wrapper(m[None], lv[None]) for m, lv in zip(mean, logvar)][0]
"""


def in_main(source: str) -> dict:
    """Run `source` as a notebook cell does: in a namespace whose __name__ is "__main__"."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<notebook cell>", "exec"), namespace)  # noqa: S102 (our own test source)
    return namespace


def test_guard_accepts_a_function_written_in_the_notebook(real_guard, capsys):
    answer = in_main(KL_SOURCE)["kl_divergence"]
    checks.written_here(answer, "kl_divergence")
    checks.written_here(in_main("double = lambda x: 2 * x")["double"], "double")
    s02.check_kl_divergence(answer)
    assert capsys.readouterr().out.startswith("PASS")


@pytest.mark.parametrize("answer", [ref.kl_divergence, functools.partial(ref.kl_divergence), lambda m, lv: m, len],
                         ids=["package function", "partial", "lambda of another module", "builtin"])
def test_guard_refuses_what_was_not_defined_in_the_notebook(answer):
    with pytest.raises(ExerciseError, match="expected your own function"):
        checks.written_here(answer, "kl_divergence")


@pytest.mark.parametrize("name", ["wrapper", "through_the_checkers", "imports_inside", "in_a_default",
                                  "calls_a_notebook_wrapper"])
def test_guard_refuses_notebook_code_that_reaches_the_package(name):
    with pytest.raises(ExerciseError, match="from the minildm package"):
        checks.written_here(in_main(KL_SOURCE)[name], "kl_divergence")


@pytest.mark.parametrize("checker, correct", [(c, answer) for c, answer, _ in STAGE02 + CHECKERS + STAGE07 + STAGE08
                                                  + STAGE09],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_every_checker_calls_the_guard_first(checker, correct, real_guard):
    """The answers of this file (package functions or this module's) are not a notebook's: every checker refuses them."""
    with pytest.raises(ExerciseError, match="expected your own function"):
        checker(correct)


@pytest.mark.parametrize("checkers", [
    [(s04.check_cross_attention, cross_attention), (s05.check_diffusion_loss, diffusion_loss)],
    [(checker, correct) for checker, correct, _ in STAGE07],
    [(checker, correct) for checker, correct, _ in STAGE08],
    [(checker, correct) for checker, correct, _ in STAGE09],
], ids=["stages04-05", "stage07", "stage08", "stage09"])
def test_checkers_leave_the_global_random_state_alone(checkers):
    """A notebook's torch.manual_seed must mean the same before and after a graded cell."""
    torch.manual_seed(0)
    for checker, correct in checkers:
        checker(correct)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("owner, attr, source", [
    (torch, "allclose", "fake = lambda *args, **kwargs: True"),
    (torch.Tensor, "any", "def fake(self):\n    return False"),
    (torch.nn.functional, "mse_loss", "import functools\ndef zero(a, b, k):\n    return 0\nfake = functools.partial(zero, k=1)"),
    (math, "isclose", "class Yes:\n    def __call__(self, *a, **k):\n        return True\nfake = Yes()"),
], ids=["torch.allclose", "Tensor.any", "F.mse_loss partial", "math.isclose object"])
def test_guard_refuses_to_check_once_a_notebook_replaced_torch(owner, attr, source, monkeypatch):
    """Issue 14: an answer cell that replaces what the checkers compute with gets no check at all."""
    answer = in_main(KL_SOURCE)["kl_divergence"]
    checks.written_here(answer, "kl_divergence")  # fine before
    monkeypatch.setattr(owner, attr, in_main(source)["fake"])
    with pytest.raises(ExerciseError, match=f"{attr} was replaced by code in this notebook"):
        checks.written_here(answer, "kl_divergence")


# ---- exercises 01 (data) and 06 (latent diffusion): correct answers and typical wrong ones -------------------------

from minildm.checks import stage01 as s01
from minildm.checks import stage06 as s06
from minildm.data import shapes

STAGES += (s01, s06)


def count_objects(attributes):
    return (attributes[..., 0] >= 0).sum(1)


def class_label(attributes):
    return attributes[:, 0, 0] * len(shapes.COLOURS) + attributes[:, 0, 1]


def caption_of(rows, template="a {size} {colour} {shape} at the {position}", joiner=" and ", skip_absent=True):
    return joiner.join(template.format(size=shapes.SIZES[s], colour=shapes.COLOUR_NAMES[c], shape=shapes.SHAPES[h],
                                       position=shapes.POSITIONS[p])
                       for h, c, s, p in rows.tolist() if h >= 0 or not skip_absent)


def object_centre(position, image_size):
    row, col = divmod(position, 3)
    return (col + 0.5) / 3 * image_size, (row + 0.5) / 3 * image_size


def class_label_by_lowest_cell(attributes):
    cell = torch.where(attributes[..., 0] >= 0, attributes[..., 3], 99).argmin(1)
    first = attributes[torch.arange(len(attributes)), cell]
    return first[:, 0] * 6 + first[:, 1]


def latent_scale_factor(z):
    return 1.0 / z.std().item()


def encode_latents(autoencoder, images, scale):
    with torch.no_grad():
        return scale * autoencoder.encode(images, sample=False).z


def decode_latents(autoencoder, z, scale):
    return autoencoder.decode(z / scale)


def latent_diffusion_loss(model, autoencoder, images, t, noise, schedule, scale, mistake=None):
    with torch.no_grad():
        z = autoencoder.encode(images, sample=False).z
    z0 = {"unscaled": z, "divided": z / scale}.get(mistake, scale * z)
    out = model(schedule.q_sample(z0, t, noise), t)
    target = z0 if mistake == "target z0" else noise
    return (out - target).pow(2).sum() if mistake == "summed" else (out - target).pow(2).mean()


def latent_loss_with_gradients_into_the_autoencoder(model, autoencoder, images, t, noise, schedule, scale):
    z0 = scale * autoencoder.encode(images, sample=False).z
    return (model(schedule.q_sample(z0, t, noise), t) - noise).pow(2).mean()


STAGE01_06 = [
    (s01.check_count_objects, count_objects, [
        (lambda a: torch.full((len(a),), 3), "every image got 3"),
        (lambda a: (a >= 0).sum((1, 2)), "4 per object"),
        (lambda a: (a[..., 0] < 0).sum(1), "counted the absent objects"),
        (lambda a: count_objects(a).float(), "expected int64"),
        (lambda a: count_objects(a)[:, None], "expected shape"),
    ]),
    (s01.check_class_label, class_label, [
        (lambda a: a[:, 0, 1] * 6 + a[:, 0, 0], "shape and colour are swapped"),
        (lambda a: a[:, 0, 0], "only the shape"),
        (class_label_by_lowest_cell, "not the one in the lowest-numbered cell"),
        (lambda a: class_label(a[:, [2, 1, 0]]) if (a[:, 2, 0] >= 0).all() else (
            a[torch.arange(len(a)), (a[..., 0] >= 0).sum(1) - 1] * torch.tensor([6, 1, 0, 0])).sum(1),
         "took the last object"),
    ]),
    (s01.check_caption_of, caption_of, [
        (lambda rows: caption_of(rows, skip_absent=False), "describes them"),
        (lambda rows: caption_of(rows, "a {colour} {size} {shape} at the {position}"), "wrong order"),
        (lambda rows: caption_of(rows, "a {size} {colour} {shape} at {position}"), "'the' is missing"),
        (lambda rows: caption_of(rows, joiner=", "), "not commas"),
        (lambda rows: caption_of(rows) + ".", "no full stop"),
        (lambda rows: caption_of(rows).capitalize(), "capital letter"),
        (lambda rows: caption_of(rows, "a {size} {colour} {shape} in the {position}"), "expected 'a large red"),
        (lambda rows: caption_of(rows).split(), "return a str"),
    ]),
    (s01.check_object_centre, object_centre, [
        (lambda p, s: object_centre(p, s)[::-1], "x and y are swapped"),
        (lambda p, s: (p % 3 / 3 * s, p // 3 / 3 * s), "top-left corner"),
        (lambda p, s: tuple(v / s for v in object_centre(p, s)), "multiply by image_size"),
        (lambda p, s: object_centre(p, s)[0], "return a tuple"),
        (lambda p, s: (object_centre(p, s)[0] + 1, object_centre(p, s)[1]), "expected \\(x, y\\)"),
    ]),
    (s06.check_latent_scale_factor, latent_scale_factor, [
        (lambda z: z.std().item(), "standard deviation itself"),
        (lambda z: 1 / z.var().item(), "1 / variance"),
        (lambda z: 1 / z.abs().mean().item(), "mean absolute value"),
        (lambda z: 1 / z.pow(2).mean().sqrt().item(), "root mean square"),
        (lambda z: 1 / z.std(dim=(0, 2, 3)), "one number"),
        (lambda z: str(1 / z.std().item()), "return a Python float"),
        (lambda z: 1.1 / z.std().item(), "expected 1 / std"),
    ]),
    (s06.check_encode_latents, encode_latents, [
        (lambda ae, x, s: encode_latents(ae, x, 1.0), "not scaled"),
        (lambda ae, x, s: ae.encode_latents(x).detach(), "not scaled"),  # the autoencoder's own buffer (1 here)
        (lambda ae, x, s: encode_latents(ae, x, 1 / s), "divided by the scale"),
        (lambda ae, x, s: s * ae.encode(x).z.detach(), "posterior sample"),
        (lambda ae, x, s: s * ae.encode(x, sample=False).z, "carry a gradient"),
    ]),
    (s06.check_decode_latents, decode_latents, [
        (lambda ae, z, s: ae.decode(z * s), "multiplied by the scale again"),
        (lambda ae, z, s: ae.decode(z), "scale was not undone"),
        (lambda ae, z, s: ae.decode(z / s).clamp(-0.01, 0.01), "values are off"),
    ]),
    (s06.check_latent_diffusion_loss, latent_diffusion_loss, [
        (lambda *a: latent_diffusion_loss(*a, mistake="unscaled"), "not scaled"),
        (lambda *a: latent_diffusion_loss(*a, mistake="divided"), "divided by the scale"),
        (lambda *a: latent_diffusion_loss(*a, mistake="target z0"), "target is the clean latent"),
        (lambda *a: latent_diffusion_loss(*a, mistake="summed"), "the loss is summed"),
        (lambda m, ae, x, t, n, s, sc: (m(x, t) - n).pow(2).mean(), "not on images"),
        (lambda *a: latent_diffusion_loss(*a).detach(), "no gradient"),
        (latent_loss_with_gradients_into_the_autoencoder, "gradients into the autoencoder"),
    ]),
]



@pytest.mark.parametrize("checker, correct", [(c, answer) for c, answer, _ in STAGE01_06],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_stage01_06_checkers_call_the_guard_first(checker, correct, real_guard):
    with pytest.raises(ExerciseError, match="expected your own function"):
        checker(correct)


def test_stage01_06_checkers_leave_the_global_random_state_alone():
    torch.manual_seed(0)
    for checker, correct, _ in STAGE01_06:
        checker(correct)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_stage01_reference_caption_is_the_plain_wording_of_the_grammar():
    """The checker's reference (shapes.caption with every first choice) on a hand-made image, written out by hand."""
    rows = torch.tensor([[0, 0, 1, 4], [5, 2, 0, 8], [-1, -1, -1, -1]])
    assert s01.reference_caption(rows) == "a large red circle at the center and a small yellow ring at the bottom right"


# ---- exercises 10 (applications) and 11 (real data): correct answers and typical wrong ones ----------------------

from PIL import Image
from torchvision import transforms as T

from minildm.applications import conditioned, editing
from minildm.checks import stage10 as s10
from minildm.checks import stage11 as s11
from minildm.data import images as data_images

STAGES += (s10, s11)


def sdedit_start(x0, strength, alpha_bar, noise, mistake=None):
    editing.check_strength(strength)
    T_ = len(alpha_bar)
    t0 = {"strength as t": round(strength), "int": int(strength * (T_ - 1)), "times T": round(strength * T_),
          "from the end": T_ - 1 - round(strength * (T_ - 1))}.get(mistake, round(strength * (T_ - 1)))
    index = {"index + 1": t0 + 1, "index - 1": t0 - 1}.get(mistake, t0)
    ab = alpha_bar[index]
    if mistake == "no sqrt":
        return t0, (ab * x0 + (1 - ab) * noise).float()
    if mistake == "swapped":
        return t0, (ab.sqrt() * noise + (1 - ab).sqrt() * x0).float()
    if mistake == "unit noise":
        return t0, (ab.sqrt() * x0 + noise).float()
    return t0, (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()


def sdedit_start_without_checks(x0, strength, alpha_bar, noise):
    t0 = round(min(max(strength, 0.0), 1.0) * (len(alpha_bar) - 1))
    return t0, (alpha_bar[t0].sqrt() * x0 + (1 - alpha_bar[t0]).sqrt() * noise).float()


def sdedit_start_in_place(x0, strength, alpha_bar, noise):
    t0, x = sdedit_start(x0, strength, alpha_bar, noise)
    return t0, x0.copy_(x)


def replace_known(x_t, x0, mask, t, alpha_bar, noise, mistake=None):
    index = {"t - 1": t - 1, "t + 1": t + 1, "t[0]": t[:1].expand(len(t))}.get(mistake, t)
    ab = alpha_bar[index].view(-1, *[1] * (x0.ndim - 1))
    known = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float() if mistake != "no sqrt" else \
        (ab * x0 + (1 - ab) * noise).float()
    if mistake == "clean":
        known = x0
    if mistake == "inverted":
        return (1 - mask) * x_t + mask * known
    if mistake == "fresh noise":
        return mask * noise + (1 - mask) * known
    return mask * x_t + (1 - mask) * known


def replace_known_4d_only(x_t, x0, mask, t, alpha_bar, noise):
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return mask * x_t + (1 - mask) * (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()


def replace_known_in_place(x_t, x0, mask, t, alpha_bar, noise):
    return x_t.copy_(replace_known(x_t, x0, mask, t, alpha_bar, noise))


def inpainting_input(z_t, pixel_mask, images, encode, mistake=None):
    pool = {"avg": F.adaptive_avg_pool2d, "nearest": lambda m, s: F.interpolate(m, size=s, mode="nearest")}.get(
        mistake, F.adaptive_max_pool2d)
    m = pool(pixel_mask, z_t.shape[-2:])
    shown = {"unmasked": images, "inverted image": images * pixel_mask}.get(mistake, images * (1 - pixel_mask))
    latents = encode(shown)
    parts = {"condition first": [m, latents, z_t], "swapped": [z_t, latents, m], "inverted mask": [z_t, 1 - m, latents],
             "no mask": [z_t, latents], "condition only": [m, latents]}.get(mistake, [z_t, m, latents])
    return torch.cat(parts, dim=1)


STAGE10 = [
    (s10.check_sdedit_start, sdedit_start, [
        (lambda *a: sdedit_start(*a, mistake="strength as t"), "strength as the timestep itself"),
        (lambda *a: sdedit_start(*a, mistake="int"), "int\\(\\) cuts the fraction off"),
        (lambda *a: sdedit_start(*a, mistake="times T"), "off by one|raised IndexError.*T - 1"),
        (lambda *a: sdedit_start(*a, mistake="from the end"), "wrong end"),
        (lambda *a: sdedit_start(*a, mistake="index + 1"), "alpha_bar\\[t0 \\+ 1\\]"),
        (lambda *a: sdedit_start(*a, mistake="index - 1"), "alpha_bar\\[t0 - 1\\]"),
        (lambda *a: sdedit_start(*a, mistake="no sqrt"), "square roots are missing"),
        (lambda *a: sdedit_start(*a, mistake="swapped"), "swapped coefficients"),
        (lambda *a: sdedit_start(*a, mistake="unit noise"), "without its weight"),
        (lambda x0, s, ab, n: (round(s * (len(ab) - 1)), x0), "the guide itself"),
        (lambda x0, s, ab, n: (round(s * (len(ab) - 1)), n), "noise alone"),
        (lambda x0, s, ab, n: sdedit_start(x0, s, ab, n)[1], "return two things"),
        (lambda x0, s, ab, n: (s * (len(ab) - 1), sdedit_start(x0, s, ab, n)[1]), "integer timestep"),
        (sdedit_start_in_place, "changed x0 in place"),
        (sdedit_start_without_checks, "raise a ValueError"),
        (lambda x0, s, ab, n: (sdedit_start(x0, s, ab, n)[0], 1.001 * sdedit_start(x0, s, ab, n)[1]), "values are off"),
    ]),
    (s10.check_replace_known, replace_known, [
        (lambda *a: replace_known(*a, mistake="inverted"), "mask is inverted"),
        (lambda *a: replace_known(*a, mistake="clean"), "clean original x0"),
        (lambda *a: replace_known(*a, mistake="t - 1"), "alpha_bar\\[t - 1\\]"),
        (lambda *a: replace_known(*a, mistake="t + 1"), "alpha_bar\\[t \\+ 1\\]"),
        (lambda *a: replace_known(*a, mistake="t[0]"), "first sample's timestep"),
        (lambda *a: replace_known(*a, mistake="no sqrt"), "square roots are missing"),
        (lambda *a: replace_known(*a, mistake="fresh noise"), "the hole holds fresh noise"),
        (lambda x_t, x0, m, t, ab, n: replace_known(x0, x0, 0 * m, t, ab, n), "q\\(x_t \\| x0\\) everywhere"),
        (lambda x_t, x0, m, t, ab, n: x_t.clone(), "x_t unchanged"),
        (replace_known_4d_only, "got \\(4, 1, 4, 2\\).*view\\(-1"),
        (replace_known_in_place, "changed x_t in place"),
        (lambda *a: 1.001 * replace_known(*a), "values are off"),
    ]),
    (s10.check_inpainting_input, lambda z, m, x, e: torch.cat(
        [z, conditioned.inpainting_condition(x, m, types.SimpleNamespace(encode_latents=e))], 1), [
        (lambda *a: inpainting_input(*a, mistake="unmasked"), "encoded the whole images"),
        (lambda *a: inpainting_input(*a, mistake="inverted image"), "inverted in the image"),
        (lambda *a: inpainting_input(*a, mistake="condition first"), "wrong order"),
        (lambda *a: inpainting_input(*a, mistake="swapped"), "two parts are swapped"),
        (lambda *a: inpainting_input(*a, mistake="inverted mask"), "latent mask is inverted"),
        (lambda *a: inpainting_input(*a, mistake="avg"), "shrunk by averaging"),
        (lambda *a: inpainting_input(*a, mistake="nearest"), "nearest-neighbour"),
        (lambda *a: inpainting_input(*a, mistake="no mask"), "got 4 channels"),
        (lambda *a: inpainting_input(*a, mistake="condition only"), "got 3 channels"),
        (lambda z, m, x, e: torch.cat([z, F.adaptive_max_pool2d(m, 4), z], 1), "encode was never called"),
        (lambda *a: inpainting_input(*a) * 1.01, "values are off"),
    ]),
]



def test_stage10_sdedit_start_matches_what_img2img_starts_from():
    """The checker's rule, t0 = round(strength (T - 1)) and q(x_t0 | x0), is the package's: img2img's first timestep
    (sdedit_timesteps) and its start x_start = schedule.q_sample(x0, t0, noise)."""
    schedule = schedules.NoiseSchedule.from_name("cosine", 50)
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    for strength in (0.1, 0.62, 1.0):
        t0, x = sdedit_start(x0, strength, schedule.alpha_bar, noise)
        assert t0 == editing.sdedit_timesteps(50, strength, 10)[0]
        torch.testing.assert_close(x, schedule.q_sample(x0, t0, noise))


def image_transform(image_size, channels, mistake=None):
    to_channels = T.Grayscale(1) if channels == 1 else T.Lambda(lambda im: im.convert("RGB"))
    resize = {"squash": T.Resize((image_size, image_size), antialias=True), "crop only": T.Lambda(lambda im: im),
              "nearest": T.Resize(image_size, interpolation=T.InterpolationMode.NEAREST),
              "no crop": T.Resize(image_size)}.get(mistake, T.Resize(image_size, antialias=True))
    crop = T.Lambda(lambda x: x) if mistake == "no crop" else T.CenterCrop(image_size)
    values = {"unit": [T.ToTensor()], "mnist": [T.ToTensor(), T.Normalize([0.1307] * channels, [0.3081] * channels)],
              "uint8": [T.PILToTensor()], "inverted": [T.ToTensor(), T.Lambda(lambda x: 1 - 2 * x)]}.get(
        mistake, [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])
    return T.Compose([to_channels, resize, crop, *values])


def image_transform_tensor_resize(image_size, channels):
    """Resizing the float tensor instead of the PIL image: within the checker's tolerance."""
    to_channels = T.Grayscale(1) if channels == 1 else T.Lambda(lambda im: im.convert("RGB"))
    return T.Compose([to_channels, T.ToTensor(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
                      T.Normalize([0.5] * channels, [0.5] * channels)])


def image_transform_mean_grey(image_size, channels):
    if channels == 3:
        return image_transform(image_size, 3)
    return T.Compose([image_transform(image_size, 3), T.Lambda(lambda x: x.mean(0, keepdim=True))])


def class_accuracy(logits, asked, mistake=None):
    if len(logits) != len(asked):
        raise ValueError("logits and asked labels differ in length")
    if len(asked) and (asked.min() < 0 or asked.max() >= logits.shape[1]):
        raise ValueError("labels must lie in 0..K-1")
    acc, per = s11.reference_class_accuracy(logits, asked)
    if mistake == "class mean":
        acc = per.nanmean().item()
    if mistake == "zero":
        per = per.nan_to_num(0.0)
    return acc, per


def class_accuracy_by_prediction(logits, asked):
    pred, K = logits.argmax(1), logits.shape[1]
    right = (pred == asked).float()
    return right.mean().item(), torch.bincount(pred, weights=right, minlength=K).float() / torch.bincount(
        pred, minlength=K)


def fd_ratio(samples, real, reference, fd):
    floor = fd(real, reference)
    if floor <= 0:
        raise ValueError("the floor FD(real, reference) is 0: real and reference must be different images")
    return fd(samples, reference) / floor


STAGE11 = [
    (s11.check_image_transform, image_transform, [
        (lambda s, c: image_transform(s, c, "unit"), "values are in \\[0, 1\\]"),
        (lambda s, c: image_transform(s, c, "mnist"), "MNIST's mean and std"),
        (lambda s, c: image_transform(s, c, "uint8"), "uint8"),
        (lambda s, c: image_transform(s, c, "inverted"), "inverted"),
        (lambda s, c: image_transform(s, c, "squash"), "squashed"),
        (lambda s, c: image_transform(s, c, "crop only"), "cropped without resizing"),
        (lambda s, c: image_transform(s, c, "nearest"), "nearest neighbour"),
        (lambda s, c: image_transform(s, c, "no crop"), "not square"),
        (lambda s, c: image_transform(s, 1), "repeated into three"),
        (lambda s, c: T.Compose([image_transform(s, c), T.Lambda(lambda x: x[0])]), "channel dimension is missing"),
        (image_transform_mean_grey, "averaging R, G and B"),
        (lambda s, c: T.Compose([T.Grayscale(c), T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)]), "not resized"),
        (lambda s, c: image_transform(s, c)(Image.new("L", (s, s))), "return the transform itself"),
        (lambda s, c: T.Compose([image_transform(s, c), T.Lambda(lambda x: x.numpy())]), "returned a ndarray"),
        (lambda s, c: T.Compose([image_transform(s, c), T.Lambda(lambda x: x * 0.9)]), "values are off"),
    ]),
    (s11.check_class_accuracy, class_accuracy, [
        (lambda *a: class_accuracy(*a, mistake="class mean"), "mean of the per-class accuracies"),
        (lambda *a: (1 - class_accuracy(*a)[0], class_accuracy(*a)[1]), "error rate"),
        (lambda lg, y: (float((lg.argmax(1) == y).sum()), class_accuracy(lg, y)[1]), "a count"),
        (lambda lg, y: (lg.softmax(1)[torch.arange(len(y)), y].mean().item(), class_accuracy(lg, y)[1]),
         "mean probability"),
        (lambda lg, y: (torch.tensor(class_accuracy(lg, y)[0]), class_accuracy(lg, y)[1]), "Python float"),
        (lambda lg, y: ((lg.argmax(0) == y).float().mean().item(), None), "raised RuntimeError.*argmax\\(dim=1\\)"),
        (class_accuracy_by_prediction, "precision"),
        (lambda *a: class_accuracy(*a, mistake="zero"), "never asked got 0"),
        (lambda lg, y: (class_accuracy(lg, y)[0], class_accuracy(lg, y)[1] * torch.bincount(y, minlength=lg.shape[1])),
         "counts of right samples"),
        (lambda lg, y: class_accuracy(lg, y)[0], "return two things"),
        (lambda lg, y: s11.reference_class_accuracy(lg, y), "raise a ValueError"),
    ]),
    (s11.check_fd_ratio, fd_ratio, [
        (lambda s, r, ref, fd: fd(r, ref) / fd(s, ref), "upside down"),
        (lambda s, r, ref, fd: fd(s, r) / fd(r, ref), "compared with the real half"),
        (lambda s, r, ref, fd: fd(s, ref) - fd(r, ref), "a difference"),
        (lambda s, r, ref, fd: fd(s, ref), "samples' FD alone"),
        (lambda s, r, ref, fd: fd(s, ref) / max(fd(r, r), 1e-9), "compared a feature set with itself"),
        (lambda s, r, ref, fd: torch.tensor([fd(s, ref) / fd(r, ref)]) * 1.01, "expected FD"),
        (lambda s, r, ref, fd: fd(s, ref) / fd(r, ref) if fd(r, ref) else float("inf"), "raise a ValueError"),
        (lambda s, r, ref, fd: [fd(s, ref) / fd(r, ref)], "one Python float"),
    ]),
]



def test_stage11_transform_within_tolerance_passes(capsys):
    """Resizing the float tensor instead of the PIL image is a fine answer (under 0.01 from the package's)."""
    s11.check_image_transform(image_transform_tensor_resize)
    assert capsys.readouterr().out.startswith("PASS")


def test_stage11_reference_class_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    acc, per = s11.reference_class_accuracy(logits, torch.tensor([0, 1, 0, 0]))  # read 0, 1, 2, 0
    assert acc == 0.75 and per[:2].tolist() == pytest.approx([2 / 3, 1.0]) and per[2].isnan()


def test_stage11_transform_reference_is_the_package_pipeline():
    """The checker's reference is data/images.py's decoding plus to_float: 28 px grey -> 32 px in [-1, 1]."""
    image = Image.fromarray(torch.arange(28 * 28).remainder(256).to(torch.uint8).view(28, 28).numpy(), "L")
    got = s11.reference_transform(32, 1)(image)
    assert got.shape == (1, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, data_images.image_transform(32, 1)(image).float() / 127.5 - 1)


@pytest.mark.parametrize("checker, correct", [(c, answer) for c, answer, _ in STAGE10 + STAGE11],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_stage10_11_checkers_call_the_guard_first(checker, correct, real_guard):
    with pytest.raises(ExerciseError, match="expected your own function"):
        checker(correct)


def test_stage10_11_checkers_leave_the_global_random_state_alone():
    torch.manual_seed(0)
    for checker, correct, _ in STAGE10 + STAGE11:
        checker(correct)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


# ---- every checker above: the correct answer passes, the unfilled stub and each named mistake fail --------------


@pytest.mark.parametrize("checker, correct, wrong",
                         STAGE02 + CHECKERS + STAGE07 + STAGE08 + STAGE09 + STAGE01_06 + STAGE10 + STAGE11,
                         ids=lambda x: getattr(x, "__name__", ""))
def test_checker_accepts_a_correct_answer_and_rejects_wrong_ones(checker, correct, wrong, capsys):
    checker(correct)
    assert capsys.readouterr().out.startswith("PASS")
    with pytest.raises(ExerciseError, match="not implemented yet"):
        checker(unfilled)
    for answer, message in wrong:
        with pytest.raises(ExerciseError, match=message):
            checker(answer)
