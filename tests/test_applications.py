"""Stage 10 (minildm/applications): inpainting, RePaint, SDEdit with exact denoisers whose answers are known in closed
form; conditioning by concatenation; every bad input the issue lists."""

import itertools
import math

import pytest
import torch

from minildm.applications import (
    bicubic_upsample,
    cell_masks,
    check_mask,
    check_prompts,
    concat_recipe,
    condition_channels,
    img2img,
    inpaint,
    inpainting_accuracy,
    latent_mask,
    layout_accuracy,
    layout_condition,
    layout_to_image,
    low_resolution,
    make_condition,
    random_box_masks,
    repaint_path,
    sample_concat,
    sdedit_timesteps,
    super_resolve,
    train_concat,
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
    regard to the hole); RePaint's resampling must cut that bias by more than half (measured 0.062 -> 0.017 at 50 steps)."""
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


def test_sdedit_runs_every_sampler_from_the_noised_guide(sched):
    """Strength 0.5, 20 of 40 steps, with each sampler: the data distribution comes back (within each method's
    discretisation error: the second-order ones to 3%, DDPM's large respaced steps 12%), and the deterministic ones,
    solving one ODE from the same noised guides, agree on how much of the guide is left (correlation 0.25)."""
    guides = MU + torch.randn(N, 2, generator=gen(5)) @ torch.linalg.cholesky(COV).T
    corr = {}
    for sampler, rtol in {"ddpm": 0.12, "ddim": 0.07, "euler": 0.07, "heun": 0.03, "dpmpp_2m": 0.03}.items():
        out = img2img(gaussian_oracle(sched), guides, sched, 0.5, sampler=sampler, steps=40, generator=gen(6))
        assert (out.mean(0) - MU).abs().max() < 0.05, sampler
        torch.testing.assert_close(out.std(0), COV.diagonal().sqrt(), rtol=rtol, atol=0, msg=sampler)
        corr[sampler] = torch.corrcoef(torch.stack([guides[:, 0], out[:, 0]]))[0, 1].item()
    ode = [corr[s] for s in ("ddim", "euler", "heun", "dpmpp_2m")]
    assert max(ode) - min(ode) < 0.01 and 0.15 < ode[0] < 0.35, corr


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


# ---- conditioning by concatenation --------------------------------------------------------------


def tiny_task(kind=None, latent_channels=4):
    """A DiffusionTask of a tiny denoiser, with `kind`'s extra input channels (None: plain text-to-image)."""
    from dataclasses import replace

    from minildm.config import diffusion_recipe
    from minildm.pipeline import DiffusionTask

    recipe = diffusion_recipe("latent", fast=True, latent_shape=(latent_channels, 8, 8))
    unet = replace(recipe.unet, base_channels=16, heads=2)
    if kind is not None:
        unet = replace(unet, in_channels=latent_channels + condition_channels(kind, latent_channels),
                       out_channels=latent_channels)
    return DiffusionTask(unet, recipe.text, replace(recipe.diffusion, concat=kind))


def shapes_batch(n=3, size=32):
    from minildm.data.shapes import ShapesConfig, ShapesDataset

    return ShapesDataset(ShapesConfig(image_size=size, seed=5)).batch(range(n))


def tiny_autoencoder(size=32):
    from minildm.autoencoder import Autoencoder, AutoencoderConfig

    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(image_size=size, base_channels=8, channel_mult=(1, 2, 2),
                                         num_res_blocks=1)).eval()


@pytest.mark.parametrize(("kind", "channels"), [("inpainting", 5), ("super_resolution", 3), ("layout", 7)])
def test_each_condition_has_its_channels_on_the_latent_grid(kind, channels):
    batch, z, ae = shapes_batch(), torch.randn(3, 4, 8, 8, generator=gen(7)), tiny_autoencoder()
    cond = make_condition(kind, ae, drop=0.0)(0, batch, z)  # (the dropout for guidance: its own test)
    assert condition_channels(kind) == channels and cond.shape == (3, channels, 8, 8)
    if kind == "inpainting":  # [m, E(x (1 - m_x))] with the step's random holes; the same holes on a resume
        holes = random_box_masks(3, 32, torch.Generator().manual_seed(0))  # (3, 1, 32, 32)
        assert torch.equal(cond[:, :1], latent_mask(holes, 8)) and 0 < holes.mean() < 0.6
        with torch.no_grad():
            torch.testing.assert_close(cond[:, 1:], ae.encode_latents(batch["image"] * (1 - holes)))
            assert not torch.allclose(cond[:, 1:], ae.encode_latents(batch["image"]))
        assert not torch.equal(make_condition(kind, ae)(1, batch, z), cond)
        with pytest.raises(ValueError, match="encodes the masked image"):
            make_condition(kind)
    if kind == "super_resolution":  # 4x4 block means of the 32 px images
        torch.testing.assert_close(cond[0, :, 1, 2], batch["image"][0, :, 4:8, 8:12].mean((1, 2)))
    if kind == "layout":  # fractions of each cell covered by background and each shape
        torch.testing.assert_close(cond.sum(1), torch.ones(3, 8, 8))
        assert torch.equal(cond.argmax(1) > 0, layout_condition(batch["mask"], 8).argmax(1) > 0)


def test_the_denoiser_reads_its_condition_as_extra_input_channels():
    denoiser = tiny_task("inpainting").denoiser
    x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), denoiser.tokenize(["a red circle", ""])
    assert denoiser.concat_channels == 5 and denoiser(x, t, ids, concat=torch.randn(2, 5, 8, 8)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"reads 5 extra input channels by concatenation.*\(2, 5, 8, 8\), got none"):
        denoiser(x, t, ids)
    with pytest.raises(ValueError, match=r"pass concat of shape \(2, 5, 8, 8\), got \(2, 3, 8, 8\)"):
        denoiser(x, t, ids, concat=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"reads 0 extra input channels"):
        tiny_task().denoiser(x, t, ids, concat=torch.randn(2, 5, 8, 8))


def test_a_widened_denoiser_starts_as_the_text_to_image_model():
    base = perturbed(tiny_task().denoiser)
    widened = tiny_task("layout").denoiser
    widened.load_widened(base)
    x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), base.tokenize(["a red circle", "a blue ring"])
    expected = base(x, t, ids)
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(widened(x, t, ids, concat=torch.rand(2, 7, 8, 8)), expected)
    with pytest.raises(ValueError, match="cannot widen conv_in"):
        tiny_task(latent_channels=3).denoiser.load_widened(widened)


def perturbed(denoiser):
    """A stand-in for a trained model: every weight moved at random (a fresh UNet's zero-initialised output layer
    would make its output, and every gradient below it, exactly zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return denoiser


def test_training_with_a_concatenated_condition_reaches_the_new_channels():
    """The loss of a batch with "concat" goes through the condition: after widening a trained model, the new input
    channels have zero weights but a gradient, so they learn to read the condition."""
    task = tiny_task("super_resolution")
    task.denoiser.load_widened(perturbed(tiny_task().denoiser))
    batch = {"x": torch.randn(4, 4, 8, 8), "caption": ["a red circle"] * 4, "concat": torch.randn(4, 3, 8, 8)}
    losses, logs = task.losses(batch, 0)
    losses["denoiser"].backward()
    weight = task.denoiser.unet.conv_in.weight  # (base, 4 + 3, 3, 3)
    assert torch.isfinite(logs["loss"]) and (weight[:, 4:] == 0).all() and weight.grad[:, 4:].abs().sum() > 0


def test_train_concat_resumes_from_its_checkpoint(tmp_path):
    """Two training steps through `train_concat` (the Trainer, a batch feeder with the condition), then a second call
    loads the finished checkpoint instead of training again (same weights)."""
    from dataclasses import replace

    from minildm.autoencoder import Autoencoder, AutoencoderConfig
    from minildm.config import diffusion_recipe
    from minildm.data.shapes import ShapesConfig
    from minildm.device import Runtime
    from minildm.train import TrainConfig

    rt = Runtime(torch.device("cpu"), torch.float32, fast=True)
    ae = Autoencoder(AutoencoderConfig(image_size=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1)).eval()
    recipe = concat_recipe("layout", ae.cfg.latent_shape, fast=True)
    recipe.unet = replace(recipe.unet, base_channels=16, heads=2)
    recipe.train, recipe.data = TrainConfig(steps=2, batch_size=2, log_every=1, ckpt_every=2), ShapesConfig(16)
    assert recipe.unet.in_channels == 11 and recipe.unet.out_channels == 4 and recipe.diffusion.concat == "layout"
    assert diffusion_recipe("latent", fast=True).diffusion.concat is None
    base = tiny_task().denoiser
    d1, _, history = train_concat("layout", rt, tmp_path / "layout.pt", ae, init_from=base, recipe=recipe,
                                  progress=False)
    d2, _, _ = train_concat("layout", rt, tmp_path / "layout.pt", ae, recipe=recipe, progress=False)
    assert history[-1]["step"] == 2
    for (k, v1), v2 in zip(d1.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_super_resolution_and_layout_refuse_inputs_of_the_wrong_size():
    from minildm.autoencoder import Autoencoder, AutoencoderConfig
    from minildm.device import Runtime

    rt = Runtime(torch.device("cpu"), torch.float32, fast=True)
    ae = Autoencoder(AutoencoderConfig(image_size=32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1))
    denoiser, schedule = tiny_task("super_resolution").denoiser, NoiseSchedule.from_name("linear", 100)
    for low in (torch.zeros(2, 3, 16, 16), torch.zeros(2, 1, 8, 8), torch.zeros(3, 8, 8)):
        with pytest.raises(ValueError, match=r"takes low-resolution images \(B, 3, 8, 8\)"):
            super_resolve(denoiser, schedule, low, rt, ae)
    with pytest.raises(ValueError, match=r"a layout must be a Shapes mask \(B, 32, 32\)"):
        layout_to_image(denoiser, schedule, torch.zeros(2, 16, 16, dtype=torch.long), rt, ae)
    with pytest.raises(ValueError, match=r"layout class ids must lie in 0..6"):
        layout_condition(torch.full((1, 32, 32), 9), 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        low_resolution(torch.zeros(1, 3, 30, 30), 4)
    with pytest.raises(ValueError, match="unknown concatenated condition 'depth'"):
        concat_recipe("depth", fast=True)
    # the same prompt and guidance checks as the editing functions
    low = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="never saw in training"):
        super_resolve(denoiser, schedule, low, rt, ae, captions=["a red dragon", "a circle"])
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        super_resolve(denoiser, schedule, low, rt, ae, guidance_scale=0.5)


# ---- scores -------------------------------------------------------------------------------------


def test_scores_are_perfect_for_a_perfect_reading_and_split_by_the_hole():
    from minildm.judge import cell_labels

    batch = shapes_batch(6, 48)
    attrs = batch["attributes"]
    perfect = cell_labels(attrs)
    assert layout_accuracy(perfect, attrs)["objects"] == 1.0 and layout_accuracy(perfect, attrs)["cells"] == 1.0
    empty = torch.full_like(perfect, -1)
    assert layout_accuracy(empty, attrs)["objects"] == 0.0
    colour_off = perfect.clone()
    colour_off[..., 1] = (colour_off[..., 1] + 1) % 6  # a layout says nothing about colour
    assert layout_accuracy(colour_off, attrs)["objects"] == 1.0
    # inside / outside: wipe the first object's cell from the reading: inside 0, outside untouched
    wiped = perfect.clone()
    wiped[torch.arange(6), attrs[:, 0, 3]] = -1
    scores = inpainting_accuracy(wiped, attrs)
    assert scores["inside"] == 0.0 and scores["outside"] in (1.0, math.nan) and scores["inside_objects"] == 6
    # the hole of the first object is its grid cell: 16 x 16 px at 48 px
    masks = cell_masks(attrs, 48)
    assert masks.shape == (6, 48, 48) and (masks.sum((1, 2)) == 256).all()
    row, col = divmod(int(attrs[0, 0, 3]), 3)
    assert masks[0, 16 * row + 8, 16 * col + 8] == 1


def test_image_level_editing_pastes_the_kept_pixels_and_checks_its_inputs():
    """inpaint_images / img2img_images / inpaint_with_model on a tiny untrained pipeline: shapes, the pixels outside
    the hole exactly the original ones, and the bad inputs the issue lists."""
    from minildm.applications import img2img_images, inpaint_images, inpaint_with_model
    from minildm.autoencoder import Autoencoder, AutoencoderConfig
    from minildm.device import Runtime

    rt = Runtime(torch.device("cpu"), torch.float32, fast=True)
    ae = Autoencoder(AutoencoderConfig(image_size=32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1)).eval()
    schedule = NoiseSchedule.from_name("scaled_linear", 100)
    batch = shapes_batch(2, 32)
    images, hole = batch["image"], cell_masks(batch["attributes"], 32)
    for denoiser, edit in ((tiny_task().denoiser, inpaint_images), (tiny_task("inpainting").denoiser, None)):
        if edit is None:
            out = inpaint_with_model(denoiser, schedule, images, hole, rt, ae, captions=batch["caption"], steps=3)
        else:
            out = edit(denoiser, schedule, images, hole, batch["caption"], rt, ae, sampler="ddim", steps=3)
        assert out.shape == images.shape
        keep = (hole == 0)[:, None].expand_as(images)
        assert torch.equal(out[keep], images[keep]) and not torch.equal(out[~keep], images[~keep])
    denoiser = tiny_task().denoiser
    out = img2img_images(denoiser, schedule, images, ["a big red circle at the center"] * 2, 0.5, rt, ae, steps=4)
    assert out.shape == images.shape and out.abs().max() <= 1
    with pytest.raises(ValueError, match="strength must be a number in"):
        img2img_images(denoiser, schedule, images, batch["caption"], 2.0, rt, ae)
    with pytest.raises(ValueError, match=r"never saw in training: \['unicorn'\]"):
        img2img_images(denoiser, schedule, images, ["a unicorn", "a red circle"], 0.5, rt, ae)
    with pytest.raises(ValueError, match="mask has shape"):
        inpaint_images(denoiser, schedule, images, hole[:, :16], batch["caption"], rt, ae)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        inpaint_images(denoiser, schedule, images, hole, batch["caption"], rt, ae, guidance_scale=0.0)
    with pytest.raises(ValueError, match="steps must be an int from 1 to T=100"):
        inpaint_images(denoiser, schedule, images, hole, batch["caption"], rt, ae, steps=1000)
    with pytest.warns(UserWarning, match="prompt 0 is empty"):
        img2img_images(denoiser, schedule, images, ["", "a red circle"], 0.3, rt, ae, steps=2)


def test_sample_starts_from_x_start_when_given(sched):
    """`sample(..., x_start=x)` continues from x at the first timestep (what SDEdit needs); a misshapen x is an error."""
    x = torch.randn(3, 2, generator=gen(8))
    zero_model = constant_oracle(sched, c=0.0)
    out = sample(zero_model, (3, 2), sched, sampler="ddim", steps=[0], x_start=x)  # one step from t = 0
    torch.testing.assert_close(out, torch.zeros(3, 2))  # the model's x0 guess, whatever x was
    a = sched.alpha_bar[10].sqrt().item()
    out = sample(lambda x_t, t, c=None: torch.zeros_like(x_t), (3, 2), sched, sampler="ddim", steps=[10], x_start=x)
    torch.testing.assert_close(out, x / a)  # eps = 0: x0_hat = x_t / sqrt(alpha_bar_10), so x_start was used
    with pytest.raises(ValueError, match=r"x_start has shape \(2, 2\) but the samples are \(3, 2\)"):
        sample(zero_model, (3, 2), sched, sampler="ddim", steps=5, x_start=torch.zeros(2, 2))


def test_cifar10_photos_feed_super_resolution_without_captions():
    """The CIFAR-10 test split of ../shared/data (skipped without it): batches with empty captions, 8 px inputs, and
    bicubic upsampling as the baseline a super-resolution model must beat (about 22 dB on these photos)."""
    from test_datasets import DATA

    from minildm.applications import bicubic_upsample, captionless_batches
    from minildm.data.datasets import load_dataset
    from minildm.metrics import psnr

    if DATA is None or not (DATA / "cifar10-test").is_dir():
        pytest.skip("no CIFAR-10 test split: expected ../shared/data/cifar10-test or $MINILDM_DATA/cifar10-test")
    photos = load_dataset("imagefolder", DATA / "cifar10-test", image_size=32)
    batch = captionless_batches(photos, 16, "cpu")(0)
    assert batch["image"].shape == (16, 3, 32, 32) and batch["caption"] == [""] * 16
    small = low_resolution(batch["image"], 4)
    assert small.shape == (16, 3, 8, 8)
    assert 15 < psnr(batch["image"], bicubic_upsample(small, 32)).mean() < 35


def test_super_resolution_training_zeroes_a_tenth_of_its_conditions_the_same_way_on_a_resume():
    """Condition dropout for guidance on the low-resolution image: about CONDITION_DROP of the items per batch get
    exact zeros, the others the condition unchanged; the draw is a function of the step alone."""
    from minildm.applications import CONDITION_DROP

    batch, z = shapes_batch(8), torch.zeros(8, 4, 8, 8)
    full = make_condition("super_resolution", drop=0.0)(0, batch, z)
    condition = make_condition("super_resolution")
    zeroed = 0
    for step in range(150):
        c = condition(step, batch, z)
        dropped = c.flatten(1).abs().sum(1) == 0  # (8,)
        torch.testing.assert_close(c[~dropped], full[~dropped])
        zeroed += int(dropped.sum())
        if step < 3:
            assert torch.equal(condition(step, batch, z), c)  # a resumed run draws the same
    p = CONDITION_DROP["super_resolution"]
    assert p == 0.1 and abs(zeroed / 1200 - p) < 4 * (p * (1 - p) / 1200) ** 0.5
    assert CONDITION_DROP["inpainting"] == CONDITION_DROP["layout"] == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 1\); got 1.0"):
        make_condition("super_resolution", drop=1.0)


def record_calls(denoiser) -> list:
    """Make `denoiser` append (x, t, concat), cloned, to the returned list at every call."""
    calls, forward = [], denoiser.forward

    def recording(x, t, ids, concat=None):
        calls.append((x.clone(), t.clone(), concat.clone()))
        return forward(x, t, ids, concat=concat)

    denoiser.forward = recording
    return calls


def test_guidance_on_the_image_condition_gives_the_unconditional_pass_zeros():
    """super_resolve with guidance_scale > 1: one model call per step on [zeros, c] (the unconditional half first, as
    `model_output` orders them); without guidance, one pass on c alone."""
    from minildm.device import Runtime

    rt = Runtime(torch.device("cpu"), torch.float32, fast=True)
    ae, schedule = tiny_autoencoder(32), NoiseSchedule.from_name("linear", 100)
    denoiser = tiny_task("super_resolution").denoiser
    calls = record_calls(denoiser)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    super_resolve(denoiser, schedule, low, rt, ae, guidance_scale=3.0, steps=2)
    seen = [c for _, _, c in calls]
    assert len(seen) == 2 and all(c.shape == (4, 3, 8, 8) for c in seen)
    for c in seen:
        assert torch.equal(c[:2], torch.zeros(2, 3, 8, 8)) and torch.equal(c[2:], low)
    calls.clear()
    super_resolve(denoiser, schedule, low, rt, ae, steps=2)
    seen = [c for _, _, c in calls]
    assert len(seen) == 2 and all(torch.equal(c, low) for c in seen)


def test_super_resolution_can_start_from_the_noised_bicubic_upsampling():
    """strength s < 1: the first model call sees q(z_t0 | z_b) with t0 = round(s (T - 1)) and z_b the latents of the
    bicubic upsampling (noise from the sampler's seeded generator), and sampling takes round(s * steps) steps;
    s = 0 is the autoencoder's reading of the bicubic image without any model call; s = 1 is the plain sampler."""
    from minildm.device import Runtime

    rt = Runtime(torch.device("cpu"), torch.float32, fast=True)
    ae, schedule = tiny_autoencoder(32), NoiseSchedule.from_name("linear", 100)
    denoiser = tiny_task("super_resolution").denoiser
    calls = record_calls(denoiser)
    low = torch.rand(2, 3, 8, 8, generator=gen(3)) * 2 - 1
    with torch.no_grad():
        z_b = ae.encode_latents(bicubic_upsample(low, 32))  # (2, 4, 8, 8)

    out = super_resolve(denoiser, schedule, low, rt, ae, steps=10, strength=0.3)
    t0 = round(0.3 * 99)
    assert len(calls) == 3 and int(calls[0][1][0]) == t0 and all(int(t[0]) < t0 for _, t, _ in calls[1:])
    noise = torch.randn(z_b.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls[0][0], schedule.q_sample(z_b, t0, noise))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1

    calls.clear()
    with torch.no_grad():
        expected = ae.decode_latents(z_b).clamp(-1, 1)
    torch.testing.assert_close(super_resolve(denoiser, schedule, low, rt, ae, strength=0.0), expected)
    assert calls == []

    plain = super_resolve(denoiser, schedule, low, rt, ae, steps=4)
    assert torch.equal(super_resolve(denoiser, schedule, low, rt, ae, steps=4, strength=1.0), plain)
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        super_resolve(denoiser, schedule, low, rt, ae, strength=1.5)
    with pytest.raises(ValueError, match=r"pass start of shape \(2, 4, 8, 8\)"):
        sample_concat(denoiser, schedule, low, rt, ae, strength=0.5)
