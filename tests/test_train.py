"""The trainer: a resumed run equals an uninterrupted one; interruptions save; EMA and logs behave."""

import pytest
import torch
from torch import nn

from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.data import dataset_batch_at
from minildm.device import Runtime
from minildm.train import TrainConfig, Trainer

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)


class LinearRegression(nn.Module):
    """A toy task: fit y = 3x - 1 with one linear layer (plus a second optimiser, as a GAN would have)."""

    kind = "toy"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1)
        self.critic = nn.Linear(1, 1)

    def param_groups(self):
        return {"model": list(self.model.parameters()), "critic": list(self.critic.parameters())}

    def losses(self, batch, step):
        x, y = batch
        loss = (self.model(x) - y).pow(2).mean()
        critic = self.critic(x).pow(2).mean()
        return {"model": loss, "critic": critic}, {"loss": loss.detach()}

    def ema_module(self):
        return self.model

    def config_dict(self):
        return {"in": 1}


def batch_at(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 1, generator=g)
    return x, 3 * x - 1


def config(**changes):
    return TrainConfig(**{"steps": 20, "batch_size": 16, "lr": 0.2, "ckpt_every": 5, "log_every": 5, **changes})


def test_training_reduces_the_loss_and_logs_floats():
    trainer = Trainer(LinearRegression(), config(), CPU)
    history = trainer.fit(batch_at, progress=False)
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    assert all(isinstance(v, (float, int)) for v in history[-1].values()), "logs must be plain numbers, not tensors"
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = Trainer(LinearRegression(), config(), CPU)
    straight.fit(batch_at, progress=False)

    first = Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt")
    first.fit(batch_at, steps=10, progress=False)  # "interrupted" after 10 steps, checkpoint on disk
    resumed = Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt")
    assert resumed.step == 10
    resumed.fit(batch_at, progress=False)

    for a, b in zip(straight.task.state_dict().values(), resumed.task.state_dict().values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight.ema.shadow.values(), resumed.ema.shadow.values()):
        torch.testing.assert_close(a, b)
    assert [h["step"] for h in resumed.history] == [5, 10, 15, 20]


def test_keyboard_interrupt_saves_a_checkpoint_to_resume_from(tmp_path):
    def interrupting(step):
        if step == 7:
            raise KeyboardInterrupt
        return batch_at(step)

    trainer = Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(interrupting, progress=False)
    state = load_checkpoint(tmp_path / "ck.pt", kind="toy")
    assert state["step"] == 7 and set(state["optimizers"]) == {"model", "critic"}


def test_a_run_found_in_its_checkpoint_says_whether_it_resumes_or_is_finished(tmp_path, capsys):
    Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt").fit(batch_at, steps=10, progress=False)
    Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt").fit(batch_at, steps=15)
    assert "resuming from step 10" in capsys.readouterr().out
    # Run again asking for fewer steps than the checkpoint has (an option not repeated): nothing trains, and it says so.
    trainer = Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt")
    trainer.fit(batch_at, steps=5)
    assert trainer.step == 15 and "already trained" in (out := capsys.readouterr().out) and "more than the 5" in out


def test_time_budget_stops_training_and_is_remembered(tmp_path):
    trainer = Trainer(LinearRegression(), config(steps=10**6, max_seconds=0.0), CPU, tmp_path / "ck.pt")
    trainer.fit(batch_at, progress=False)
    assert trainer.step == 0
    trainer = Trainer(LinearRegression(), config(steps=10**6, max_seconds=0.3, log_every=1), CPU, tmp_path / "b.pt")
    trainer.fit(batch_at, progress=False)
    steps = trainer.step
    assert steps > 0
    again = Trainer(LinearRegression(), config(steps=10**6, max_seconds=0.3, log_every=1), CPU, tmp_path / "b.pt")
    again.fit(batch_at, progress=False)
    assert again.step == steps, "a finished run must not train further when loaded again"


def test_loading_a_finished_run_leaves_its_checkpoint_untouched(tmp_path):
    path = tmp_path / "done.pt"
    Trainer(LinearRegression(), config(), CPU, path).fit(batch_at, progress=False)
    written = path.stat().st_mtime_ns
    again = Trainer(LinearRegression(), config(), CPU, path)
    again.fit(batch_at, progress=False)
    assert again.step == config().steps and path.stat().st_mtime_ns == written


def test_checkpoint_of_another_kind_is_refused(tmp_path):
    Trainer(LinearRegression(), config(), CPU, tmp_path / "ck.pt").fit(batch_at, steps=5, progress=False)

    class Other(LinearRegression):
        kind = "other"

    with pytest.raises(CheckpointError, match="holds a 'toy' checkpoint"):
        Trainer(Other(), config(), CPU, tmp_path / "ck.pt")


def test_dataset_batches_are_deterministic_and_cover_an_epoch():
    dataset = [torch.tensor([i]) for i in range(10)]
    batches = dataset_batch_at(dataset, batch_size=5, seed=3)
    epoch = torch.cat([batches(0), batches(1)]).flatten().tolist()
    assert sorted(epoch) == list(range(10))
    assert torch.equal(batches(2), dataset_batch_at(dataset, batch_size=5, seed=3)(2))
    assert epoch != torch.cat([batches(2), batches(3)]).flatten().tolist()


def test_value_checks_skip_only_cuda_tensors_inside_the_training_block():
    """Inside `no_value_checks` (where the Trainer runs its steps) a CPU timestep out of range is still an error:
    reading a CPU tensor costs no wait. Outside it the check runs as always."""
    from minildm.device import may_read_values, no_value_checks
    from minildm.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(in_channels=1, image_size=8, base_channels=8, channel_mult=(1,), attention_levels=(),
                           num_timesteps=10))
    x = torch.zeros(2, 1, 8, 8)
    with no_value_checks():
        assert may_read_values(torch.zeros(1))
        with pytest.raises(ValueError, match="t must lie in"):
            unet(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="t must lie in"):
        unet(x, torch.tensor([0, 10]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_cuda_training_step_never_makes_the_host_wait(stage):
    """One Trainer step, data drawn and encoded included, runs without a single host-device synchronisation
    (torch.cuda.set_sync_debug_mode("error") turns each one into an error): the CPU stays ahead of the GPU."""
    from minildm.autoencoder import Autoencoder
    from minildm.config import autoencoder_recipe, diffusion_recipe
    from minildm.data import shapes_batch_at
    from minildm.device import setup
    from minildm.pipeline import AutoencoderTask, DiffusionTask, diffusion_batch_fn

    rt = setup(0, device="cuda", fast=True, verbose=False)
    ae_recipe = autoencoder_recipe(fast=True)
    if stage == "autoencoder":
        task, train = AutoencoderTask(ae_recipe.model, ae_recipe.loss), ae_recipe.train
        batch_at = shapes_batch_at(ae_recipe.data, 8, rt.device)
    else:
        recipe = diffusion_recipe("latent", fast=True)
        task, train = DiffusionTask(recipe.unet, recipe.text, recipe.diffusion), recipe.train
        autoencoder = Autoencoder(ae_recipe.model).to(rt.device).eval().requires_grad_(False)
        batch_at = diffusion_batch_fn(recipe.data, 8, rt, autoencoder)
    trainer = Trainer(task, train, rt)
    trainer.train_step(batch_at(0))  # warm-up: cuDNN and the allocators settle
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batch_at(1))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cpu_threads_follow_omp_num_threads_else_half_the_cores(monkeypatch):
    """Fast mode on a busy two-core laptop: one torch thread, not two that wait for each other."""
    import os

    from minildm.device import cpu_threads, setup

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cpu_threads() == 8
    before = torch.get_num_threads()
    try:
        rt = setup(0, device="cpu", verbose=False)
        assert torch.get_num_threads() == 8 and "cpu (8 threads)" in rt.describe()
    finally:
        torch.set_num_threads(before)


class CompiledToy(LinearRegression):
    """The toy task naming its model as the network to compile (as DiffusionTask names its UNet)."""

    def compile_target(self):
        return self.model


def test_compile_mode_is_checked_and_ignored_off_cuda(capsys):
    with pytest.raises(ValueError, match="not a torch.compile mode"):
        Trainer(CompiledToy(), config(compile="fastest"), CPU)
    trainer = Trainer(CompiledToy(), config(compile="reduce-overhead"), CPU)
    assert "compilation is used on CUDA only" in capsys.readouterr().out
    eager = Trainer(CompiledToy(), config(), CPU)
    trainer.fit(batch_at, progress=False)
    eager.fit(batch_at, progress=False)
    assert trainer.compiled is None and trainer.compile_seconds is None
    torch.testing.assert_close(trainer.task.state_dict(), eager.task.state_dict(), rtol=0, atol=0)
    Trainer(LinearRegression(), config(compile="default"), CPU)  # a task without compile_target(): a note
    assert "names no network to compile" in capsys.readouterr().out
    assert Trainer(CompiledToy(), config(compile="cudagraphs"), CPU).compiled is None  # the backend, accepted too
    assert "compilation is used on CUDA only" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile is used on CUDA only")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "cudagraphs"])
def test_cuda_compiled_training_matches_eager_and_leaves_the_model_plain(mode):
    rt = Runtime(device=torch.device("cuda"), dtype=torch.float32, fast=True)
    compiled = Trainer(CompiledToy(), config(compile=mode), rt)
    eager = Trainer(CompiledToy(), config(), rt)

    def cuda_batch_at(step):
        return tuple(v.cuda() for v in batch_at(step))

    compiled.fit(cuda_batch_at, progress=False)
    eager.fit(cuda_batch_at, progress=False)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert compiled.task.model._compiled_call_impl is None, "after fit() the network runs eagerly again"
    assert list(compiled.task.state_dict()) == list(eager.task.state_dict()), "compiling must not rename weights"
    torch.testing.assert_close(compiled.task.state_dict(), eager.task.state_dict(), rtol=1e-4, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_training(capsys):
    """A compiler failure in the first compiled step (simulated: an error raised from torch._dynamo's namespace)
    is reported and training goes on eagerly; any other error still stops training."""

    class BackendCompilerFailed(RuntimeError):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"
    trainer = Trainer(CompiledToy(), config(), CPU)
    trainer.compiled, trainer.cfg.compile = trainer.task.model, "default"  # as on CUDA
    real_step, calls = trainer.train_step, []

    def failing_once(batch):
        calls.append(1)
        if len(calls) == 1:
            raise BackendCompilerFailed("inductor: no C compiler")
        return real_step(batch)

    trainer.train_step = failing_once
    history = trainer.fit(batch_at, progress=False)
    assert "failed: BackendCompilerFailed: inductor: no C compiler; training on without compilation" in \
        capsys.readouterr().err
    assert trainer.compiled is None and trainer.task.model._compiled_call_impl is None
    assert trainer.step == 20 and len(calls) == 21 and history[-1]["loss"] < 0.2 * history[0]["loss"]

    other = Trainer(CompiledToy(), config(), CPU)
    other.compiled, other.cfg.compile = other.task.model, "default"
    other.train_step = lambda batch: (_ for _ in ()).throw(ValueError("a bug in the task"))
    with pytest.raises(ValueError, match="a bug in the task"):
        other.fit(batch_at, progress=False)


def test_minildm_train_compiles_by_default_only_on_a_gpu_in_full_mode():
    import argparse

    from minildm.cli import compile_mode

    def mode(flag, device, fast):
        return compile_mode(argparse.Namespace(compile=flag),
                            Runtime(device=torch.device(device), dtype=torch.float32, fast=fast))

    assert mode("auto", "cuda", False) == "cudagraphs"
    assert mode("auto", "cuda", True) is None and mode("auto", "cpu", False) is None
    assert mode("off", "cuda", False) is None and mode("default", "cpu", True) == "default"
