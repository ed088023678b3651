"""Stage 2: the autoencoder (minildm/autoencoder.py) and its regularisers (minildm/regularizers.py): KL and VQ
pieces against closed forms, shapes, the latent scale factor, old checkpoints, input errors, and a tiny model that
learns to reconstruct."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from minildm.autoencoder import Autoencoder, AutoencoderConfig, count_parameters
from minildm.checkpoint import save_checkpoint
from minildm.ema import EMA
from minildm.losses import AutoencoderLossConfig
from minildm.regularizers import (
    DiagonalGaussian,
    KLRegularizer,
    VQRegularizer,
    kl_divergence,
    nearest_code,
    reparameterize,
    straight_through,
)


def tiny_cfg(**kw) -> AutoencoderConfig:
    base = {"image_size": 16, "base_channels": 8, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "latent_channels": 4}
    return AutoencoderConfig(**{**base, **kw})


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in (-1, 1): bilinear upsampling of 4x4 noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return torch.tanh(F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False))


# ---------------------------------------------------------------- KL posterior


def test_reparameterize_exact_value():
    mean, logvar, noise = torch.tensor([1.0, -2.0]), torch.log(torch.tensor([4.0, 0.25])), torch.tensor([0.5, 2.0])
    # mean + std * noise with std = (2, 0.5)
    torch.testing.assert_close(reparameterize(mean, logvar, noise), torch.tensor([2.0, -1.0]))


def test_reparameterize_sample_statistics():
    mean = torch.full((1, 1, 400, 500), 0.7)
    logvar = torch.full_like(mean, math.log(0.3**2))
    z = DiagonalGaussian(mean, logvar).sample(generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.7) < 0.003  # standard error 0.3 / sqrt(2e5) = 7e-4
    assert abs(z.std().item() - 0.3) < 0.003


def test_reparameterize_is_differentiable_in_mean_and_logvar():
    mean, logvar = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    noise = torch.tensor([1.0, -1.0, 2.0])
    reparameterize(mean, logvar, noise).sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(3))
    torch.testing.assert_close(logvar.grad, 0.5 * noise)  # d/dlogvar exp(logvar/2) * n = n/2 at logvar=0


def test_kl_is_zero_for_standard_normal():
    z = torch.zeros(2, 4, 3, 3)
    torch.testing.assert_close(kl_divergence(z, z), torch.zeros(2))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    got = kl_divergence(mean, logvar)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_diagonal_gaussian_clamps_logvar_and_splits_moments():
    moments = torch.cat([torch.ones(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1)
    post = DiagonalGaussian.from_moments(moments)
    torch.testing.assert_close(post.mode(), torch.ones(1, 2, 2, 2))
    assert post.logvar[0, 0].eq(-30.0).all() and post.logvar[0, 1].eq(20.0).all()
    assert torch.isfinite(post.kl()).all()


def test_kl_regularizer_matches_the_closed_form_for_a_known_posterior():
    """mean 1, variance 4 everywhere: KL = 1/2 (mean^2 + var - 1 - log var) = 1/2 (4 - log 4) per latent value."""
    mean, logvar = torch.ones(2, 3, 4, 5), torch.full((2, 3, 4, 5), math.log(4.0))
    reg = KLRegularizer(weight=0.1, values_per_position=7)
    enc = reg(torch.cat([mean, logvar], dim=1), sample=False)  # h: (B, 2c, h, w), the mean first
    kl = 0.5 * (4 - math.log(4)) * 3 * 4 * 5  # summed over (c, h, w)
    torch.testing.assert_close(enc.z, mean)  # sample=False: the mode
    torch.testing.assert_close(enc.reg_loss, torch.full((2,), 0.1 * kl / (7 * 4 * 5)))  # / (C H W) of the image
    torch.testing.assert_close(enc.stats["kl"], torch.tensor(kl))
    torch.testing.assert_close(enc.stats["posterior_std"], torch.tensor(2.0))
    assert enc.indices is None and torch.equal(enc.posterior.logvar, logvar)
    torch.manual_seed(3)
    z = reg(torch.cat([mean, logvar], dim=1), sample=True).z
    torch.manual_seed(3)
    torch.testing.assert_close(z, 1 + 2 * torch.randn(2, 3, 4, 5))  # mean + std * eps
    assert reg.decoder_input(z) is z


# ---------------------------------------------------------------- VQ


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g,
                                                                                        dtype=torch.float64)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, codebook).argmin(dim=1).view(2, 5, 6)
    idx = nearest_code(z, codebook)
    assert idx.shape == (2, 5, 6)
    assert torch.equal(idx, expected)


def test_straight_through_forward_value_and_identity_gradient():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4)
    out = straight_through(z, z_q)
    torch.testing.assert_close(out, z_q)
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_vq_regularizer_picks_the_nearest_code_and_its_losses_and_gradients_match_formulas():
    torch.manual_seed(0)
    vq = VQRegularizer(codebook_size=8, dim=3, beta=0.25).eval()  # eval: no codebook bookkeeping
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(8, 3))
    h = torch.randn(2, 3, 4, 4, requires_grad=True)
    enc = vq(h, sample=True)  # sample makes no difference to vq
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # (B H W, C)
    idx = torch.cdist(flat, vq.codebook.detach()).argmin(dim=1)  # (B H W,) nearest code, by brute force
    assert enc.posterior is None and torch.equal(enc.indices, idx.view(2, 4, 4))
    e = vq.codebook.detach()[idx].view(2, 4, 4, 3).permute(0, 3, 1, 2)  # (B, C, H, W) chosen codes
    torch.testing.assert_close(enc.z, e)
    sq = (h.detach() - e).pow(2).mean()
    torch.testing.assert_close(enc.stats["codebook_loss"], sq)
    torch.testing.assert_close(enc.stats["commitment_loss"], 0.25 * sq)
    torch.testing.assert_close(enc.reg_loss, 1.25 * sq)
    # the codebook loss moves only the codes, the commitment loss only the encoder output
    enc.reg_loss.backward(retain_graph=True)
    torch.testing.assert_close(h.grad, 0.25 * 2 * (h.detach() - e) / h.numel())
    per_code = torch.zeros(8, 3).index_add_(0, idx, 2 * (vq.codebook.detach()[idx] - flat) / h.numel())
    torch.testing.assert_close(vq.codebook.grad, per_code)
    h.grad = None
    enc.z.sum().backward()  # straight-through: the decoder's gradient reaches h unchanged
    torch.testing.assert_close(h.grad, torch.ones_like(h))
    torch.testing.assert_close(vq.decoder_input(h.detach()), e)  # latents from elsewhere are snapped too


def test_perplexity_and_usage_uniform_and_single_code():
    vq = VQRegularizer(codebook_size=6, dim=2).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(12.0).view(6, 2))
    uniform = vq.codebook.detach().T.reshape(1, 2, 2, 3)  # every code exactly once
    enc = vq(uniform)
    assert sorted(enc.indices.flatten().tolist()) == list(range(6))
    torch.testing.assert_close(enc.stats["perplexity"], torch.tensor(6.0))
    torch.testing.assert_close(enc.stats["usage"], torch.tensor(1.0))
    single = vq.codebook.detach()[2].view(1, 2, 1, 1).expand(3, 2, 4, 4)
    enc = vq(single)
    assert enc.indices.eq(2).all()
    torch.testing.assert_close(enc.stats["perplexity"], torch.tensor(1.0))
    torch.testing.assert_close(enc.stats["usage"], torch.tensor(1 / 6))


def is_encoder_output(code: torch.Tensor, z: torch.Tensor) -> bool:
    return bool((code == z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])).all(dim=1).any())


def test_first_training_step_initialises_codes_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VQRegularizer(codebook_size=5, dim=2).train()
    z = 3 + torch.rand(2, 2, 3, 3, requires_grad=True)  # far from the initial codes in [-1/5, 1/5]
    vq(z)
    assert all(is_encoder_output(code, z) for code in vq.codebook.detach())


def test_dead_codes_restart_onto_encoder_outputs():
    torch.manual_seed(0)
    vq = VQRegularizer(codebook_size=6, dim=2, restart_every=3).train()
    z = torch.rand(2, 2, 3, 3, requires_grad=True)  # in [0, 1]^2: near codes 0 and 1 below, far from 2..5
    vq(z)  # step 1: data-dependent init; now replace the codebook by one with 4 unreachable codes
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100, 100], [-100, 100], [100, -100], [-50, -50]]))
        vq.steps_unused.zero_()
    vq(z)
    vq(z)  # step 3 checks for dead codes, but codes 2..5 have been unused for 2 < 3 steps only
    assert vq.steps_unused[2:].eq(2).all()
    assert vq.codebook[2, 0] == 100
    for _ in range(3):
        vq(z)  # step 6: unused for 5 >= 3 steps -> moved onto encoder outputs
    for k in range(2, 6):
        assert is_encoder_output(vq.codebook.detach()[k], z), f"code {k} was not moved onto an encoder output"
    torch.testing.assert_close(vq.codebook.detach()[:2], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert vq.steps_unused[2:].lt(3).all()


def test_no_codebook_bookkeeping_in_eval_or_without_grad():
    vq = VQRegularizer(codebook_size=4, dim=2, restart_every=1)
    before = vq.codebook.detach().clone()
    vq.eval()(torch.randn(1, 2, 2, 2))
    with torch.no_grad():
        vq.train()(torch.randn(1, 2, 2, 2))
    assert vq.step.item() == 0
    assert torch.equal(vq.codebook.detach(), before)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_encoder_decoder_shapes_for_each_factor(mult, f, reg):
    cfg = tiny_cfg(channel_mult=mult, regularizer=reg, codebook_size=16, mid_attention=(f == 8))
    assert cfg.downsample_factor == f
    assert cfg.latent_shape == (4, 16 // f, 16 // f)
    ae = Autoencoder(cfg)
    x = smooth_images(2)
    h = ae.encoder(x)
    assert h.shape == (2, 8 if reg == "kl" else 4, 16 // f, 16 // f)  # (mean, logvar) for kl
    out = ae(x)
    assert out.recon.shape == x.shape
    assert out.z.shape == (2, *cfg.latent_shape)
    assert out.reg_loss.shape == ((2,) if reg == "kl" else ())


def test_any_image_size_divisible_by_f_works():
    ae = Autoencoder(tiny_cfg())  # image_size 16, f 4
    x = torch.zeros(1, 3, 24, 32)
    assert ae.encode(x).z.shape == (1, 4, 6, 8)
    assert ae(x).recon.shape == x.shape


def test_kl_encode_returns_weighted_kl_per_pixel_value_and_mode():
    ae = Autoencoder(tiny_cfg(kl_weight=0.5))
    x = smooth_images(3)
    enc = ae.encode(x, sample=False)
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    torch.testing.assert_close(enc.z, mean)
    expected = 0.5 * kl_divergence(mean, logvar.clamp(-30, 20)) / (3 * 16 * 16)
    torch.testing.assert_close(enc.reg_loss, expected)
    torch.testing.assert_close(enc.stats["kl"], kl_divergence(mean, logvar.clamp(-30, 20)).mean())


def test_vq_encode_returns_codes_and_summed_losses():
    ae = Autoencoder(tiny_cfg(regularizer="vq", codebook_size=16)).eval()
    x = smooth_images(2)
    enc = ae.encode(x)
    torch.testing.assert_close(enc.z, ae.regularizer.codebook.detach()[enc.indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(enc.reg_loss, enc.stats["codebook_loss"] + enc.stats["commitment_loss"])


def test_decoder_last_layer_is_the_final_conv_weight():
    ae = Autoencoder(tiny_cfg())
    assert ae.decoder_last_layer is ae.decoder.conv_out.weight
    ae(smooth_images(1)).recon.sum().backward()
    assert ae.decoder_last_layer.grad is not None
    assert count_parameters(ae) == sum(p.numel() for p in ae.parameters())


# ---------------------------------------------------------------- latent scale factor


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_scale_factor_gives_unit_std_latents_and_is_saved(reg):
    torch.manual_seed(0)
    ae = Autoencoder(tiny_cfg(regularizer=reg, codebook_size=16)).eval()
    batches = [smooth_images(4, seed=1), (smooth_images(4, seed=2), torch.zeros(4))]  # tensors or tuples
    s = ae.compute_scale_factor(batches)
    assert s == pytest.approx(ae.scale_factor.item())
    with torch.no_grad():
        z = torch.cat([ae.encode_latents(batches[0]), ae.encode_latents(batches[1][0])])
        z_raw = torch.cat([ae.encode(batches[0], sample=False).z, ae.encode(batches[1][0], sample=False).z])
    assert s == pytest.approx(1 / z_raw.double().std(unbiased=False).item(), rel=1e-5)
    assert z.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    fresh = Autoencoder(ae.cfg)
    fresh.load_state_dict(ae.state_dict())
    assert fresh.scale_factor.item() == pytest.approx(s)


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_encode_decode_latents_round_trip_matches_decode_of_mode(reg):
    torch.manual_seed(0)
    ae = Autoencoder(tiny_cfg(regularizer=reg, codebook_size=16)).eval()
    ae.scale_factor.fill_(0.37)
    x = smooth_images(2)
    with torch.no_grad():
        latents = ae.encode_latents(x)
        z = ae.encode(x, sample=False).z
        torch.testing.assert_close(latents, 0.37 * z)
        torch.testing.assert_close(ae.decode_latents(latents), ae.decode(z), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- checkpoints from before regularizers.py


def old_layout(state: dict) -> dict:
    """A state dict as saved before the regularisers were modules: the VQ weights under `quantizer.`."""
    return {k.replace("regularizer.", "quantizer."): v for k, v in state.items()}


def test_old_vq_state_dicts_and_ema_states_load_with_the_right_weights(tmp_path):
    from minildm.pipeline import AutoencoderTask, load_autoencoder

    cfg = tiny_cfg(regularizer="vq", codebook_size=16)
    torch.manual_seed(0)
    ae = Autoencoder(cfg)
    ae(smooth_images(2))  # a training-mode forward: data-dependent codebook, counters move
    ae.eval().scale_factor.fill_(0.5)
    assert "quantizer.codebook" in old_layout(ae.state_dict()) and ae.regularizer.step.item() == 1
    x, latents = smooth_images(2, seed=1), torch.randn(2, *cfg.latent_shape)

    def outputs(model):
        with torch.no_grad():
            enc = model.encode(x)
            return enc.z, enc.reg_loss, enc.indices, model.decode_latents(latents)

    torch.manual_seed(1)
    fresh = Autoencoder(cfg).eval()  # other random weights
    fresh.load_state_dict(old_layout(ae.state_dict()))
    for got, want in zip(outputs(fresh), outputs(ae)):
        assert torch.equal(got, want)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ae.state_dict().items())
    # the averaged weights (EMA) of a checkpoint are keyed the old way too
    torch.manual_seed(2)
    fresh, ema_state = Autoencoder(cfg).eval(), EMA(ae).state_dict()
    ema_state = {**ema_state, "shadow": old_layout(ema_state["shadow"]), "buffers": old_layout(ema_state["buffers"])}
    ema = EMA(fresh)
    ema.load_state_dict(ema_state)
    ema.copy_to(fresh)
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh), outputs(ae)))
    # the whole way: a checkpoint file written before, read by load_autoencoder
    loss_cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_weight=0.0)
    task = AutoencoderTask(cfg, loss_cfg)
    task.autoencoder.load_state_dict(ae.state_dict())
    save_checkpoint(tmp_path / "old.pt", {
        "kind": "autoencoder", "config": {"model": dataclasses.asdict(cfg), "loss": dataclasses.asdict(loss_cfg)},
        "model": old_layout(task.state_dict()), "ema": ema_state})
    assert all(torch.equal(a, b) for a, b in zip(outputs(load_autoencoder(tmp_path / "old.pt")), outputs(ae)))


def test_old_and_new_names_together_are_refused_not_guessed():
    ae = Autoencoder(tiny_cfg(regularizer="vq", codebook_size=16))
    both = {**ae.state_dict(), "quantizer.codebook": torch.zeros(16, 4)}
    with pytest.raises(RuntimeError, match="quantizer.codebook"):
        ae.load_state_dict(both)
    with pytest.raises(RuntimeError, match="Missing key.*regularizer.codebook"):  # a KL state dict into a VQ model
        ae.load_state_dict(Autoencoder(tiny_cfg()).state_dict())


def test_compute_scale_factor_rejects_bad_batches():
    ae = Autoencoder(tiny_cfg())
    with pytest.raises(ValueError, match="got no images"):
        ae.compute_scale_factor([])
    with pytest.raises(TypeError, match="image tensors"):
        ae.compute_scale_factor([{"image": smooth_images(1)}])


# ---------------------------------------------------------------- errors


def test_clear_errors_for_bad_images():
    ae = Autoencoder(tiny_cfg())
    with pytest.raises(ValueError, match="3 channels, got 1.*channels=3"):
        ae(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"15x16 but needs sizes divisible by f=4"):
        ae.encode(torch.zeros(2, 3, 15, 16))
    with pytest.raises(ValueError, match=r"batch of images \(B, C, H, W\).*x\[None\]"):
        ae(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="float images.*127.5"):
        ae(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 4, 4))


def test_clear_errors_for_bad_configs():
    with pytest.raises(ValueError, match=r"f=2\*\*4.*f in \(1, 2, 4, 8\)"):
        AutoencoderConfig(channel_mult=(1, 1, 2, 2, 4))
    with pytest.raises(ValueError, match="unknown regularizer 'gauss'.*'kl'.*'vq'"):
        AutoencoderConfig(regularizer="gauss")
    with pytest.raises(ValueError, match="image_size=30 is not divisible by the downsampling factor f=4"):
        AutoencoderConfig(image_size=30, channel_mult=(1, 2, 2))


# ---------------------------------------------------------------- learning


def train_tiny(reg: str, steps: int = 100, **kw) -> tuple[Autoencoder, float, float]:
    """Train a tiny f=2 autoencoder on 4 fixed smooth images with L1 + regulariser; return (model, L1 before,
    L1 after)."""
    torch.manual_seed(0)
    cfg = AutoencoderConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            latent_channels=4, mid_attention=False, regularizer=reg, **kw)
    ae = Autoencoder(cfg)
    x = smooth_images(4, seed=3)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def l1() -> float:
        with torch.no_grad():
            return (ae(x, sample=False).recon - x).abs().mean().item()

    start = l1()
    for _ in range(steps):
        out = ae(x)
        loss = (out.recon - x).abs().mean() + out.reg_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae, start, l1()


def test_tiny_kl_autoencoder_learns_to_reconstruct():
    _, start, end = train_tiny("kl")
    assert end < 0.4 * start, f"L1 went from {start:.3f} to {end:.3f}"  # measured: 0.52 -> 0.08


def test_tiny_vq_autoencoder_learns_and_uses_its_codebook():
    ae, start, end = train_tiny("vq", codebook_size=64, restart_every=20)
    assert end < 0.4 * start, f"L1 went from {start:.3f} to {end:.3f}"  # measured: 0.51 -> 0.07
    with torch.no_grad():
        usage = ae.eval().encode(smooth_images(4, seed=3)).stats["usage"].item()
    # measured: 98% of the 64 codes in use (94% with the data-dependent init alone, 53% with neither it nor
    # restarts: the tiny initial codes are mostly never picked)
    assert usage > 0.9, f"only {usage:.0%} of the codes are in use"
