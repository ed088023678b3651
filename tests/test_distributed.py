"""Data parallelism on the CPU (gloo): two processes train what one process trains on the same global batch.

Two processes are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; not
through torchrun itself, whose agent would kill rank 0 as soon as rank 1 fails and hide rank 0's message), once for
all the tests here (tests/distributed_worker.py): starting a process that imports torch costs more than the steps.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minildm
from minildm import distributed
from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.data import ShapesConfig, dataset_batch_at, shapes_batch_at
from minildm.device import Runtime

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(minildm.__file__).resolve().parents[1]  # the checkout under test, for the worker processes


def worker_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINILDM_FAST": "1", "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two processes started as torchrun starts them: they train the fast diffusion and autoencoder recipes for 4
    steps, then rank 1 fails on purpose (tests/distributed_worker.py). Returns (folder, (stderr of rank 0, of rank 1),
    return codes, seconds from the failure to the end)."""
    out = tmp_path_factory.mktemp("two_ranks")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=worker_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                        MINILDM_DIST_TIMEOUT="60"))
             for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    seconds = time.time() - (out / "trained_rank0.txt").stat().st_mtime if (out / "trained_rank0.txt").exists() else 0
    for r, (stdout, stderr) in enumerate(outputs):
        assert (out / f"trained_rank{r}.txt").exists(), f"rank {r} failed while training:\n{stdout}\n{stderr[-3000:]}"
    assert outputs[0][0].count("global batch 16") == 2, "each stage prints its global batch (rank 0 only)"
    assert "global batch" not in outputs[1][0]
    return out, [e for _, e in outputs], [p.returncode for p in procs], seconds


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def one_process(folder, stage: str, steps: int):
    """The same recipe trained by one process on the same global batch (resuming from folder/<stage>.pt)."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from distributed_worker import run_stage
    finally:
        sys.path.pop(0)
    return run_stage(stage, folder, CPU, steps)[0]


def output_difference(model, state: dict, other_state: dict) -> float:
    """The largest difference between the outputs of `model` with two sets of weights on fixed inputs: what the
    weights compute, which is what has to agree (Adam turns float rounding in the gradient of a parameter the loss
    does not depend on, such as a bias right before a GroupNorm of one channel, into steps of up to the learning
    rate, which change no output)."""
    import copy

    outputs = []
    for weights in (state, other_state):
        m = copy.deepcopy(model).eval()
        m.load_state_dict(weights)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if hasattr(m, "tokenize"):  # the denoiser
                cfg = m.unet.cfg
                x = torch.randn(4, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
                ids = m.tokenize(["a big red circle at the center", "", "a tiny blue ring at the top left",
                                  "a small green hexagon at the right"])
                outputs.append(m(x, torch.tensor([0, 10, 50, 99]), ids))
            else:
                x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
                outputs.append(m(x, sample=False).recon)
    return (outputs[0] - outputs[1]).abs().max().item()


@pytest.mark.parametrize("stage", ["diffusion", "autoencoder"])
def test_two_ranks_end_with_the_weights_of_one_process_on_the_same_global_batch(two_ranks, tmp_path, stage):
    two_ranks = two_ranks[0]
    ranks = [torch.load(two_ranks / f"{stage}_rank{r}.pt") for r in (0, 1)]
    for a, b in zip(ranks[0]["ema"].values(), ranks[1]["ema"].values()):
        assert torch.equal(a, b), "the ranks' (EMA) weights must be identical, bit for bit"
    logs = [[{k: v for k, v in h.items() if k != "images_per_s"} for h in r["history"]] for r in ranks]  # own clocks
    assert logs[0] == logs[1], "every rank logs the losses averaged over the ranks"
    assert [h["step"] for h in ranks[0]["history"]] == [2, 4]

    single = one_process(tmp_path, stage, steps=4)
    mine, theirs = load_checkpoint(tmp_path / f"{stage}.pt"), load_checkpoint(two_ranks / f"{stage}.pt")
    assert theirs["step"] == 4 and not list(two_ranks.glob(".*.tmp")), "rank 0 wrote one whole checkpoint"
    loss = "loss" if stage == "diffusion" else "loss_g"
    assert [h[loss] for h in theirs["history"]] == pytest.approx([h[loss] for h in mine["history"]], rel=1e-5)
    raw = max_difference(theirs["model"], mine["model"])
    ema = max_difference(ranks[0]["ema"], single.state_dict())
    out = output_difference(single, ranks[0]["ema"], single.state_dict())
    print(f"\n{stage}, 2 ranks vs 1 process after 4 steps: max |weight difference| {raw:.2e} (raw), {ema:.2e} (EMA); "
          f"max |output difference| {out:.2e}")
    # 4 Adam steps at lr 1e-3 move a weight by up to 4e-3; the autoencoder's largest differences are biases whose
    # gradient is zero up to rounding (each before a GroupNorm of one channel), so its bound is looser.
    bound = 2e-4 if stage == "diffusion" else 2e-3
    assert raw < bound and ema < bound, f"weights up to {max(raw, ema):.2e} apart"
    assert out < 1e-3, f"the EMA models compute outputs up to {out:.2e} apart"


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    """Checkpoints hold the plain module and the step; the feeders' global batches do not depend on the number of
    processes, so 2 ranks for 4 steps, then 1 process for 2 more, equals 1 process for 6 steps."""
    two_ranks = two_ranks[0]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    resumed.mkdir(), straight.mkdir()
    shutil.copy(two_ranks / "diffusion.pt", resumed / "diffusion.pt")
    one_process(resumed, "diffusion", steps=6)
    model = one_process(straight, "diffusion", steps=6)
    a, b = load_checkpoint(resumed / "diffusion.pt"), load_checkpoint(straight / "diffusion.pt")
    assert a["step"] == b["step"] == 6
    diff = max_difference(a["model"], b["model"])
    out = output_difference(model, a["ema"]["shadow"] | a["ema"]["buffers"], b["ema"]["shadow"] | b["ema"]["buffers"])
    print(f"\ndiffusion, 2 ranks for 4 steps + 1 process for 2 vs 1 process for 6: max |weight difference| {diff:.2e}, "
          f"max |output difference| {out:.2e}")
    assert diff < 5e-4 and out < 1e-3


def test_a_world_size_that_does_not_divide_the_batch_is_refused(two_ranks):
    two_ranks = two_ranks[0]
    for rank in (0, 1):
        message = (two_ranks / f"batch_error_rank{rank}.txt").read_text()
        assert "global batch size 15 does not divide among 2 processes" in message and "multiple of 2" in message
    with pytest.raises(ValueError, match="multiple of 4"):
        distributed.local_batch_size(18, world_size=4)
    with pytest.raises(ValueError, match="does not divide among 3"):
        shapes_batch_at(ShapesConfig(image_size=16), 16, rank=0, world_size=3)


def test_a_failing_rank_stops_the_other_with_a_clear_message(two_ranks):
    """Rank 1 raises at step 2 of a toy run; rank 0, waiting for its gradients, stops too (no hang) and says why."""
    _, errors, returncodes, seconds = two_ranks
    assert returncodes[1] != 0 and "could not read its data" in errors[1]
    assert "rank 1 of 2 failed at step 2" in errors[1]
    assert returncodes[0] != 0, errors[0][-2000:]
    assert "DistributedError: rank 0 of 2: lost contact with the other processes during averaging the gradients" \
        in errors[0], errors[0][-2000:]
    assert seconds < 30, "the other rank must stop at once, not after the timeout (60 s)"


def test_the_ranks_parts_of_a_batch_are_disjoint_and_make_up_the_global_batch():
    cfg = ShapesConfig(image_size=16)
    whole = shapes_batch_at(cfg, 6, rank=0, world_size=1)(3)
    parts = [shapes_batch_at(cfg, 6, rank=r, world_size=3)(3) for r in range(3)]
    assert [c for p in parts for c in p["caption"]] == whole["caption"]
    torch.testing.assert_close(torch.cat([p["image"] for p in parts]), whole["image"])
    dataset = [torch.tensor([i]) for i in range(10)]
    whole = dataset_batch_at(dataset, 4, seed=1, rank=0, world_size=1)
    parts = [dataset_batch_at(dataset, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(4):  # across an epoch boundary too
        assert torch.equal(torch.cat([p(step) for p in parts]), whole(step))


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    here = distributed.init(torch.device("cpu"))
    assert here == distributed.Place() and not here.distributed and here.is_main
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set: start the processes with torchrun"):
        distributed.init(torch.device("cpu"))


def test_resuming_a_checkpoint_of_another_model_config_is_refused(tmp_path):
    from minildm.config import diffusion_recipe
    from minildm.pipeline import DiffusionTask
    from minildm.train import Trainer

    recipe = diffusion_recipe("latent", fast=True)
    Trainer(DiffusionTask(recipe.unet, recipe.text, recipe.diffusion), recipe.train, CPU, tmp_path / "d.pt").save()
    wider = recipe.unet.__class__(**{**recipe.unet.__dict__, "base_channels": 16})
    with pytest.raises(CheckpointError, match=r"another config \(unet.base_channels: checkpoint 32, this run 16"):
        Trainer(DiffusionTask(wider, recipe.text, recipe.diffusion), recipe.train, CPU, tmp_path / "d.pt")
