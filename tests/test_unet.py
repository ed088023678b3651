"""Tests for minildm.unet: timestep embedding, attention against its written-out reference, UNet shapes,
gradient flow, conditioning, input validation, and a tiny UNet that learns to denoise."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minildm.text import ClassEmbedder, TextEncoder, WordTokenizer
from minildm.unet import (
    Attention,
    SpatialTransformer,
    UNet,
    UNetConfig,
    attention_reference,
    parameter_counts,
    timestep_embedding,
)


def tiny(**overrides) -> UNetConfig:
    """A UNet small enough for CPU tests: 2 channels, 8x8 images."""
    kw = {"in_channels": 2, "image_size": 8, "base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
          "attention_levels": (1,), "heads": 2}
    kw.update(overrides)
    return UNetConfig(**kw)


def perturb_zero_init(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give random values to every all-zero parameter, so zero-initialised layers do not hide a path."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)


CAPTIONS = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle"]


# ------------------------------------------------------------------------------------------------
# timestep embedding
# ------------------------------------------------------------------------------------------------


def test_timestep_embedding_at_zero_is_cos_one_sin_zero():
    emb = timestep_embedding(torch.zeros(3, dtype=torch.long), 16)
    assert emb.shape == (3, 16)
    assert torch.equal(emb[:, :8], torch.ones(3, 8))
    assert torch.equal(emb[:, 8:], torch.zeros(3, 8))


def test_timestep_embedding_matches_numpy():
    t = np.array([0.0, 1.0, 17.0, 250.5, 999.0])
    dim, max_period = 10, 10000.0
    freqs = np.exp(-np.log(max_period) * np.arange(dim // 2) / (dim // 2))
    angles = t[:, None] * freqs[None, :]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    got = timestep_embedding(torch.tensor(t, dtype=torch.float32), dim, max_period).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 angles up to ~1000 rad
    ints = timestep_embedding(torch.tensor([0, 1, 17]), dim, max_period)
    np.testing.assert_allclose(ints.numpy(), expected[:3], atol=1e-6)


def test_timestep_embedding_odd_dim_is_zero_padded():
    t = torch.tensor([3, 40, 500])
    odd, even = timestep_embedding(t, 7), timestep_embedding(t, 6)
    assert odd.shape == (3, 7)
    assert torch.equal(odd[:, :6], even)
    assert torch.equal(odd[:, 6], torch.zeros(3))


def test_timestep_embedding_separates_timesteps():
    emb = timestep_embedding(torch.arange(1000), 64)
    dist = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert dist.min() > 1e-2


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_keys", [7, 4])
def test_attention_reference_equals_sdpa(n_keys):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 16, generator=g)
    k, v = torch.randn(2, 3, n_keys, 16, generator=g), torch.randn(2, 3, n_keys, 16, generator=g)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    mask = torch.rand(2, 1, 1, n_keys, generator=g) > 0.4
    mask[..., 0] = True  # every query keeps at least one key
    torch.testing.assert_close(attention_reference(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


def _attention_by_hand(attn, x, context, mask=None):
    """Attention's forward pass from its weights, with plain reshapes and the reference attention."""
    def heads(t):
        b, n, _ = t.shape
        return t.reshape(b, n, attn.heads, -1).transpose(1, 2)

    q = heads(x @ attn.to_q.weight.T)
    k, v = heads(context @ attn.to_k.weight.T), heads(context @ attn.to_v.weight.T)
    out = attention_reference(q, k, v, None if mask is None else mask[:, None, None, :])
    b, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(b, n, -1) @ attn.to_out.weight.T + attn.to_out.bias


def test_attention_module_matches_reference():
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    self_attn = Attention(8, None, heads=2, head_dim=4)
    torch.testing.assert_close(self_attn(x), _attention_by_hand(self_attn, x, x), atol=1e-5, rtol=1e-5)
    cross = Attention(8, 6, heads=2, head_dim=4)
    torch.testing.assert_close(cross(x, ctx), _attention_by_hand(cross, x, ctx), atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    masked = cross(x, ctx, key_mask=mask)
    torch.testing.assert_close(masked, _attention_by_hand(cross, x, ctx, mask), atol=1e-5, rtol=1e-5)
    changed = ctx.clone()
    changed[~mask] = 100.0  # masked keys must not matter at all
    torch.testing.assert_close(cross(x, changed, key_mask=mask), masked, atol=1e-5, rtol=1e-5)


def test_attention_maps_are_stored_and_normalised():
    attn = Attention(8, 6, heads=2, head_dim=4)
    attn.store_maps = True
    attn(torch.randn(2, 5, 8), torch.randn(2, 3, 6))
    assert attn.maps.shape == (2, 2, 5, 3)
    torch.testing.assert_close(attn.maps.sum(-1), torch.ones(2, 2, 5))


def test_spatial_transformer_starts_as_identity_and_keeps_shape():
    st = SpatialTransformer(16, heads=2, head_dim=8, depth=2, context_dim=6)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 6)
    assert torch.equal(st(x, ctx), x)  # zero-initialised output projection
    perturb_zero_init(st)
    assert st(x, ctx).shape == x.shape and not torch.allclose(st(x, ctx), x)


# ------------------------------------------------------------------------------------------------
# UNet: shapes, gradients, conditioning
# ------------------------------------------------------------------------------------------------


def _conditioned(kind, cfg_kw, seed=0):
    """(unet, encoder, make_context(i)) for kind in {"none", "class", "text"}."""
    torch.manual_seed(seed)
    if kind == "none":
        return UNet(tiny(**cfg_kw)), None, lambda i: None
    if kind == "class":
        enc = ClassEmbedder(num_classes=5, dim=12)
        return UNet(tiny(context_dim=12, **cfg_kw)), enc, lambda i: enc(torch.tensor([i % 5, (i + 2) % 5]))
    tok = WordTokenizer.from_texts(CAPTIONS)
    enc = TextEncoder(tok.vocab_size, dim=12, depth=1, heads=2, max_length=10)
    return (UNet(tiny(context_dim=12, **cfg_kw)), enc,
            lambda i: enc(tok.encode([CAPTIONS[i % 3], CAPTIONS[(i + 1) % 3]], 10)))


@pytest.mark.parametrize("kind", ["none", "class", "text"])
@pytest.mark.parametrize("channel_mult", [(1, 2), (1, 2, 2)])
def test_unet_output_shape(kind, channel_mult):
    unet, _, context = _conditioned(kind, {"channel_mult": channel_mult, "attention_levels": (0, 1)})
    x = torch.randn(2, 2, 8, 8)
    assert unet(x, torch.tensor([3, 700]), context(0)).shape == (2, 2, 8, 8)
    out3 = UNet(tiny(channel_mult=channel_mult, out_channels=3))(x, 5)
    assert out3.shape == (2, 3, 8, 8)
    assert unet(torch.randn(2, 2, 16, 8), 10, context(0)).shape == (2, 2, 16, 8)  # any divisible size


def test_fresh_unet_predicts_zero():
    unet = UNet(tiny())
    assert torch.equal(unet(torch.randn(2, 2, 8, 8), 500), torch.zeros(2, 2, 8, 8))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_gradients_reach_every_parameter(kind):
    unet, enc, context = _conditioned(kind, {"channel_mult": (1, 2, 2), "attention_levels": (1, 2)})
    perturb_zero_init(unet)
    out = unet(torch.randn(2, 2, 8, 8), torch.tensor([10, 900]), context(0))
    out.square().mean().backward()
    for name, p in [*unet.named_parameters(), *(("encoder." + n, p) for n, p in enc.named_parameters())]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("kind", ["class", "text"])
def test_output_depends_on_context_and_timestep(kind):
    unet, _, context = _conditioned(kind, {})
    perturb_zero_init(unet)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([300, 300])
    with torch.no_grad():
        base = unet(x, t, context(0))
        other_context = unet(x, t, context(1))
        other_time = unet(x, torch.tensor([20, 20]), context(0))
        again = unet(x, t, context(0))
    assert torch.equal(base, again)
    assert (base - other_context).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # each sample's context matters
    assert (base - other_time).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_channels_last_gives_the_same_output():
    unet, _, context = _conditioned("class", {})
    perturb_zero_init(unet)
    x, ctx = torch.randn(2, 2, 8, 8), context(0)
    with torch.no_grad():
        plain = unet(x, 7, ctx)
        unet.to(memory_format=torch.channels_last)
        fast = unet(x.to(memory_format=torch.channels_last), 7, ctx)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_parameter_counts_add_up():
    unet = UNet(tiny(context_dim=12))
    counts = parameter_counts(unet)
    assert set(counts) == {"time_embed", "conv_in", "down_levels", "mid", "up_levels", "out", "total"}
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["total"] == sum(p.numel() for p in unet.parameters())
    assert counts["conv_in"] == 2 * 16 * 9 + 16


def test_timestep_forms_accepted():
    unet = UNet(tiny())
    perturb_zero_init(unet)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        ref = unet(x, torch.tensor([42, 42]))
        torch.testing.assert_close(unet(x, 42), ref)
        torch.testing.assert_close(unet(x, torch.tensor(42.0)), ref)
        unet(x, torch.tensor([0.0, 998.75]))  # continuous time within range
        UNet(tiny(num_timesteps=None))(x, 5000)  # no range check when num_timesteps is None


# ------------------------------------------------------------------------------------------------
# UNet: input validation
# ------------------------------------------------------------------------------------------------

X = torch.zeros(2, 2, 8, 8)
CTX = torch.zeros(2, 3, 12)
BAD_INPUTS = [
    ("uncond", torch.zeros(2, 8, 8), 1, None, r"shape \(B, C, H, W\), got shape \(2, 8, 8\)"),
    ("uncond", torch.zeros(2, 3, 8, 8), 1, None, r"in_channels=2 but x has 3 channels"),
    ("deep", torch.zeros(2, 2, 10, 10), 1, None,
     r"got 10x10 images but needs H and W divisible by 4 \(2 downsamplings\)"),
    ("deep", torch.zeros(2, 2, 8, 6), 1, None, r"got 8x6 images"),
    ("uncond", X, torch.zeros(2, 1), None, r"t must be a scalar or have shape \(B,\) = \(2,\), got shape \(2, 1\)"),
    ("uncond", X, torch.zeros(3), None, r"t must be a scalar or have shape \(B,\)"),
    ("uncond", X, torch.tensor([5, 1000]), None, r"t must lie in \[0, 999\] \(num_timesteps=1000\)"),
    ("uncond", X, -1, None, r"t must lie in \[0, 999\]"),
    ("uncond", X, torch.tensor([999.5, 0.0]), None, r"t must lie in \[0, 999\]"),
    ("uncond", X, 1, CTX, r"unconditional \(context_dim=None\) but got a context"),
    ("cond", X, 1, None, r"built with context_dim=12 and needs a context of shape \(B, L, 12\)"),
    ("cond", X, 1, torch.zeros(2, 3, 7), r"context has width 7 but this UNet was built with context_dim=12"),
    ("cond", X, 1, torch.zeros(3, 3, 12), r"context has batch size 3 but x has 2"),
    ("cond", X, 1, torch.zeros(2, 12), r"context must have shape \(B, L, 12\)"),
]


@pytest.mark.parametrize("which, x, t, context, match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(which, x, t, context, match):
    cfg = {"uncond": tiny(), "deep": tiny(channel_mult=(1, 2, 2)), "cond": tiny(context_dim=12)}[which]
    with pytest.raises(ValueError, match=match):
        UNet(cfg)(x, t, context)


def test_cpu_timesteps_are_checked_on_every_call():
    """Reading a CPU t costs no wait, so a bad one is caught however many good calls came before."""
    unet = UNet(tiny())
    unet(X, torch.tensor([0, 999]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        unet(X, torch.tensor([0, 1000]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timesteps_are_checked_on_the_first_call_then_never_make_the_host_wait():
    """A GPU t is range-checked until one call has passed the check (a bad first t is still a clear error); after
    that an eager forward runs without a host-device synchronisation, as a new user times it (no
    `no_value_checks` needed)."""
    unet = UNet(tiny()).cuda()
    x = X.cuda()
    bad, good = torch.tensor([0, 1000], device="cuda"), torch.tensor([0, 999], device="cuda")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        unet(x, bad)
    unet(x, good)  # the check passes: later calls skip it
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        unet(x, good)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("overrides, match", [
    ({"attention_levels": (2,)}, r"attention_levels \(2,\) names levels that do not exist"),
    ({"image_size": 6, "channel_mult": (1, 2, 2)}, r"image_size 6 is not divisible by 4"),
    ({"heads": 3}, r"not divisible by heads=3"),
    ({"channel_mult": ()}, r"channel_mult must be a non-empty tuple"),
    ({"num_res_blocks": 0}, r"num_res_blocks and transformer_depth must be at least 1"),
])
def test_bad_configs_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_config_out_channels_defaults_to_in_channels():
    assert tiny().out_channels == 2
    assert UNetConfig().out_channels == 4


# ------------------------------------------------------------------------------------------------
# A UNet that learns
# ------------------------------------------------------------------------------------------------


def test_tiny_unet_learns_to_predict_noise():
    """Two-point data set; eps-prediction MSE (Ho et al. 2020, eq. (14)) at fixed (x0, t, eps) drops."""
    torch.manual_seed(0)
    num_steps = 1000
    alpha_bar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, num_steps), dim=0)
    patterns = torch.ones(2, 2, 8, 8)
    patterns[1] = -1.0
    patterns[1, 0, :4] = 1.0  # second pattern: half of channel 0 agrees with the first

    def q_sample(x0, t, eps):  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def loss(unet, which, t, eps):
        return (unet(q_sample(patterns[which], t, eps), t) - eps).square().mean()

    g = torch.Generator().manual_seed(1)
    fixed = (torch.randint(0, 2, (64,), generator=g), torch.randint(0, num_steps, (64,), generator=g),
             torch.randn(64, 2, 8, 8, generator=g))
    unet = UNet(tiny())
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    with torch.no_grad():
        before = loss(unet, *fixed).item()
    for _ in range(40):  # loss ratio ~0.13 after 40 steps, ~0.09 after 60 (8 seeds)
        batch = (torch.randint(0, 2, (32,)), torch.randint(0, num_steps, (32,)), torch.randn(32, 2, 8, 8))
        opt.zero_grad()
        loss(unet, *batch).backward()
        opt.step()
    with torch.no_grad():
        after = loss(unet, *fixed).item()
    assert math.isclose(before, 1.0, abs_tol=0.1)  # a fresh UNet predicts 0, so the loss is E[eps^2] = 1
    assert after < 0.3 * before, (before, after)


def test_position_embedding_is_a_function_of_the_place_in_the_image():
    """Token centres at the same relative place get the same features at any resolution (the centre of a 1x1 and
    of a 3x3 grid), every token of a grid gets its own, and odd widths are zero-padded."""
    from minildm.unet import position_embedding_2d

    one, three = position_embedding_2d(1, 1, 64), position_embedding_2d(3, 3, 64)
    assert one.shape == (1, 64) and three.shape == (9, 64)
    torch.testing.assert_close(one[0], three[4])
    grid = position_embedding_2d(8, 8, 64)
    assert torch.cdist(grid, grid).add(torch.eye(64) * 1e3).min() > 0.1  # 64 distinct rows
    assert position_embedding_2d(4, 4, 66)[:, 64:].abs().max() == 0


@pytest.mark.parametrize("with_positions", [False, True])
def test_position_embedding_breaks_the_translation_symmetry_of_a_spatial_transformer(with_positions):
    """Without position features a SpatialTransformer treats its tokens as a set: rolling the image rolls the output.
    With them, the same content at another place gives another output, which is what lets a query find the words
    that name its place."""
    from minildm.unet import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8, position_embedding=with_positions).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # zero-initialised: the block would be the identity
    x, context = torch.randn(1, 32, 6, 6), torch.randn(1, 5, 8)
    with torch.no_grad():
        rolled_output = block(x, context).roll(2, dims=-1)
        output_of_rolled = block(x.roll(2, dims=-1), context)
    same = torch.allclose(rolled_output, output_of_rolled, atol=1e-5)
    assert same != with_positions


# ------------------------------------------------------------------------------------------------
# levels and their skips; checkpoints saved in the old layout (flat `down`/`up` lists of stages)
# ------------------------------------------------------------------------------------------------


def test_each_level_keeps_its_skips_at_its_own_resolution():
    """DownLevel l returns its input and each block's output, all at H / 2**l; the UpLevel of the same resolution
    (up_levels run deepest first) has one block per skip. The middle block is indexable: exercise 04 reads
    `unet.mid[1]`, its SpatialTransformer."""
    cfg = tiny(channel_mult=(1, 2, 3), num_res_blocks=2, image_size=16)
    unet = UNet(cfg)
    h, emb = unet.conv_in(torch.randn(2, 2, 16, 16)), unet.time_embed(timestep_embedding(torch.tensor([1, 2]), 16))
    for level, (down, up) in enumerate(zip(unet.down_levels, reversed(unet.up_levels))):
        h, skips = down(h, emb)
        assert [tuple(s.shape) for s in skips] == [(2, c, 16 >> level, 16 >> level) for c in down.skip_channels]
        assert len(up.blocks) == len(skips) == cfg.num_res_blocks + 1
        assert (down.downsample is None, up.upsample is None) == (level == 2, level == 0)
    assert isinstance(unet.mid[1], SpatialTransformer)


OLD_LAYOUT = Path(__file__).parent / "data" / "unet_old_layout.pt"


def old_layout(name: str) -> tuple[UNetConfig, dict, tuple, torch.Tensor]:
    """(config, state dict in the old layout, inputs (x, t, context, context_mask), output of the old code).

    tests/data/unet_old_layout.pt was written once with the UNet of commit 3b989ac (flat `down`/`up` lists of
    Stages), per config: a fresh UNet, its zero-initialised weights drawn from N(0, 0.05^2), every weight rounded
    to a multiple of 1/64 and stored as int8 codes (weight = code / 64, exact in float32; 37 KB instead of 150),
    with the old keys and shapes in state_dict order and the old code's output on a fixed input."""
    f = torch.load(OLD_LAYOUT, weights_only=True)[name]
    weights = torch.split(f["codes"].float() / 64, [math.prod(shape) for shape in f["shapes"]])
    state = {key: w.view(shape) for key, w, shape in zip(f["keys"], weights, f["shapes"])}
    return UNetConfig(**f["config"]), state, (f["x"], f["t"], f["context"], f["context_mask"]), f["out"]


OLD_LAYOUTS = ["r1_attn1", "r2_attn0_pos"]  # num_res_blocks 1 and 2, attention at level 1 or 0, positions off/on


@pytest.mark.parametrize("name", OLD_LAYOUTS)
def test_old_layout_state_dict_loads_with_the_same_outputs(name):
    cfg, old_state, inputs, expected = old_layout(name)
    assert any(key.startswith("down.") for key in old_state)  # the fixture really is in the old layout
    unet = UNet(cfg).eval()
    unet.load_state_dict(old_state)  # strict: every weight found a place
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs), expected, atol=1e-5, rtol=0)
    again = UNet(cfg).eval()
    again.load_state_dict(unet.state_dict())  # today's layout loads too (nothing to rename)
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", OLD_LAYOUTS)
def test_old_layout_names_the_same_parameters_in_the_same_order(name):
    """Same modules, same order: an optimizer state saved with the old layout (parameters by position) resumes."""
    cfg, old_state, _, _ = old_layout(name)
    unet = UNet(cfg)
    renamed = [next(iter(unet.upgrade_state_dict({key: None}))) for key in old_state]
    assert renamed == [n for n, _ in unet.named_parameters()]
    first_of_level_1 = f"down.{cfg.num_res_blocks + 1}.0.conv1.weight"  # after level 0's blocks and Downsample
    assert renamed[list(old_state).index(first_of_level_1)] == "down_levels.1.blocks.0.res.conv1.weight"


def test_a_state_dict_that_fits_neither_layout_raises():
    cfg, old_state, _, _ = old_layout("r1_attn1")
    unet = UNet(cfg)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        unet.load_state_dict(old_layout("r2_attn0_pos")[1])  # another architecture
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*Unexpected key.*down\.9\.0\.conv1\.weight"):
        unet.load_state_dict({k.replace("down.2.0.", "down.9.0."): v for k, v in old_state.items()})  # no such stage
    both = {**old_state, "down_levels.1.blocks.0.res.conv1.weight": old_state["down.2.0.conv1.weight"]}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*down\.2\.0\.conv1\.weight"):
        unet.load_state_dict(both)  # old and new name of one weight: neither wins silently


def test_old_layout_checkpoint_and_its_ema_weights_load(tmp_path):
    """A diffusion checkpoint of the old layout, as `Trainer.save` wrote it: the model through the renaming in
    `UNet._load_from_state_dict`, the EMA shadows (named like the Denoiser's parameters, `unet.down.2.0...`) through
    `use_ema_weights`."""
    from minildm.checkpoint import save_checkpoint
    from minildm.diffusion import DiffusionConfig
    from minildm.ema import EMA
    from minildm.pipeline import DiffusionTask, load_diffusion
    from minildm.text import TextConfig

    cfg, old_state, (x, t, context, mask), expected = old_layout("r1_attn1")
    task = DiffusionTask(cfg, TextConfig(dim=cfg.context_dim, depth=1, heads=2), DiffusionConfig())

    def old_names(state: dict, prefix: str, unet_state: dict) -> dict:
        return {**{k: v for k, v in state.items() if not k.startswith(prefix)},
                **{prefix + k: v for k, v in unet_state.items()}}

    raw = {k: v / 2 for k, v in old_state.items()}  # the raw weights differ from the averaged ones
    ema = EMA(task.denoiser).state_dict()
    ema["shadow"] = old_names(ema["shadow"], "unet.", old_state)
    path = save_checkpoint(tmp_path / "old.pt", {"kind": "diffusion", "config": task.config_dict(), "ema": ema,
                                                 "model": old_names(task.state_dict(), "denoiser.unet.", raw)})
    reference = UNet(cfg).eval()
    reference.load_state_dict(raw)
    for use_ema, want in [(True, expected), (False, None)]:
        denoiser = load_diffusion(path, use_ema=use_ema)[0]
        with torch.no_grad():
            got = denoiser.unet(x, t, context, mask)
            want = expected if use_ema else reference(x, t, context, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # resuming training loads the EMA itself (Trainer.load): the Denoiser converts the old names for it
    resumed = EMA(task.denoiser)
    resumed.load_state_dict(ema)
    torch.testing.assert_close(resumed.shadow["unet.down_levels.0.blocks.0.res.conv1.weight"],
                               old_state["down.0.0.conv1.weight"])


def test_spatial_transformer_computes_its_position_table_once_per_size():
    """The cached table is exactly position_embedding_2d, reused at the same size and rebuilt at another."""
    from minildm.unet import SpatialTransformer, position_embedding_2d

    block = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8, position_embedding=True)
    first = block.positions(6, 6, 32, "cpu")
    assert torch.equal(first, position_embedding_2d(6, 6, 32))
    assert block.positions(6, 6, 32, "cpu") is first, "the same size must reuse the table"
    other = block.positions(4, 8, 32, "cpu")
    assert other.shape == (32, 32) and torch.equal(other, position_embedding_2d(4, 8, 32))
    assert "_positions" not in dict(block.named_buffers()) and not any("position" in k for k in block.state_dict())
