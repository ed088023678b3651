"""One process of a data-parallel test run (tests/test_distributed.py starts two, under torchrun or by hand).

    python tests/distributed_worker.py OUT    # with torchrun's environment variables for two processes

Both ranks: a batch size that does not divide (the error is written to OUT/batch_error_rank<r>.txt), the fast
diffusion and autoencoder recipes for 4 steps each (what every rank ended with goes to OUT/<stage>_rank<r>.pt, rank
0 writes the checkpoints), then a toy run in which rank 1 raises at step 2: rank 0 must stop with a clear message.
One launch for all of it: starting a process (importing torch) costs more than these few steps.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

from minildm import distributed
from minildm.autoencoder import Autoencoder
from minildm.config import autoencoder_recipe, diffusion_recipe
from minildm.device import setup
from minildm.pipeline import DiffusionTask, train_autoencoder, train_diffusion
from minildm.train import TrainConfig, Trainer

STEPS = 4


def run_stage(stage: str, folder: Path, rt, steps: int = STEPS):
    """Train the fast diffusion recipe (latent, on an untrained autoencoder: it costs the same as a trained one) or
    the fast autoencoder recipe for `steps` steps, global batch 16, into folder/<stage>.pt (resuming from it);
    returns (the EMA model, the history). Seeded here, so one process and every rank start from the same weights.

    The autoencoder trains without its perceptual term: that term makes the first steps chaotic in float32 (one
    process that averages the gradients of the two halves of each batch, which is the same sum in another order,
    ends with reconstructions up to 0.15 away from the ones of the whole batch after 4 steps; 0.0003 without it),
    so it would hide what this test looks for."""
    ae_recipe = autoencoder_recipe(fast=True)
    ae_recipe.loss = dataclasses.replace(ae_recipe.loss, perceptual_weight=0.0)
    ae_recipe.train = dataclasses.replace(ae_recipe.train, steps=steps, log_every=2, ckpt_every=2)
    torch.manual_seed(0)
    if stage == "autoencoder":
        return train_autoencoder(ae_recipe, rt, folder / "autoencoder.pt", progress=False)
    autoencoder = Autoencoder(ae_recipe.model).to(rt.device).eval().requires_grad_(False)
    recipe = diffusion_recipe("latent", fast=True, latent_shape=autoencoder.cfg.latent_shape)
    recipe.train = dataclasses.replace(recipe.train, steps=steps, log_every=2, ckpt_every=2)
    denoiser, _, history = train_diffusion(recipe, rt, folder / "diffusion.pt", autoencoder=autoencoder,
                                           progress=False)
    return denoiser, history


def train(out: Path, rt) -> None:
    rank = distributed.place().rank
    recipe = diffusion_recipe("latent", fast=True)
    try:
        Trainer(DiffusionTask(recipe.unet, recipe.text, recipe.diffusion),
                dataclasses.replace(recipe.train, batch_size=15), rt)
    except ValueError as err:
        (out / f"batch_error_rank{rank}.txt").write_text(str(err))
    for stage in ("diffusion", "autoencoder"):
        model, history = run_stage(stage, out, rt)
        torch.save({"ema": model.state_dict(), "history": history}, out / f"{stage}_rank{rank}.pt")


class Line(nn.Module):
    """A toy task whose data feeder fails on rank 1."""

    kind = "toy"

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(1, 1)

    def param_groups(self):
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step):
        loss = (self.model(batch) - 3 * batch).pow(2).mean()
        return {"model": loss}, {"loss": loss.detach()}

    def ema_module(self):
        return None

    def config_dict(self):
        return {}


def fail(out: Path, rt) -> None:
    rank = distributed.place().rank

    def batch_at(step):
        if rank == 1 and step == 2:
            raise ValueError("rank 1 could not read its data (the test's deliberate failure)")
        return torch.randn(4, 1)

    Trainer(Line(), TrainConfig(steps=100, batch_size=8, log_every=1), rt, out / "toy.pt").fit(batch_at, progress=False)


def main() -> None:
    out = Path(sys.argv[1])
    rt = setup(0, device="cpu", fast=True, verbose=False)
    torch.set_num_threads(1)
    train(out, rt)
    distributed.barrier("the end of the training part")
    (out / f"trained_rank{distributed.place().rank}.txt").write_text("ok")
    fail(out, rt)
    distributed.cleanup()


if __name__ == "__main__":
    main()
