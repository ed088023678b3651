"""Stage 10 (minildm/applications): inpainting, RePaint, SDEdit with exact denoisers whose answers are known in closed
form; conditioning by concatenation; every bad input the issue lists."""

import itertools
import math

import pytest
import torch

from minildm.applications import (
    check_mask,
    check_prompts,
    img2img,
    inpaint,
    latent_mask,
    repaint_path,
    sdedit_timesteps,
)
from minildm.samplers import SAMPLERS, sample
from minildm.schedules import NoiseSchedule
from minildm.text import WordTokenizer

MU = torch.tensor([1.0, -1.0])
RHO, S1, S2 = 0.9, 1.0, 0.5
COV = torch.tensor([[S1**2, RHO * S1 * S2], [RHO * S1 * S2, S2**2]])
N = 4000


def gaussian_oracle(schedule, mu=MU, cov=COV):
    """The exact eps-denoiser of x0 ~ N(mu, cov) in 2-d: E[x0 | x_t] = mu + a cov (a^2 cov + b^2 I)^-1 (x_t - a mu)."""
    alpha_bar = schedule.alpha_bar.float()

    def model(x_t, t, context=None):
        ab = alpha_bar[t][:, None, None]  # (B, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        gain = a * cov @ torch.linalg.inv(ab * cov + b**2 * torch.eye(2))  # (B, 2, 2)
        x0 = mu + (gain @ (x_t - a[:, 0] * mu)[..., None])[..., 0]
        return (x_t - a[:, 0] * x0) / b[:, 0]

    return model


def constant_oracle(schedule, c=0.25):
    """The exact eps-denoiser of data that are the constant c everywhere: x0_hat = c whatever x_t is."""
    alpha_bar = schedule.alpha_bar.float()

    def model(x_t, t, context=None):
        ab = alpha_bar[t].view(-1, *[1] * (x_t.ndim - 1))
        return (x_t - ab.sqrt() * c) / (1 - ab).sqrt()

    return model


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("linear", 100)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- inpainting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_known_region_and_fills_the_hole(sched, sampler):
    x0 = torch.rand(3, 3, 8, 8, generator=gen(1)) * 2 - 1  # anything but the constant the model knows
    mask = torch.zeros(3, 8, 8)
    mask[:, 2:6, 3:7] = 1  # the hole
    out = inpaint(constant_oracle(sched), x0, mask, sched, sampler=sampler, steps=10, generator=gen())
    keep = mask[:, None].expand_as(x0) == 0
    assert torch.equal(out[keep], x0[keep])  # the kept region is the original, exactly
    torch.testing.assert_close(out[~keep], torch.full_like(out[~keep], 0.25), atol=1e-4, rtol=0)  # filled


def test_inpainting_samples_close_to_the_exact_conditional_and_repaint_closes_the_gap(sched):
    """Known x1 = 2 of a correlated Gaussian (rho = 0.9): the hole x2 should follow N(mu2 + rho s2/s1 (x1 - mu1),
    s2^2 (1 - rho^2)) = N(-0.55, 0.218^2). Replacement is known to be biased (the known part is noised without
    regard to the hole); RePaint's resampling must cut that bias by more than half (measured 0.061 -> 0.017)."""
    x0 = torch.stack([torch.full((N,), 2.0), torch.zeros(N)], dim=1)
    mask = torch.tensor([0.0, 1.0]).expand(N, 2)
    mean, std = MU[1] + RHO * S2 / S1 * (2.0 - MU[0]), S2 * math.sqrt(1 - RHO**2)
    plain = inpaint(gaussian_oracle(sched), x0, mask, sched, steps=50, generator=gen())
    repaint = inpaint(gaussian_oracle(sched), x0, mask, sched, steps=50, resample=5, jump=5, generator=gen())
    assert (plain[:, 0] == 2.0).all() and (repaint[:, 0] == 2.0).all()
    err_plain, err_repaint = (plain[:, 1].mean() - mean).abs(), (repaint[:, 1].mean() - mean).abs()
    assert err_plain < 0.15 and err_repaint < err_plain / 2, (err_plain, err_repaint)
    assert err_repaint < 5 * std / math.sqrt(N) + 0.02
    assert abs(repaint[:, 1].std() / std - 1) < 0.2


def test_repaint_path_goes_down_back_up_and_down_again():
    assert repaint_path(5, 10, 1) == [0, 1, 2, 3, 4, 5]
    assert repaint_path(4, 2, 2) == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4]
    path = repaint_path(50, 5, 5)
    assert path[-1] == 50 and all(abs(a - b) == 1 for a, b in itertools.pairwise(path))
    assert sum(b == a + 1 for a, b in itertools.pairwise(path)) == 50 * 5  # each step denoised `resample` times


def test_inpainting_with_guidance_shows_both_branches_the_same_known_region(sched):
    """With classifier-free guidance the model runs on a batch of 2B; both halves must see the same noised known
    region (one noise draw per image), or guidance would amplify the noise difference."""
    seen = []

    def model(x, t, context):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x0, mask = torch.randn(2, 4, 4, 4, generator=gen(2)), torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    ctx, unc = torch.ones(2, 3), torch.zeros(2, 3)
    inpaint(model, x0, mask, sched, sampler="ddim", steps=3, context=ctx, uncond_context=unc, guidance_scale=3.0)
    for x in seen:
        assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])


def test_latent_mask_marks_every_latent_cell_that_touches_the_hole():
    mask = torch.zeros(1, 16, 16)
    mask[0, 5, 9] = 1  # one pixel
    m = latent_mask(mask, 4)
    assert m.shape == (1, 1, 4, 4) and m.sum() == 1 and m[0, 0, 1, 2] == 1


# ---- SDEdit -------------------------------------------------------------------------------------


def test_sdedit_strength_0_returns_the_input_and_strength_1_ignores_it(sched):
    x = torch.randn(5, 2, generator=gen(3))
    assert torch.equal(img2img(gaussian_oracle(sched), x, sched, 0.0), x)
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        full = sample(gaussian_oracle(sched), (5, 2), sched, sampler=sampler, steps=20, generator=gen(4))
        for guide in (x, 10 * x):
            out = img2img(gaussian_oracle(sched), guide, sched, 1.0, sampler=sampler, steps=20, generator=gen(4))
            assert torch.equal(out, full)


def test_sdedit_keeps_the_data_distribution_and_forgets_the_guide_as_strength_grows(sched):
    """Guides drawn from the data, noised to t0 by q(x_t0 | x0), are exactly distributed as x_t0: the exact reverse
    process must return the data distribution at every strength (this fails if the start level and the first step
    disagree), while the output's correlation with its guide falls from 1 to 0."""
    guides = MU + torch.randn(N, 2, generator=gen(5)) @ torch.linalg.cholesky(COV).T
    corr = []
    for strength in (0.2, 0.5, 0.8):
        out = img2img(gaussian_oracle(sched), guides, sched, strength, sampler="ddpm", generator=gen(6))
        assert (out.mean(0) - MU).abs().max() < 5 / math.sqrt(N)
        # DDPM's beta_tilde noise under-disperses a little at T = 100 (7% at most here; see test_samplers.py)
        torch.testing.assert_close(out.std(0), COV.diagonal().sqrt(), rtol=0.1, atol=0)
        corr.append(torch.corrcoef(torch.stack([guides[:, 0], out[:, 0]]))[0, 1].item())
    assert 1 > corr[0] > corr[1] > corr[2] > -0.05, corr


def test_sdedit_timesteps_start_at_strength_times_T():
    assert sdedit_timesteps(100, 0.5, 10) == [50, 38, 25, 13, 0]
    assert sdedit_timesteps(100, 1.0, 100) == list(range(99, -1, -1))
    assert sdedit_timesteps(100, 0.0, 10) == []
    assert sdedit_timesteps(1000, 0.01, 10)[0] == 10  # at least one step


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(2, 8, 8), (3, 1, 8, 8), (3, 2, 16, 16), (16, 16), (3, 16)])
def test_a_mask_of_the_wrong_shape_is_an_error(sched, mask_shape):
    x0 = torch.zeros(3, 4, 16, 16)
    with pytest.raises(ValueError, match=r"mask has shape .* \(3, 1, 16, 16\) or \(3, 16, 16\)"):
        inpaint(constant_oracle(sched), x0, torch.zeros(mask_shape), sched, steps=2)
    assert check_mask(torch.ones(3, 16, 16), x0).shape == (3, 1, 16, 16)


def test_mask_values_outside_0_1_are_an_error(sched):
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        check_mask(torch.full((1, 1, 4, 4), 255.0), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", None])
def test_a_strength_outside_0_1_is_an_error(sched, strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        img2img(gaussian_oracle(sched), torch.zeros(2, 2), sched, strength)


@pytest.mark.parametrize("steps", [0, 101, 2.5])
def test_a_step_count_the_schedule_cannot_provide_is_an_error(sched, steps):
    with pytest.raises(ValueError, match=r"steps must be an int from 1 to T=100"):
        img2img(gaussian_oracle(sched), torch.zeros(2, 2), sched, 0.5, steps=steps)
    with pytest.raises(ValueError, match=r"steps must be an int from 1 to T=100"):
        inpaint(gaussian_oracle(sched), torch.zeros(2, 2), torch.ones(2, 2), sched, steps=steps)
    with pytest.raises(ValueError, match=r"steps must be an int from 1 to T=100"):
        inpaint(gaussian_oracle(sched), torch.zeros(2, 2), torch.ones(2, 2), sched, steps=steps, resample=2)


@pytest.mark.parametrize("scale", [0.5, 0.0, -2.0])
def test_guidance_below_1_is_an_error(sched, scale):
    ctx = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        img2img(gaussian_oracle(sched), torch.zeros(2, 2), sched, 0.5, context=ctx, uncond_context=ctx,
                guidance_scale=scale)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        inpaint(gaussian_oracle(sched), torch.zeros(2, 2), torch.ones(2, 2), sched, context=ctx,
                uncond_context=ctx, guidance_scale=scale)


def test_repaint_needs_ddpm_and_valid_jumps(sched):
    with pytest.raises(ValueError, match="resample=1 for replacement with any sampler"):
        inpaint(gaussian_oracle(sched), torch.zeros(2, 2), torch.ones(2, 2), sched, sampler="ddim", resample=3)
    with pytest.raises(ValueError, match="jump >= 1 and resample >= 1"):
        inpaint(gaussian_oracle(sched), torch.zeros(2, 2), torch.ones(2, 2), sched, resample=3, jump=0)


def test_prompts_with_unknown_words_are_an_error_and_empty_ones_a_warning():
    tok = WordTokenizer(["a", "red", "circle", "at", "the", "left"])
    assert check_prompts(tok, ["a red circle at the left"]) == ["a red circle at the left"]
    with pytest.raises(ValueError, match=r"never saw in training: \['dog', 'purple'\]"):
        check_prompts(tok, ["a purple dog at the left"])
    with pytest.warns(UserWarning, match="prompt 1 is empty"):
        check_prompts(tok, ["a red circle", "  "])
    with pytest.raises(ValueError, match="got 1 prompts for 2 images"):
        check_prompts(tok, ["a red circle"], batch=2)
