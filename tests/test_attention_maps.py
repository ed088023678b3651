"""Cross-attention maps (minildm/attention_maps.py) and the pipeline's bad input of stage 9, on the CPU.

A small text-conditioned denoiser with random (not zero) weights everywhere, so that cross-attention changes the
output and a recorder that changed anything would show."""

import warnings

import pytest
import torch

from minildm.attention_maps import CrossAttentionRecorder, cross_attention_maps, upsample
from minildm.data.shapes import vocabulary
from minildm.denoiser import Denoiser
from minildm.device import Runtime
from minildm.pipeline import generate
from minildm.schedules import NoiseSchedule
from minildm.text import TextConfig, WordTokenizer
from minildm.unet import UNet, UNetConfig

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)
SHAPE = (4, 8, 8)
CAPTIONS = ["a big red circle at the top left", "a small blue square in the center and a big green ring on the right"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    text = TextConfig(dim=32, depth=1, heads=2, max_length=32)
    unet = UNetConfig(in_channels=4, image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(0, 1), heads=2, context_dim=32, num_timesteps=50, position_embedding=True)
    denoiser = Denoiser(unet, text, WordTokenizer(vocabulary()))
    with torch.no_grad():  # the zero-initialised output layers too: every branch must change the output
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return denoiser.eval(), NoiseSchedule.from_name("scaled_linear", 50)


def sample(model, captions=CAPTIONS, w=3.0, seed=1, **kwargs):
    denoiser, schedule = model
    return generate(denoiser, captions, schedule, SHAPE, CPU, guidance_scale=w, seed=seed, sampler="ddim", steps=4,
                    cuda_graph=False, **kwargs)


def test_maps_have_one_row_per_token_and_place_and_sum_to_one_over_the_tokens(model):
    denoiser, _ = model
    B, L = len(CAPTIONS), denoiser.text_cfg.max_length
    with CrossAttentionRecorder(denoiser) as recorder:
        sample(model)
    assert recorder.resolutions == [8, 4]  # level 0 at 8x8, level 1 and the middle block at 4x4
    n_layers = len(recorder.layers)
    assert n_layers == 7  # down levels 1 + 1, middle 1, up levels 2 + 2 (num_res_blocks + 1 each)
    assert len(recorder.records) == 4 * n_layers  # every layer, once per step (4 DDIM steps)
    for resolution in (8, 4):
        maps = recorder.maps(resolution)  # guided: 2B rows per call
        assert maps.shape == (2 * B, L, resolution, resolution) and maps.dtype == torch.float32
        torch.testing.assert_close(maps.sum(1), torch.ones(2 * B, resolution, resolution))
        assert (maps >= 0).all()
        conditional = recorder.maps(resolution, rows=slice(-B, None))
        torch.testing.assert_close(conditional, maps[B:])
        n_tokens = torch.tensor([len(denoiser.tokenizer.tokens(c)) for c in CAPTIONS])
        for b, n in enumerate(n_tokens.tolist()):  # the padding is masked out: no weight at all
            assert conditional[b, n:].abs().max() == 0 and conditional[b, :n].sum(0).min() > 0.999
    first_steps = recorder.maps(8, calls=slice(0, 2))
    assert not torch.allclose(first_steps, recorder.maps(8, calls=slice(2, 4)))  # the steps differ
    torch.testing.assert_close((first_steps + recorder.maps(8, calls=slice(2, 4))) / 2, recorder.maps(8))


def test_recorded_maps_are_the_layers_own_attention_weights(model):
    """Attention.store_maps keeps softmax(q k^T / sqrt(d)) computed inside the layer: the recorder must agree."""
    denoiser, _ = model
    layers = [attn for _, attn in CrossAttentionRecorder(denoiser).layers]
    ids = denoiser.tokenize(CAPTIONS)
    x, t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 40])
    for attn in layers:
        attn.store_maps = True
    try:
        with torch.no_grad(), CrossAttentionRecorder(denoiser) as recorder:
            denoiser(x, t, ids)
    finally:
        for attn in layers:
            attn.store_maps = False
    assert len(recorder.records) == len(layers)
    for record, attn in zip(recorder.records, layers):
        h, w = record.size
        inside = attn.maps.mean(1).transpose(1, 2).reshape(2, -1, h, w)  # (B, heads, h*w, L) -> (B, L, h, w)
        torch.testing.assert_close(record.probs, inside)


def test_recording_changes_nothing_and_leaves_no_hooks_behind(model):
    denoiser, _ = model
    before = sample(model)
    with CrossAttentionRecorder(denoiser) as recorder:
        during = sample(model)
    after = sample(model)
    assert recorder.records and torch.equal(before, during) and torch.equal(before, after)
    assert before.abs().mean() > 0.01, "the comparison needs non-trivial samples"
    for module in denoiser.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    again = CrossAttentionRecorder(denoiser)
    with again, pytest.raises(RuntimeError, match="already recording"):
        again.__enter__()


def test_cross_attention_maps_returns_the_generated_images_and_maps_at_their_size(model):
    denoiser, schedule = model
    images, maps, tokens = cross_attention_maps(denoiser, CAPTIONS, schedule, SHAPE, CPU, guidance_scale=3.0,
                                                sampler="ddim", steps=4, seed=1)
    torch.testing.assert_close(images, sample(model))  # the samples of generate with the same seed
    assert maps.shape == (2, denoiser.text_cfg.max_length, 8, 8)  # no autoencoder here: 8 px "images"
    assert tokens[0] == ["<bos>", "a", "big", "red", "circle", "at", "the", "top", "left", "<eos>"]
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))
    up = upsample(torch.rand(1, 3, 4, 4), 16)
    assert up.shape == (1, 3, 16, 16)


def test_recorder_bad_input(model):
    denoiser, _ = model
    with pytest.raises(ValueError, match="no cross-attention layers"):
        CrossAttentionRecorder(UNet(UNetConfig(in_channels=4, image_size=8, base_channels=16, channel_mult=(1, 2),
                                               num_res_blocks=1, attention_levels=(1,), heads=2)))
    recorder = CrossAttentionRecorder(denoiser)
    with pytest.raises(ValueError, match="nothing was recorded"):
        recorder.maps()
    with recorder:
        sample(model, w=1.0)
    with pytest.raises(ValueError, match=r"no cross-attention at resolution 2; recorded: \[8, 4\]"):
        recorder.maps(2)


# ---- bad prompts and guidance for generate (the prompt box of notebook 09 goes through it) -----------------------


def test_a_prompt_with_unknown_words_is_an_error_naming_them(model):
    with pytest.raises(ValueError, match=r"never saw in training: \['circel', 'purpel'\]"):
        sample(model, ["a big purpel circel at the left"])


def test_a_prompt_too_long_for_the_text_encoder_is_an_error(model):
    long = " and ".join(["a big red circle at the left"] * 5)
    with pytest.raises(ValueError, match="needs 41 tokens .* at most 32"):
        sample(model, [long])


def test_an_empty_prompt_warns_and_draws_the_unconditional_model_whatever_the_guidance(model):
    with pytest.warns(UserWarning, match="prompt 0 is empty"):
        empty = sample(model, ["", "a red circle"], w=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in (2.0, 7.5):  # cond = uncond = "": guidance changes nothing
            torch.testing.assert_close(sample(model, ["", "a red circle"], w=w)[0], empty[0], atol=1e-5, rtol=0)
        assert not torch.allclose(sample(model, ["", "a red circle"], w=3.0)[1], empty[1])
        torch.testing.assert_close(sample(model, [" ?! "], w=1.0), empty[:1])  # only punctuation: empty too


@pytest.mark.parametrize("w", [0.5, 0.0, -1.0, float("nan"), float("inf"), True])
def test_guidance_below_1_or_not_a_finite_number_is_an_error(model, w):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        sample(model, w=w)
