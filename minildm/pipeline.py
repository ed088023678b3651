"""The stages wired together: what each stage trains, and how a trained model is loaded back.

Used by the `minildm` command and the notebooks. A *task* bundles the models and the loss of one
stage for the `Trainer` (train.py): `param_groups`, `losses`, `ema_module`, `kind`, `config_dict`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from minildm import distributed
from minildm.autoencoder import Autoencoder, AutoencoderConfig
from minildm.checkpoint import load_checkpoint
from minildm.classifier import Classifier, accuracy
from minildm.config import HOLDOUT_SEED, AutoencoderRecipe, DiffusionRecipe
from minildm.data.images import ImageTensors
from minildm.data.shapes import ShapesConfig, ShapesDataset, shapes_batch_at, vocabulary
from minildm.denoiser import ClassDenoiser, Denoiser
from minildm.device import Runtime, cuda_graphed
from minildm.diffusion import DiffusionConfig, diffusion_loss
from minildm.ema import EMA
from minildm.judge import ShapesJudge, caption_accuracy
from minildm.losses import AutoencoderLoss, AutoencoderLossConfig
from minildm.metrics import frechet_distance, kid, psnr
from minildm.samplers import DEFAULT_STEPS, check_guidance, model_calls, sample, sampler_timesteps
from minildm.schedules import NoiseSchedule
from minildm.text import TextConfig, WordTokenizer, check_prompts
from minildm.train import Trainer
from minildm.unet import UNetConfig


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
        if self.loss.discriminator is not None:  # Adam (0.5, 0.9) without clipping, as in taming-transformers
            groups["discriminator"] = {"params": list(self.loss.discriminator.parameters()),
                                       "betas": self.loss_cfg.disc_betas, "grad_clip": None}
        return groups

    def losses(self, batch: dict, step: int):
        x = batch["image"]
        noise = None
        if self.model_cfg.regularizer == "kl":  # the posterior's noise, drawn for the global batch (distributed.py)
            f, world = self.model_cfg.downsample_factor, distributed.place().world_size
            shape = (len(x) * world, self.model_cfg.latent_channels, x.shape[2] // f, x.shape[3] // f)
            noise = distributed.part_of(torch.randn(shape, generator=distributed.step_generator(step, x.device),
                                                    device=x.device))
        out = self.autoencoder(x, noise=noise)
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


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, images: torch.Tensor, runtime: Runtime, batch_size: int = 128) -> torch.Tensor:
    """The autoencoder's reconstructions (posterior mean) of images (B, C, H, W), in batches, clamped to [-1, 1]."""
    autoencoder.eval()
    recons = []
    for x in images.split(batch_size):
        with runtime.autocast():
            recons.append(autoencoder(x, sample=False).recon.float().clamp(-1, 1))
    return torch.cat(recons)


def evaluate_reconstruction(autoencoder: Autoencoder, data_cfg: ShapesConfig, runtime: Runtime,
                            n: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Per-image PSNR (dB) of the autoencoder's reconstructions of `n` held-out Shapes images
    (seed HOLDOUT_SEED, never seen in training), using the posterior mean."""
    x = held_out_batch(n, data_cfg.image_size, runtime.device)["image"]
    return psnr(x, reconstruct(autoencoder, x, runtime, batch_size)).cpu()


def train_autoencoder(recipe: AutoencoderRecipe, runtime: Runtime, ckpt_path: str | Path,
                      progress: bool = True, images_at=None) -> tuple[Autoencoder, list[dict]]:
    """Train (or resume, or just load when finished) an autoencoder; returns the EMA model with its
    latent scale factor set, and the training history. Images come from Shapes (recipe.data), or from
    `images_at(step)` -> {"image": ...} at the recipe's batch size (a real data set, `tensor_batch_at`)."""
    task = AutoencoderTask(recipe.model, recipe.loss)
    trainer = Trainer(task, recipe.train, runtime, ckpt_path)
    shapes = images_at is None
    images_at = images_at or shapes_batch_at(recipe.data, recipe.train.batch_size, runtime.device)
    trainer.fit(images_at, progress=progress)
    autoencoder = task.autoencoder
    if "scale_factor" not in trainer.extra:  # computed once after training, for the EMA weights
        if shapes:  # 512 Shapes images, the same on every rank under torchrun
            batch_at = shapes_batch_at(recipe.data, 64, runtime.device, rank=0, world_size=1)
            batches = (batch_at(i)["image"] for i in range(8))
        else:  # a real data set's feeder (under torchrun this rank's part of each batch; rank 0's value is shared)
            batches = (images_at(i)["image"] for i in range(max(1, 512 // recipe.train.batch_size)))
        autoencoder.eval()
        with trainer.ema.applied(autoencoder) if trainer.ema else contextlib.nullcontext(), runtime.autocast():
            scale = autoencoder.compute_scale_factor(batches)
        if distributed.place().distributed:  # each rank saw its own part of the data: rank 0's value for all
            shared = torch.tensor([scale], dtype=torch.float64, device=runtime.device)
            distributed.broadcast_tensors([shared], "sharing the latent scale factor")
            scale = shared.item()
        set_scale_factor(autoencoder, trainer.ema, scale)
        trainer.extra = {"scale_factor": scale}  # marks it as computed for these weights (Trainer.fit clears it)
        trainer.save()  # the raw weights stay in "model" (to resume from), the averaged ones in "ema"
    if trainer.ema is not None:
        trainer.ema.copy_to(autoencoder)  # publish the averaged weights (the scale factor is one of their buffers)
    return autoencoder.eval(), trainer.history


def set_scale_factor(autoencoder: Autoencoder, ema: EMA | None, value: float) -> None:
    """Write the latent scale factor into the autoencoder's buffer and into its EMA copy, so that it is saved
    with both sets of weights in the checkpoint."""
    autoencoder.scale_factor.fill_(value)
    if ema is not None:
        ema.buffers["scale_factor"].fill_(value)


def use_ema_weights(module: nn.Module, ema_state: dict) -> None:
    """Overwrite `module`'s weights with the averaged ones stored in a checkpoint's "ema" entry."""
    ema = EMA(module)
    ema.load_state_dict(ema_state)  # old names converted by the module's upgrade_state_dict (see EMA)
    ema.copy_to(module)


def load_autoencoder(path: str | Path, device="cpu", use_ema: bool = True) -> Autoencoder:
    """Rebuild a trained autoencoder from its checkpoint: its EMA weights, with the latent scale factor among their
    buffers. Checkpoints from before the scale factor was saved with the weights kept it in "extra" only: it is
    taken from there (converted), never left at 1.0."""
    state = load_checkpoint(path, kind="autoencoder", map_location=device)
    task = AutoencoderTask(AutoencoderConfig(**state["config"]["model"]),
                           AutoencoderLossConfig(**state["config"]["loss"]))
    task.load_state_dict(state["model"])
    autoencoder = task.autoencoder.to(device)
    if use_ema and state.get("ema"):
        use_ema_weights(autoencoder, state["ema"])
    saved = (state.get("extra") or {}).get("scale_factor")
    if saved is not None and autoencoder.scale_factor.item() == 1.0:  # an old checkpoint
        autoencoder.scale_factor.fill_(saved)
    return autoencoder.eval()


# ==================================================================================================
# Stages 3-6: text-conditioned diffusion, in pixel space or on the autoencoder's latents
# ==================================================================================================


class DiffusionTask(nn.Module):
    """Stages 5-6: the loss of LDM eq. (1) on (latents or pixels, captions) batches."""

    kind = "diffusion"

    def __init__(self, unet_cfg: UNetConfig, text_cfg: TextConfig, diffusion_cfg: DiffusionConfig,
                 tokenizer: WordTokenizer | None = None, classes: list[str] | None = None):
        super().__init__()
        self.unet_cfg, self.text_cfg, self.diffusion_cfg = unet_cfg, text_cfg, diffusion_cfg
        if diffusion_cfg.condition == "text":
            self.denoiser = Denoiser(unet_cfg, text_cfg, tokenizer or WordTokenizer(vocabulary()))
        else:  # class labels through the class embedder; no classes = unconditional
            if diffusion_cfg.condition == "class" and not classes:
                raise ValueError("condition='class' needs the class names of the data set (classes=[...])")
            self.denoiser = ClassDenoiser(unet_cfg, classes if diffusion_cfg.condition == "class" else [])
        # T lives in the DiffusionConfig (it defines the schedule); the UNet's config only bounds the t it accepts
        if unet_cfg.num_timesteps not in (None, diffusion_cfg.num_timesteps):
            raise ValueError(f"the UNet accepts t in [0, {unet_cfg.num_timesteps - 1}] but the schedule has "
                             f"T = {diffusion_cfg.num_timesteps} steps; give UNetConfig the same num_timesteps "
                             "(or None) as DiffusionConfig")
        self.schedule = NoiseSchedule.from_name(diffusion_cfg.schedule, T=diffusion_cfg.num_timesteps)

    def param_groups(self) -> dict:
        return {"denoiser": list(self.denoiser.parameters())}

    def losses(self, batch: dict, step: int):
        x0 = batch["x"]  # the schedule's tables are buffers of this module: they are on x0's device already
        cfg = self.diffusion_cfg
        # The step's random numbers (dropped conditions, timesteps, noise) are drawn for the global batch from
        # generators seeded by the step; under torchrun each rank keeps its part (distributed.py). One process
        # draws the same numbers, and so does a resumed run.
        n = len(x0) * distributed.place().world_size
        drops = distributed.step_generator(step, "cpu", seed=1)  # another seed than the noise's: independent draws
        dropped = distributed.part_of(torch.rand(n, generator=drops) < cfg.caption_drop)  # (B,) bool, on the CPU
        if cfg.condition == "text":
            ids = self.denoiser.tokenize(["" if drop else c for c, drop in zip(batch["caption"], dropped.tolist())])
        elif cfg.condition == "class":
            labels = batch["label"]
            ids = torch.where(dropped.to(labels.device), self.denoiser.class_embedder.null_class, labels)
        else:  # unconditional: the null class for every image
            ids = torch.full((len(x0),), self.denoiser.class_embedder.null_class, dtype=torch.long, device=x0.device)
        g = distributed.step_generator(step, x0.device)
        t = distributed.part_of(self.schedule.sample_timesteps(n, generator=g, device=x0.device))
        eps = distributed.part_of(torch.randn((n, *x0.shape[1:]), generator=g, device=x0.device, dtype=x0.dtype))
        model = self.denoiser  # with an image-shaped condition (stage 10): the same model, the condition bound
        if "concat" in batch:
            model = functools.partial(self.denoiser, concat=batch["concat"])
        loss, logs = diffusion_loss(model, x0, self.schedule, cfg.prediction, cfg.weighting, ids, t=t, eps=eps)
        return {"denoiser": loss}, {"loss": logs["loss"], "mse": logs["mse"]}

    def ema_module(self) -> nn.Module:
        return self.denoiser

    def compile_target(self) -> nn.Module:
        """The UNet, for `TrainConfig.compile` (the text encoder is small and its input never changes shape)."""
        return self.denoiser.unet

    def config_dict(self) -> dict:
        out = {"unet": asdict(self.unet_cfg), "text": asdict(self.text_cfg), "diffusion": asdict(self.diffusion_cfg)}
        if isinstance(self.denoiser, Denoiser):
            out["tokenizer"] = self.denoiser.tokenizer.state_dict()
        else:
            out["classes"] = self.denoiser.classes
        return out


def diffusion_batch_fn(data_cfg: ShapesConfig, batch_size: int, runtime: Runtime,
                       autoencoder: Autoencoder | None = None, images_at=None, condition=None):
    """batch_at(step) -> {"x": pixels or scaled latents, "caption": [...] or "label": (B,)} from the Shapes data
    set, or from `images_at(step)` -> {"image", "caption" or "label"} (e.g. a real data set). With an autoencoder
    the images are encoded on the fly (frozen, no gradients): that is latent diffusion. With
    `condition(step, batch, x) -> (B, C_c, h, w)` the batch also holds "concat", the image-shaped condition of
    stage 10 (`minildm.applications.conditioned`)."""
    images = images_at or shapes_batch_at(data_cfg, batch_size, runtime.device)

    def batch_at(step: int) -> dict:
        batch = images(step)
        x = batch["image"]
        if autoencoder is not None:
            with torch.no_grad(), runtime.autocast():
                x = autoencoder.encode_latents(x).float()
        out = {"x": x, **{k: batch[k] for k in ("caption", "label") if k in batch}}
        if condition is not None:
            with torch.no_grad():
                out["concat"] = condition(step, batch, x)
        return out

    return batch_at


@torch.no_grad()
def generate(denoiser: Denoiser, captions: list[str], schedule: NoiseSchedule, shape: tuple[int, int, int],
             runtime: Runtime, prediction: str = "eps", guidance_scale: float = 3.0,
             autoencoder: Autoencoder | None = None, seed: int = 0, return_trajectory: bool = False,
             progress: bool = False, cuda_graph: bool | None = None, sampler: str = "ddpm",
             steps: int | None = None, eta: float = 0.0):
    """Sample one image per caption with classifier-free guidance and any sampler of `minildm.samplers`
    (default: DDPM through all T steps; e.g. sampler="dpmpp_2m", steps=20); decode latents if an autoencoder is
    given. Returns images (B, 3, H, W) in [-1, 1] (and the trajectory if asked).
    On CUDA the denoiser runs as a recorded CUDA graph (`device.cuda_graphed`; cuda_graph=False turns it off):
    same numbers, several times fewer seconds, since eager sampling at small batches is launch-bound.
    Bad input is a clear error before any work (e.g. before a graph is recorded): the sampler and the steps (an int
    from 1 to T, `samplers.sampler_timesteps`), the guidance scale (>= 1, `samplers.check_guidance`; the empty caption
    "" is the way to ignore the caption), a caption with words the model never saw or one longer than the text
    encoder reads (`text.check_prompts`); an empty caption draws from the unconditional model, with a warning."""
    sampler_timesteps(schedule, sampler, steps)
    check_guidance(guidance_scale)
    if isinstance(denoiser, Denoiser):
        captions = check_prompts(denoiser.tokenizer, captions, max_length=denoiser.text_cfg.max_length)
    denoiser.eval()
    schedule.to(runtime.device)
    context = denoiser.tokenize(captions)  # (B, L) token ids: the denoiser encodes them at every step
    uncond = denoiser.tokenize([""] * len(captions))
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    use_graph = runtime.device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and runtime.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but this runtime uses {runtime.device}; "
                         "leave cuda_graph=None (graphs on CUDA only) or pass cuda_graph=False")

    def model(x, t, c):
        with runtime.autocast(cache_enabled=not use_graph):
            return denoiser(x, t, c).float()

    if use_graph:  # record one call of the shapes model_output will make: a batch of 2B with guidance
        ctx = context if guidance_scale == 1.0 else torch.cat([uncond, context])
        model = cuda_graphed(model, torch.zeros(len(ctx), *shape, device=runtime.device),
                             torch.zeros(len(ctx), dtype=torch.long, device=runtime.device), ctx)

    result = sample(model, (len(captions), *shape), schedule, sampler=sampler, steps=steps, eta=eta,
                    context=context, prediction=prediction, generator=generator, device=runtime.device,
                    guidance_scale=guidance_scale, uncond_context=uncond, return_trajectory=return_trajectory,
                    clip_x0=None if autoencoder is not None else 1.0, progress=progress)
    x, trajectory = result if return_trajectory else (result, None)
    if autoencoder is not None:
        with runtime.autocast():
            x = autoencoder.decode_latents(x).float()
    x = x.clamp(-1, 1)
    return (x, trajectory) if return_trajectory else x


def train_diffusion(recipe: DiffusionRecipe, runtime: Runtime, ckpt_path: str | Path, autoencoder: Autoencoder | None = None,
                    progress: bool = True, images_at=None, classes: list[str] | None = None, batch_at=None,
                    init_from: Denoiser | None = None):
    """Train (or resume, or load when finished) a denoiser; returns (EMA denoiser, schedule, history). Latent space
    needs the trained `autoencoder`; pixel space takes None. Text-conditioned on Shapes by default; on a real data
    set pass `images_at(step)` -> {"image", "label"} and, with recipe.diffusion.condition "class", the class names.
    `batch_at`: a whole batch feeder instead (e.g. one with an image-shaped condition, stage 10). `init_from`: a
    trained denoiser whose weights this one starts from when no checkpoint exists yet (`Denoiser.load_widened`:
    extra input channels start at zero)."""
    if (recipe.diffusion.space == "latent") != (autoencoder is not None):
        raise ValueError(f"space={recipe.diffusion.space!r} needs "
                         f"{'a trained autoencoder' if recipe.diffusion.space == 'latent' else 'autoencoder=None'}")
    task = DiffusionTask(recipe.unet, recipe.text, recipe.diffusion, classes=classes)
    if init_from is not None and not Path(ckpt_path).exists():
        task.denoiser.load_widened(init_from)
    trainer = Trainer(task, recipe.train, runtime, ckpt_path)
    trainer.fit(batch_at or diffusion_batch_fn(recipe.data, recipe.train.batch_size, runtime, autoencoder, images_at),
                progress=progress)
    if trainer.ema is not None:
        trainer.ema.copy_to(task.denoiser)
    return task.denoiser.eval(), task.schedule, trainer.history


def load_diffusion(path: str | Path, device="cpu", use_ema: bool = True):
    """Rebuild (denoiser, schedule, DiffusionConfig) from a diffusion checkpoint."""
    state = load_checkpoint(path, kind="diffusion", map_location=device)
    cfg = state["config"]
    cfg["text"].setdefault("mask_padding", False)  # checkpoints from before padding masking let the UNet see it
    tokenizer = WordTokenizer.from_state_dict(cfg["tokenizer"]) if "tokenizer" in cfg else None
    task = DiffusionTask(UNetConfig(**cfg["unet"]), TextConfig(**cfg["text"]), DiffusionConfig(**cfg["diffusion"]),
                         tokenizer, classes=cfg.get("classes"))
    task.load_state_dict(state["model"])
    denoiser = task.denoiser.to(device)
    if use_ema and state.get("ema"):
        use_ema_weights(denoiser, state["ema"])
    return denoiser.eval(), task.schedule, task.diffusion_cfg


# ==================================================================================================
# Stage 7: how good is a trained pipeline (the judge, FD on its features, PSNR)
# ==================================================================================================


def held_out_batch(n: int, image_size: int, device, start: int = 0) -> dict:
    """Held-out Shapes images start .. start + n - 1 (seed HOLDOUT_SEED): images, captions, attributes."""
    if n < 1:
        raise ValueError(f"asked for {n} held-out images; evaluate at least 1 (e.g. -n 512)")
    return ShapesDataset(ShapesConfig(image_size=image_size, seed=HOLDOUT_SEED)).batch(range(start, start + n),
                                                                                         device=device)


@torch.no_grad()
def evaluate_autoencoder(autoencoder: Autoencoder, judge: ShapesJudge, runtime: Runtime, n: int = 512,
                         batch_size: int = 128) -> dict:
    """Reconstructions of n held-out images: mean PSNR (dB) and caption accuracy as the judge reads them (the
    first stage caps what latent diffusion can draw), next to the judge on the real images themselves."""
    real = held_out_batch(n, judge.cfg.image_size, runtime.device)
    recon = reconstruct(autoencoder, real["image"], runtime, batch_size)
    return {"n": n, "psnr": psnr(real["image"], recon).mean().item(),
            "judge_on_real": caption_accuracy(judge.read(real["image"]), real["attributes"]),
            "judge_on_reconstructions": caption_accuracy(judge.read(recon), real["attributes"])}


@torch.no_grad()
def evaluate_text_to_image(denoiser: Denoiser, schedule: NoiseSchedule, shape: tuple[int, int, int],
                           runtime: Runtime, judge: ShapesJudge, autoencoder: Autoencoder | None = None,
                           n: int = 512, guidance_scales: tuple[float, ...] = (3.0,), prediction: str = "eps",
                           batch_size: int = 256, seed: int = 0, keep_images: int = 0,
                           cuda_graph: bool | None = None, sampler: str = "ddpm", steps: int | None = None) -> dict:
    """Sample one image for each of n held-out captions at every guidance scale and score them: caption accuracy
    (the judge), and Fréchet distance and KID on the judge's features to a reference set of n other real held-out images,
    next to the real-data floor: the FD between the real images of the sampled captions and that same reference.
    The samples and the floor's real images share their captions (and so their layouts); the reference shares
    none, so "FD / floor" compares like with like (1 = as close to real data as real data is).
    Also per scale: "sample_seconds", the wall time of the `generate` calls alone (batches of `batch_size`, CUDA
    graph recording and decoding included, measured between torch.cuda.synchronize() calls on a GPU), and
    "seconds_per_sample" = sample_seconds / n; and "model_calls", the sampler's model evaluations per sample (NFE)."""
    if n < 2:
        raise ValueError(f"asked for {n} samples; FD needs at least 2 (use n >= 256 for stable numbers)")
    nfe = model_calls(schedule, sampler, steps)  # checks the sampler and the steps before any work
    for scale in guidance_scales:
        check_guidance(scale)
    size = judge.cfg.image_size
    real = held_out_batch(n, size, runtime.device)
    reference = judge.features(held_out_batch(n, size, runtime.device, start=n)["image"])
    floor = frechet_distance(judge.features(real["image"]), reference)
    asked = steps or (schedule.T if sampler == "ddpm" else min(DEFAULT_STEPS, schedule.T))
    result = {"n": n, "sampler": sampler, "steps": asked,  # Karras-spaced samplers may merge a few
              "model_calls": nfe, "fd_real_floor": floor, "by_guidance": {}}
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    for scale in guidance_scales:
        sync()
        start = time.perf_counter()
        images = torch.cat([
            generate(denoiser, real["caption"][i:i + batch_size], schedule, shape, runtime, prediction=prediction,
                     guidance_scale=scale, autoencoder=autoencoder, seed=seed + i, cuda_graph=cuda_graph,
                     sampler=sampler, steps=steps)
            for i in range(0, n, batch_size)])
        sync()
        seconds = time.perf_counter() - start
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"the pipeline draws {images.shape[-1]} px images but the judge reads {size} px")
        scores = caption_accuracy(judge.read(images), real["attributes"])
        features = judge.features(images)
        fd = frechet_distance(features, reference)
        kid_mean, kid_std = kid(features, reference, subsets=50, subset_size=kid_subset_size(n))
        scores.update(guidance=scale, fd=fd, fd_ratio=fd / max(floor, 1e-12), kid=kid_mean, kid_std=kid_std,
                      sample_seconds=seconds, seconds_per_sample=seconds / n, model_calls=nfe)
        if keep_images:
            scores["samples"] = images[:keep_images].cpu()  # ("images" is the count of images scored)
            scores["reads"] = judge.read(images[:keep_images]).cpu()
        result["by_guidance"][scale] = scores
    result["captions"] = real["caption"]
    result["attributes"] = real["attributes"].cpu()
    return result


def kid_subset_size(n: int) -> int:
    """KID's subset size for n samples: at most 256 (as its paper's code), and at most half of n, so that the 50
    subsets differ and their spread (the +- of the tables) means something; with subsets of all n it is 0."""
    return max(2, min(n // 2, 256))


def real_and_reference(count: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of `count` held-out images, n indices each (seeded): the "real" images and the
    FD reference. At random, not the first n and the next n: held-out images listed class by class (as an image
    folder lists them) would otherwise put half of the classes in each, and every FD would measure that."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:n], order[n:2 * n]


@torch.no_grad()
def evaluate_classes(denoiser: ClassDenoiser, schedule: NoiseSchedule, autoencoder: Autoencoder, runtime: Runtime,
                     classifier: Classifier | None, held_out: ImageTensors, n: int = 1000,
                     guidance_scales: tuple[float, ...] = (3.0,), prediction: str = "eps", batch_size: int = 256,
                     seed: int = 0, sampler: str = "ddpm", steps: int | None = None) -> dict:
    """Stage 7 on a real data set. The held-out images are cut in two at random (`real_and_reference`): n "real"
    ones, whose labels the samples are drawn for (one sample each), and n others, the reference. Reports
    reconstruction PSNR of the real ones, and with a classifier (labelled data): its accuracy on real images and on
    reconstructions, and per guidance scale the class accuracy of the samples (class-conditional runs), FD and KID
    on the classifier's features to the reference, next to the real-data floor (FD of the real images to the
    reference)."""
    asked, n = n, min(n, len(held_out) // 2 if classifier is not None else len(held_out))  # FD: a reference half
    if n < (2 if classifier is not None else 1):
        raise ValueError(f"{len(held_out)} held-out images are too few to evaluate: FD needs 2 + 2 (hold out more)")
    real_index, reference_index = real_and_reference(len(held_out), n)
    real = held_out.batch(real_index, runtime.device)
    recon = reconstruct(autoencoder, real["image"], runtime)
    result = {"n": n, "n_asked": asked, "psnr": psnr(real["image"], recon).mean().item(), "sampler": sampler,
              "steps": steps or (schedule.T if sampler == "ddpm" else min(DEFAULT_STEPS, schedule.T)), "by_guidance": {}}
    if classifier is None:
        return result  # no labels, no classifier: no feature network for FD yet
    labels = real.get("label")
    reference = classifier.all_features(held_out.batch(reference_index, runtime.device)["image"])
    result["fd_real_floor"] = frechet_distance(classifier.all_features(real["image"]), reference)
    if labels is not None:
        result["accuracy_real"] = accuracy(classifier, real["image"], labels)
        result["accuracy_reconstructions"] = accuracy(classifier, recon, labels)
    conditional = bool(denoiser.classes)
    names = [denoiser.classes[i] for i in labels.tolist()] if conditional else [""] * n
    for scale in guidance_scales if conditional else (1.0,):
        images = torch.cat([
            generate(denoiser, names[i:i + batch_size], schedule, autoencoder.cfg.latent_shape, runtime,
                     prediction=prediction, guidance_scale=scale, autoencoder=autoencoder, seed=seed + i,
                     sampler=sampler, steps=steps)
            for i in range(0, n, batch_size)])
        features = classifier.all_features(images)
        fd = frechet_distance(features, reference)
        kid_mean, kid_std = kid(features, reference, subsets=50, subset_size=kid_subset_size(n))
        scores = {"guidance": scale, "fd": fd, "fd_ratio": fd / max(result["fd_real_floor"], 1e-12),
                  "kid": kid_mean, "kid_std": kid_std}
        if conditional:
            scores["class_accuracy"] = accuracy(classifier, images, labels)
        result["by_guidance"][scale] = scores
    return result
