"""The stages wired together: what each stage trains, and how a trained model is loaded back.

Used by the `minildm` command and the notebooks. A *task* bundles the models and the loss of one
stage for the `Trainer` (train.py): `param_groups`, `losses`, `ema_module`, `kind`, `config_dict`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from minildm.autoencoder import Autoencoder, AutoencoderConfig
from minildm.checkpoint import load_checkpoint
from minildm.config import HOLDOUT_SEED, AutoencoderRecipe
from minildm.data.shapes import ShapesConfig, ShapesDataset
from minildm.device import Runtime
from minildm.losses import AutoencoderLoss, AutoencoderLossConfig
from minildm.metrics import psnr
from minildm.train import Trainer


class AutoencoderTask(nn.Module):
    """Stage 2: the autoencoder and its loss (L1 + perceptual + regulariser + PatchGAN)."""

    kind = "autoencoder"

    def __init__(self, model_cfg: AutoencoderConfig, loss_cfg: AutoencoderLossConfig):
        super().__init__()
        self.model_cfg, self.loss_cfg = model_cfg, loss_cfg
        self.autoencoder = Autoencoder(model_cfg)
        self.loss = AutoencoderLoss(loss_cfg)

    def param_groups(self) -> dict:
        groups = {"autoencoder": list(self.autoencoder.parameters())}
        if self.loss.discriminator is not None:
            groups["discriminator"] = list(self.loss.discriminator.parameters())
        return groups

    def losses(self, batch: dict, step: int):
        x = batch["image"]
        out = self.autoencoder(x)
        loss_g, logs = self.loss.generator_loss(x, out, self.autoencoder.decoder_last_layer, step)
        losses = {"autoencoder": loss_g}
        if self.loss.discriminator is not None:
            losses["discriminator"], logs_d = self.loss.discriminator_loss(x, out.recon, step)
            logs.update(logs_d)
        return losses, logs

    def ema_module(self) -> nn.Module:
        return self.autoencoder

    def config_dict(self) -> dict:
        return {"model": asdict(self.model_cfg), "loss": asdict(self.loss_cfg)}


def shapes_batch_fn(data_cfg: ShapesConfig, batch_size: int, device):
    """batch_at(step) for the Shapes data set: images step*B ... step*B + B - 1, drawn on `device`."""
    dataset = ShapesDataset(data_cfg)
    return lambda step: dataset.batch(range(step * batch_size, (step + 1) * batch_size), device=device)


@torch.no_grad()
def evaluate_reconstruction(autoencoder: Autoencoder, data_cfg: ShapesConfig, runtime: Runtime,
                            n: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Per-image PSNR (dB) of the autoencoder's reconstructions of `n` held-out Shapes images
    (seed HOLDOUT_SEED, never seen in training), using the posterior mean."""
    autoencoder.eval()
    held_out = ShapesDataset(ShapesConfig(image_size=data_cfg.image_size, seed=HOLDOUT_SEED))
    scores = []
    for start in range(0, n, batch_size):
        x = held_out.batch(range(start, min(start + batch_size, n)), device=runtime.device)["image"]
        with runtime.autocast():
            recon = autoencoder(x, sample=False).recon
        scores.append(psnr(x, recon.float().clamp(-1, 1)).cpu())
    return torch.cat(scores)


def train_autoencoder(recipe: AutoencoderRecipe, runtime: Runtime, ckpt_path: str | Path,
                      progress: bool = True) -> tuple[Autoencoder, list[dict]]:
    """Train (or resume, or just load when finished) an autoencoder; returns the EMA model with its
    latent scale factor set, and the training history."""
    task = AutoencoderTask(recipe.model, recipe.loss)
    trainer = Trainer(task, recipe.train, runtime, ckpt_path)
    trainer.fit(shapes_batch_fn(recipe.data, recipe.train.batch_size, runtime.device), progress=progress)
    autoencoder = task.autoencoder
    if trainer.ema is not None:
        trainer.ema.copy_to(autoencoder)  # publish the averaged weights
    if "scale_factor" not in (trainer.extra or {}):
        batches = (ShapesDataset(recipe.data).batch(range(i * 64, (i + 1) * 64), device=runtime.device)["image"]
                   for i in range(8))
        autoencoder.eval()
        with runtime.autocast():
            trainer.extra = {"scale_factor": autoencoder.compute_scale_factor(batches)}
        trainer.save()
    autoencoder.scale_factor.fill_(trainer.extra["scale_factor"])
    return autoencoder.eval(), trainer.history


def load_autoencoder(path: str | Path, device="cpu", use_ema: bool = True) -> Autoencoder:
    """Rebuild a trained autoencoder from its checkpoint (EMA weights and latent scale factor)."""
    state = load_checkpoint(path, kind="autoencoder", map_location=device)
    autoencoder = Autoencoder(AutoencoderConfig(**state["config"]["model"])).to(device)
    prefix = "autoencoder."
    autoencoder.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    if use_ema and state.get("ema"):
        params = dict(autoencoder.named_parameters())
        with torch.no_grad():
            for name, value in state["ema"]["shadow"].items():
                params[name].copy_(value)
    if (state.get("extra") or {}).get("scale_factor") is not None:
        autoencoder.scale_factor.fill_(state["extra"]["scale_factor"])
    return autoencoder.eval()
