"""The stages wired together (fast configs): train, save, load back, generate; the CLI's errors."""

import dataclasses
import json

import pytest
import torch

from minildm.cli import main
from minildm.config import autoencoder_recipe, diffusion_recipe
from minildm.device import Runtime
from minildm.pipeline import (
    diffusion_batch_fn,
    generate,
    load_autoencoder,
    load_diffusion,
    train_autoencoder,
    train_diffusion,
)

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("run")
    recipe = autoencoder_recipe(fast=True)
    recipe.train = dataclasses.replace(recipe.train, steps=6, ckpt_every=3, log_every=3)
    recipe.loss = dataclasses.replace(recipe.loss, perceptual_weight=0.0, disc_weight=0.0)
    ae, _ = train_autoencoder(recipe, CPU, folder / "ae.pt", progress=False)
    ldm = diffusion_recipe("latent", fast=True)
    ldm.train = dataclasses.replace(ldm.train, steps=4, ckpt_every=2, log_every=2)
    denoiser, schedule, _history = train_diffusion(ldm, CPU, folder / "ldm.pt", autoencoder=ae, progress=False)
    return folder, recipe, ae, ldm, denoiser, schedule


def test_autoencoder_checkpoint_loads_back_with_ema_weights_and_scale_factor(trained):
    folder, _recipe, ae, *_ = trained
    loaded = load_autoencoder(folder / "ae.pt")
    assert loaded.scale_factor.item() == pytest.approx(ae.scale_factor.item())
    assert ae.scale_factor.item() != 1.0, "the scale factor must be computed after training"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_latents(x), ae.encode_latents(x))


def test_scale_factor_is_saved_with_the_weights_and_old_checkpoints_are_converted(trained, tmp_path):
    folder, _recipe, ae, *_ = trained
    state = torch.load(folder / "ae.pt", weights_only=True)
    scale = ae.scale_factor.item()
    assert state["model"]["autoencoder.scale_factor"].item() == pytest.approx(scale)
    assert state["ema"]["buffers"]["scale_factor"].item() == pytest.approx(scale)
    # A checkpoint from before: the buffers hold 1.0 and the value lives in "extra" only.
    state["model"]["autoencoder.scale_factor"].fill_(1.0)
    state["ema"]["buffers"]["scale_factor"].fill_(1.0)
    torch.save(state, tmp_path / "old.pt")
    assert load_autoencoder(tmp_path / "old.pt").scale_factor.item() == pytest.approx(scale)


def test_latent_batches_are_scaled_latents_with_captions(trained):
    _, _recipe, ae, ldm, *_ = trained
    batch = diffusion_batch_fn(ldm.data, 8, CPU, ae)(0)
    assert batch["x"].shape == (8, *ae.cfg.latent_shape)
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])
    pixels = diffusion_batch_fn(ldm.data, 8, CPU, None)(0)
    with torch.no_grad():
        torch.testing.assert_close(batch["x"], ae.encode_latents(pixels["x"]))


def test_diffusion_checkpoint_loads_back_and_generates_images(trained):
    folder, _, ae, ldm, denoiser, _schedule = trained
    loaded, loaded_schedule, cfg = load_diffusion(folder / "ldm.pt")
    assert cfg.space == "latent" and loaded_schedule.T == ldm.diffusion.num_timesteps
    for a, b in zip(denoiser.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    shape = (ldm.unet.in_channels, ldm.unet.image_size, ldm.unet.image_size)
    with pytest.warns(UserWarning, match="prompt 1 is empty"):  # the empty caption: the unconditional model
        images = generate(loaded, ["a big red circle at the center", ""], loaded_schedule, shape, CPU, autoencoder=ae)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    with pytest.warns(UserWarning, match="prompt 1 is empty"):
        again = generate(loaded, ["a big red circle at the center", ""], loaded_schedule, shape, CPU, autoencoder=ae)
    torch.testing.assert_close(images, again, msg="the same seed must give the same images")


def test_latent_diffusion_without_an_autoencoder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a trained autoencoder"):
        train_diffusion(diffusion_recipe("latent", fast=True), CPU, tmp_path / "x.pt", autoencoder=None)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path), "a red circle"]) == 2
    assert "no trained pipeline" in capsys.readouterr().err
    assert main(["data", "--dataset", "imagenet"]) == 2
    assert "unknown data set 'imagenet'" in capsys.readouterr().err
    assert main(["data", "--dataset", "mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mnist" in err.lower() and str(tmp_path) in err
    with pytest.raises(SystemExit):
        main(["train", "--f", "3"])  # argparse names the allowed choices
    assert "invalid choice" in capsys.readouterr().err


def test_checkpoint_keeps_raw_weights_to_resume_from_and_ema_weights_to_use(trained):
    from minildm.checkpoint import load_checkpoint

    folder, *_ = trained
    state = load_checkpoint(folder / "ae.pt", kind="autoencoder")
    raw = state["model"]["autoencoder.decoder.conv_out.weight"]
    averaged = state["ema"]["shadow"]["decoder.conv_out.weight"]
    assert not torch.equal(raw, averaged), "the trained (raw) weights must not be overwritten by the EMA ones"
    assert state["extra"]["scale_factor"] > 0
    ema_model, raw_model = load_autoencoder(folder / "ae.pt"), load_autoencoder(folder / "ae.pt", use_ema=False)
    torch.testing.assert_close(ema_model.decoder.conv_out.weight.detach(), averaged)
    torch.testing.assert_close(raw_model.decoder.conv_out.weight.detach(), raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cuda_graph_sampling_gives_the_eager_samples(trained, guidance_scale):
    """The recorded graph must replay exactly the computation of eager mode, step after step."""
    _, _, ae, ldm, denoiser, schedule = trained
    gpu = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16, fast=True)
    denoiser, ae = denoiser.to("cuda"), ae.to("cuda")
    shape = (ldm.unet.in_channels, ldm.unet.image_size, ldm.unet.image_size)
    captions = ["a big red circle at the center", "a small blue square at the top left", ""]
    eager, graphed = (generate(denoiser, captions, schedule, shape, gpu, guidance_scale=guidance_scale,
                               autoencoder=ae, seed=3, cuda_graph=use) for use in (False, True))
    assert eager.abs().mean() > 0.05, "the comparison needs non-trivial images"
    torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=0)
    denoiser.cpu(), ae.cpu()


def test_generate_refuses_bad_sampler_input_before_any_work(trained):
    """A step count the schedule cannot provide, guidance below 1, an unknown sampler: each a clear error naming the
    fix, raised before the model runs (on a GPU, before a CUDA graph is recorded)."""
    _, _, ae, ldm, denoiser, schedule = trained
    shape = (ldm.unet.in_channels, ldm.unet.image_size, ldm.unet.image_size)
    calls = []
    hook = denoiser.register_forward_hook(lambda *args: calls.append(1))
    cases = [({"sampler": "ddim", "steps": 0}, r"steps must be an int from 1 to T=100"),
             ({"sampler": "dpmpp_2m", "steps": schedule.T + 1}, r"steps must be an int from 1 to T=100"),
             ({"sampler": "heun", "steps": 12.5}, r"steps must be an int from 1 to T=100 .*got 12.5"),
             ({"sampler": "ddpm", "guidance_scale": 0.5}, r"guidance_scale must be a number >= 1 .*empty caption"),
             ({"sampler": "euler", "steps": 5, "guidance_scale": -1.0}, r"guidance_scale must be a number >= 1"),
             ({"sampler": "dpm++"}, r"unknown sampler 'dpm\+\+'; choose one of \('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m'\)")]
    try:
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                generate(denoiser, ["a big red circle at the center"], schedule, shape, CPU, autoencoder=ae, **kwargs)
    finally:
        hook.remove()
    assert calls == []


def test_cuda_graph_on_a_cpu_runtime_is_a_clear_error(trained):
    _, _, _, ldm, denoiser, schedule = trained
    shape = (ldm.unet.in_channels, ldm.unet.image_size, ldm.unet.image_size)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        generate(denoiser, ["a red circle"], schedule, shape, CPU, cuda_graph=True)


def test_cuda_graph_refuses_inputs_of_another_shape():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from minildm.device import cuda_graphed

    double = cuda_graphed(lambda x: 2 * x, torch.ones(4, device="cuda"))
    torch.testing.assert_close(double(torch.arange(4.0, device="cuda")), torch.arange(0.0, 8.0, 2, device="cuda"))
    with pytest.raises(ValueError, match="recorded for inputs of shape"):
        double(torch.ones(5, device="cuda"))


def test_cli_train_writes_both_grids_and_resumes_without_retraining(tmp_path, monkeypatch, capsys, course_home):
    monkeypatch.setenv("MINILDM_FAST", "1")
    monkeypatch.setenv("MINILDM_HOME", str(course_home))
    args = ["train", "--fast", "--device", "cpu", "--out", str(tmp_path), "--steps", "4"]
    assert main(args) == 0
    assert (tmp_path / "reconstructions.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0
    first = capsys.readouterr().out
    assert "s in all" in first
    assert "first stage, 32 held-out images: PSNR" in first and "text to image, 32 held-out captions" in first
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(result["text_to_image"]["by_guidance"]) == {"3.0"}
    scores = result["text_to_image"]["by_guidance"]["3.0"]
    assert scores["objects"] >= 32 and 0 <= scores["object"] <= 1 and scores["fd"] >= 0
    names = {p.name for p in tmp_path.glob("*.pt")}
    assert names == {"autoencoder_kl_f4.pt", "diffusion_latent.pt"}
    # finished checkpoints are loaded, not trained further (4 samples for the evaluation at the end: what is checked
    # here is the checkpoints, and the 32 of the first run took 5 s of this test's 35)
    assert main(args + ["--eval-n", "4"]) == 0
    for name in names:
        step = torch.load(tmp_path / name, weights_only=True)["step"]
        assert step == (4 if name.startswith("autoencoder") else diffusion_recipe("latent", fast=True).train.steps)


def test_cli_train_refuses_to_mix_pipelines_in_one_folder(tmp_path, capsys):
    (tmp_path / "autoencoder_vq_f4.pt").write_bytes(b"")
    assert main(["train", "--fast", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "holds a pipeline built on autoencoder_vq_f4.pt" in capsys.readouterr().err


def test_cli_evaluate_scores_a_run_and_refuses_bad_input(trained, tmp_path, monkeypatch, capsys, course_home):
    monkeypatch.setenv("MINILDM_HOME", str(course_home))
    folder, *_ = trained
    run = tmp_path / "run"
    run.mkdir()
    assert main(["evaluate", str(run), "--fast", "--device", "cpu"]) == 2  # nothing trained there yet
    assert "no trained pipeline in" in capsys.readouterr().err
    (run / "autoencoder_kl_f4.pt").write_bytes((folder / "ae.pt").read_bytes())
    (run / "diffusion_latent.pt").write_bytes((folder / "ldm.pt").read_bytes())
    assert main(["evaluate", str(run), "--fast", "--device", "cpu", "-n", "0"]) == 2
    assert "asked to evaluate 0 samples" in capsys.readouterr().err
    args = ["evaluate", str(run), "--fast", "--device", "cpu", "-n", "8", "--guidance", "1", "4",
            "--sampler", "dpmpp_2m", "--steps", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "text to image, 8 held-out captions (dpmpp_2m, 5 steps" in out and "     4.0 |" in out
    result = json.loads((run / "evaluation.json").read_text())
    assert set(result["text_to_image"]["by_guidance"]) == {"1.0", "4.0"}
    scores = result["text_to_image"]["by_guidance"]["4.0"]  # the sampler's cost beside its quality (notebook 08)
    assert result["text_to_image"]["model_calls"] == scores["model_calls"] == 5
    assert scores["sample_seconds"] > 0 and scores["seconds_per_sample"] == pytest.approx(scores["sample_seconds"] / 8)
    for bad, message in ((["--guidance", "0.5"], "guidance_scale must be a number >= 1"),
                         (["--steps", "0"], "steps must be an int from 1 to T=100"),
                         (["--sampler", "ddim", "--steps", "101"], "steps must be an int from 1 to T=100")):
        assert main(["evaluate", str(run), "--fast", "--device", "cpu", "-n", "8", *bad]) == 2
        assert message in capsys.readouterr().err
    judge = course_home / "checkpoints" / "fast" / "judge_32.pt"
    assert judge.exists()  # trained once, reused by the next evaluation
    other = tmp_path / "judge_64.pt"
    from minildm.judge import JudgeConfig, train_judge
    from minildm.train import TrainConfig
    train_judge(JudgeConfig(image_size=64, channels=8), TrainConfig(steps=1, batch_size=2), CPU, other, progress=False)
    assert main(["evaluate", str(run), "--fast", "--device", "cpu", "-n", "8", "--judge", str(other)]) == 2
    assert "judge for 64x64 images, but the images to judge are 32x32" in capsys.readouterr().err


def test_denoiser_cross_attention_ignores_padding(trained):
    """With mask_padding the denoiser's output does not depend on how much padding follows the caption: the same
    caption encoded to 32 tokens or to just its own gives the same prediction."""
    *_, denoiser, _schedule = trained
    assert denoiser.text_cfg.mask_padding
    caption = "a big red circle at the center"
    ids = denoiser.tokenize([caption])
    short = ids[:, : int((ids != 0).sum())]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500 if denoiser.unet.cfg.num_timesteps > 500 else 50])
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, ids), denoiser(x, t, short), atol=1e-5, rtol=1e-4)
        denoiser.text_cfg.mask_padding = False
        try:
            assert not torch.allclose(denoiser(x, t, ids), denoiser(x, t, short), atol=1e-5)
        finally:
            denoiser.text_cfg.mask_padding = True


def test_evaluation_table_gives_the_binomial_standard_error_of_the_objects_figure():
    """sqrt(p (1 - p) / n) in points: p = 0.9 of n = 100 objects is +- 3.0; p = 0.99 of 997 about +- 0.3."""
    from minildm.cli import format_evaluation

    def result(p, n):
        row = {"place": 1.0, "shape": p, "colour": 1.0, "size": 1.0, "object": p, "caption": p, "extra_per_image": 0.0,
               "objects": n, "fd": 1.0, "fd_ratio": 1.0, "kid": 0.0, "kid_std": 0.0}
        first = {"object": 1.0}
        return {"first_stage": {"n": 8, "psnr": 30.0, "judge_on_reconstructions": first, "judge_on_real": first},
                "text_to_image": {"n": 8, "sampler": "ddpm", "steps": 10, "fd_real_floor": 1.0,
                                  "by_guidance": {"3.0": row}}}

    assert "100 objects per scale: an objects figure has a sampling error of about +- 3.0 points" in \
        format_evaluation(result(0.9, 100))
    assert "about +- 0.3 points" in format_evaluation(result(0.99, 997))
