"""Stage 2: the autoencoder losses (minildm/losses.py): hinge and adaptive weight against hand computations,
the perceptual distance, and the switch-on of the discriminator in AutoencoderLoss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minildm.autoencoder import Autoencoder, AutoencoderConfig
from minildm.losses import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    FeatureNet,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    generator_adv_loss,
    hinge_d_loss,
)


def disks(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] of 4 coloured disks on black: sharp edges, so blur is visible."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = -torch.ones(n, 3, size, size)
    for i in range(n):
        for _ in range(4):
            cx, cy = torch.randint(4, size - 4, (2,), generator=g).tolist()
            r = torch.randint(3, 8, (1,), generator=g).item()
            imgs[i][:, (xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (torch.rand(3, 1, generator=g) * 2 - 1)
    return imgs


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma) + 1
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k, c = k / k.sum(), x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ---------------------------------------------------------------- adversarial pieces


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = (0, 0.5, 2) -> mean 5/6; relu(1 + fake) = (0, 1, 2) -> mean 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)), torch.tensor(0.0))
    torch.testing.assert_close(generator_adv_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight_equals_gradient_norm_ratio():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(2, 3))
    inp, target, v = torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2)
    out = inp @ w.T  # (5, 2)
    rec = ((out - target) ** 2).sum()
    g = (v * out).sum()
    # by hand: d rec / dW = 2 (out - t)^T inp, d g / dW = v^T inp
    grad_rec = 2 * (out.detach() - target).T @ inp
    grad_g = v.T @ inp
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    lam = adaptive_weight(rec, g, w)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad
    assert w.grad is None  # it must not leave gradients behind
    (rec + lam * g).backward()  # the graph is still there (retain_graph)
    assert w.grad is not None


def test_adaptive_weight_is_clamped_and_checks_its_inputs():
    w = nn.Parameter(torch.ones(2, 2))
    out = torch.ones(3, 2) @ w
    torch.testing.assert_close(adaptive_weight(out.sum(), 1e-12 * out.sum(), w, max_weight=50.0),
                               torch.tensor(50.0))
    with pytest.raises(ValueError, match="last_layer was not used"):
        adaptive_weight(out.sum(), out.sum(), nn.Parameter(torch.ones(1)))
    with torch.no_grad():
        detached = (torch.ones(3, 2) @ w).sum()
    with pytest.raises(ValueError, match="no_grad"):
        adaptive_weight(detached, detached, w)


def test_patch_discriminator_gives_a_logit_map_and_rejects_tiny_images():
    d = PatchDiscriminator(in_channels=3, channels=8, num_layers=3)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    assert d.train()(torch.zeros(1, 3, 16, 16)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="at least 16x16.*fewer layers"):
        d(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- perceptual


def test_feature_net_is_fixed_frozen_and_seeded():
    torch.manual_seed(1)
    a = FeatureNet(channels=(8, 16, 16))
    torch.manual_seed(2)
    b = FeatureNet(channels=(8, 16, 16))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters())
    assert not torch.equal(a.stages[0][0].weight, FeatureNet(channels=(8, 16, 16), seed=1).stages[0][0].weight)
    feats = a(torch.zeros(2, 3, 16, 16))
    assert [f.shape for f in feats] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]


def test_perceptual_zero_for_identical_positive_for_different_and_differentiable():
    p = PerceptualLoss()
    x = disks(2)
    torch.testing.assert_close(p(x, x), torch.zeros(2))
    y = x.clone().requires_grad_()
    d = p(x, y.detach() + 0.2 * torch.randn_like(x))
    assert d.shape == (2,) and (d > 0).all()
    p(x, y + 0.2).sum().backward()
    assert y.grad.abs().sum() > 0


def test_perceptual_grows_with_blur_strength():
    p = PerceptualLoss()
    x = disks(3)
    d = torch.stack([p(x, gaussian_blur(x, s)) for s in (0.5, 1.0, 2.0, 3.0)])  # (4 strengths, B)
    assert (d[1:] > d[:-1]).all(), d


class PixelFeatures(nn.Module):
    """A 'feature net' that returns the pixels themselves: the loss has a closed form then."""

    def forward(self, x):
        return [x]


def test_perceptual_with_swapped_feature_net_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    expected = (F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(PerceptualLoss(PixelFeatures())(x, y), expected)


# ---------------------------------------------------------------- AutoencoderLoss


def make(regularizer="kl", **loss_kw):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                       mid_attention=False, regularizer=regularizer, codebook_size=16))
    kw = {"perceptual_weight": 0.7, "disc_weight": 0.5, "disc_start": 3, "disc_channels": 8, "disc_layers": 2}
    crit = AutoencoderLoss(AutoencoderLossConfig(**{**kw, **loss_kw}),
                           feature_net=FeatureNet(channels=(8, 16, 16)))
    return ae, crit, disks(2, size=16)


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_before_disc_start_no_adversarial_term_and_no_discriminator_cost(regularizer):
    ae, crit, x = make(regularizer)
    calls = count_calls(crit.discriminator)
    out = ae(x)
    loss, logs = crit.generator_loss(x, out, ae.decoder_last_layer, step=2)
    l1 = (x - out.recon).abs().mean()
    expected = l1 + 0.7 * crit.perceptual(x, out.recon).mean() + out.reg_loss.mean()
    torch.testing.assert_close(loss, expected)
    assert logs["g_adv"] == 0.0 and logs["adaptive_weight"] == 0.0
    assert logs["l1"] == pytest.approx(l1.item())
    loss_d, dlogs = crit.discriminator_loss(x, out.recon, step=2)
    assert loss_d.item() == 0.0 and not loss_d.requires_grad and dlogs["loss_d"] == 0.0
    assert calls == []  # the discriminator never ran


@pytest.mark.parametrize("step, ramp", [(3, 1), (4, 4), (9, 4)])
def test_after_disc_start_generator_gets_weighted_adversarial_term(step, ramp):
    ae, crit, x = make(disc_ramp=ramp, max_adaptive_weight=1e4)
    calls = count_calls(crit.discriminator)
    out = ae(x, sample=False)
    loss, logs = crit.generator_loss(x, out, ae.decoder_last_layer, step=step)
    assert calls
    rec = (x - out.recon).abs().mean() + 0.7 * crit.perceptual(x, out.recon).mean()
    g_adv = -crit.discriminator(out.recon).mean()
    ramp_factor = min(1.0, (step - 3 + 1) / ramp)  # disc_start = 3: 1, 0.5, 1
    lam = adaptive_weight(rec, g_adv, ae.decoder_last_layer) * ramp_factor
    torch.testing.assert_close(loss, rec + out.reg_loss.mean() + 0.5 * lam * g_adv)
    assert logs["adaptive_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["g_adv"] == pytest.approx(g_adv.item(), rel=1e-5)
    # the generator loss trains the autoencoder only, not the discriminator
    loss.backward()
    assert all(p.grad is None for p in crit.discriminator.parameters())
    assert all(p.requires_grad for p in crit.discriminator.parameters())  # unfrozen again
    assert ae.decoder_last_layer.grad is not None


def test_discriminator_loss_is_hinge_and_trains_only_the_discriminator():
    ae, crit, x = make()
    out = ae(x)
    loss_d, logs = crit.discriminator_loss(x, out.recon, step=3)
    expected = hinge_d_loss(crit.discriminator(x), crit.discriminator(out.recon))
    torch.testing.assert_close(loss_d, expected)
    assert logs["loss_d"] == pytest.approx(expected.item(), rel=1e-5)
    loss_d.backward()
    assert all(p.grad is None for p in ae.parameters())
    assert all(p.grad is not None for p in crit.discriminator.parameters())


def test_trainer_sequence_updates_discriminator_only_after_disc_start():
    ae, crit, x = make(disc_start=2)
    opt_ae = torch.optim.Adam(ae.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(crit.discriminator.parameters(), lr=1e-3)
    snapshot = [p.detach().clone() for p in crit.discriminator.parameters()]
    changed = []
    for step in range(3):
        opt_ae.zero_grad()
        opt_d.zero_grad()
        out = ae(x)
        loss_g, _ = crit.generator_loss(x, out, ae.decoder_last_layer, step)
        loss_d, _ = crit.discriminator_loss(x, out.recon, step)
        loss_g.backward()
        opt_ae.step()
        if loss_d.requires_grad:
            loss_d.backward()
            opt_d.step()
        changed.append(any(not torch.equal(p, q) for p, q in zip(crit.discriminator.parameters(), snapshot)))
    assert changed == [False, False, True]


def test_switches_off_and_evaluation_without_gradients():
    ae, crit, x = make(disc_weight=0.0, perceptual_weight=0.0)
    assert crit.discriminator is None and crit.perceptual is None
    out = ae(x, sample=False)
    loss, logs = crit.generator_loss(x, out, ae.decoder_last_layer, step=10**6)
    torch.testing.assert_close(loss, (x - out.recon).abs().mean() + out.reg_loss.mean())
    assert logs["perceptual"] == 0.0 and logs["g_adv"] == 0.0
    assert crit.discriminator_loss(x, out.recon, step=10**6)[0].item() == 0.0
    # a full criterion under no_grad (validation): logs the adversarial term, no adaptive weight
    ae, crit, x = make()
    with torch.no_grad():
        loss, logs = crit.generator_loss(x, ae(x), ae.decoder_last_layer, step=5)
    assert logs["adaptive_weight"] == 0.0 and logs["g_adv"] != 0.0


def test_clear_errors():
    with pytest.raises(ValueError, match="disc_weight must be >= 0"):
        AutoencoderLossConfig(disc_weight=-1.0)
    ae, crit, x = make()
    with pytest.raises(ValueError, match="differ in shape"):
        crit.generator_loss(x[:1], ae(x), ae.decoder_last_layer, step=0)


def test_adaptive_weight_clamp_defaults_to_taming_clamp_for_a_mean_loss():
    """Our reconstruction loss is a mean over C*H*W values where taming sums it: lambda is C*H*W times smaller,
    so the default clamp is 1e4 / (C*H*W) (13 at 16 px, 0.8 at 64 px); an explicit clamp binds when lambda exceeds it."""
    ae, crit, x = make(disc_ramp=1)
    out = ae(x, sample=False)
    rec = (x - out.recon).abs().mean() + 0.7 * crit.perceptual(x, out.recon).mean()
    unclamped = adaptive_weight(rec, -crit.discriminator(out.recon).mean(), ae.decoder_last_layer).item()
    _, logs = crit.generator_loss(x, out, ae.decoder_last_layer, step=3)
    assert logs["adaptive_weight"] == pytest.approx(min(unclamped, 1e4 / x[0].numel()), rel=1e-5)
    assert unclamped > 1.0
    ae, crit, x = make(disc_ramp=1, max_adaptive_weight=1.0)
    _, logs = crit.generator_loss(x, ae(x, sample=False), ae.decoder_last_layer, step=3)
    assert logs["adaptive_weight"] == pytest.approx(1.0)


def test_discriminator_separates_real_from_reconstructed_during_the_gan_phase():
    """A few discriminator steps on a fixed blurry "autoencoder" (a 3x3 box blur): with the shipped settings
    (Adam (0.5, 0.9), fp32 logits) the discriminator must learn to tell real from reconstructed images on held-out
    images, not sit at the hinge loss of 1.0 that an inactive discriminator gives."""
    torch.manual_seed(0)
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_weight=0.5, disc_start=0, disc_channels=16, disc_layers=2)
    crit = AutoencoderLoss(cfg)
    opt = torch.optim.Adam(crit.discriminator.parameters(), lr=5e-4, betas=cfg.disc_betas)

    def blur(images):
        return torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)

    for step in range(100):
        x = disks(16, size=16, seed=step)
        loss_d, _ = crit.discriminator_loss(x, blur(x), step)
        opt.zero_grad()
        loss_d.backward()
        opt.step()
    held_out = disks(64, size=16, seed=1000)
    with torch.no_grad():
        real = crit.discriminator(held_out).mean((1, 2, 3))
        fake = crit.discriminator(blur(held_out)).mean((1, 2, 3))
        loss_d, _ = crit.discriminator_loss(held_out, blur(held_out), 100)
    accuracy = ((real > 0).float().mean() + (fake < 0).float().mean()) / 2
    assert accuracy > 0.9, f"held-out real/reconstructed accuracy {accuracy:.2f}"
    assert loss_d.item() < 0.8, f"hinge loss {loss_d.item():.3f} (1.0 = separates nothing)"
