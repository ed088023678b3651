"""Stage 10, part 2: models conditioned on an image by concatenation (Rombach et al. 2022, Sec. 3.3; semantic
synthesis Sec. 4.3.2, super-resolution Sec. 4.4, inpainting Sec. 4.5).

When the condition is itself an image aligned with the output, the simplest way in is to stack it onto the input:
the UNet reads [z_t, c] with in_channels = C + C_c and still predicts C channels,

    eps_theta([z_t, c], t, tau(y)),      z_t (B, C, h, w), c (B, C_c, h, w) on the latent grid h x w,

and trains with the loss of eq. (1) as before, c riding along in every batch (`Denoiser(..., concat=c)`). Three
conditions on Shapes (`condition_channels`):

  "inpainting"        [m, E(x * (1 - m_x))]: the hole on the latent grid (m, from the pixel hole m_x by
                      `latent_mask`) and the latent of the image with the hole greyed out, 1 + C channels, as LDM
                      (Sec. 4.5). Training holes: random boxes. It costs one more encoder pass per batch.
  "super_resolution"  the low-resolution image, 3 channels. With f = 4 an image 4 times smaller has the latent's size
                      (16 -> 64 px: a 3 x 16 x 16 image beside a 4 x 16 x 16 latent; 8 -> 32 px on CIFAR-10).
  "layout"            the semantic mask (background or one of 6 shapes per pixel), one-hot and averaged over each
                      latent cell, 7 channels. It fixes where each object is, its shape and size, not its colour.

Each model keeps the caption input (dropped during training 10% of the time for inpainting, so that classifier-free
guidance works as in text-to-image, half the time for layout, always for super-resolution) and starts from the
text-to-image model when one is given (`Denoiser.load_widened`: the new input channels start at zero, so training
begins from a model that already draws Shapes).

Guidance on the image condition (super-resolution, which has no caption to guide with): training also zeroes the
condition of 10% of the batch (`CONDITION_DROP`; zeros are what the widened model read before fine-tuning), so one
network predicts both eps([z_t, c]) and eps([z_t, 0]); sampling with `guidance_scale` s > 1 then uses
eps([z_t, 0]) + s (eps([z_t, c]) - eps([z_t, 0])), classifier-free guidance with the image as the condition
(as InstructPix2Pix, Brooks et al. 2023, guides on its input image), which pushes each sample to agree more with c.

Starting super-resolution from the bicubic upsampling (`super_resolve(..., strength=s)`, s < 1): instead of pure
noise, sampling starts at t0 = s (T - 1) from q(z_t0 | z_b) = N(sqrt(abar_t0) z_b, (1 - abar_t0) I), z_b the latent
of the bicubic upsampling, and takes that fraction of the steps: SDEdit (Meng et al. 2022) with the low-resolution
image as the edit. What the noise at t0 hides (the fine detail bicubic blurs) is drawn anew by the model; what it
leaves (the coarse layout, which the low-resolution image already pins down) comes from the start.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F

from minildm import distributed
from minildm.applications.editing import (
    check_guidance,
    check_mask,
    check_prompts,
    check_strength,
    img2img,
    latent_mask,
)
from minildm.config import DiffusionRecipe, diffusion_recipe
from minildm.data.datasets import dataset_batch_at
from minildm.data.shapes import SHAPES
from minildm.pipeline import diffusion_batch_fn, train_diffusion
from minildm.samplers import sample

KINDS = ("inpainting", "super_resolution", "layout")
LAYOUT_CLASSES = 1 + len(SHAPES)  # background + one per shape, as in the Shapes mask
# The fraction of each training batch whose image condition is zeroed, for guidance on it (super-resolution only:
# inpainting and layout guide with the caption, as text-to-image does).
CONDITION_DROP = {"inpainting": 0.0, "super_resolution": 0.1, "layout": 0.0}


def condition_channels(kind: str, latent_channels: int = 4) -> int:
    """C_c, the channels a condition adds to the UNet's input."""
    if kind not in KINDS:
        raise ValueError(f"unknown concatenated condition {kind!r}; choose one of {KINDS}")
    return {"inpainting": 1 + latent_channels, "super_resolution": 3, "layout": LAYOUT_CLASSES}[kind]


# ---------------------------------------------------------------------------------------------
# The conditions
# ---------------------------------------------------------------------------------------------


def random_box_masks(n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 1, size, size) holes for training: one box per image, each side from size/4 to 3 size/4, anywhere."""
    lo, hi = max(size // 4, 1), max(3 * size // 4, 1)
    sides = torch.randint(lo, hi + 1, (n, 2), generator=generator)  # (n, 2) height, width
    corner = (torch.rand(n, 2, generator=generator) * (size - sides + 1)).long()  # (n, 2)
    grid = torch.arange(size)
    rows = (grid >= corner[:, :1]) & (grid < corner[:, :1] + sides[:, :1])  # (n, size)
    cols = (grid >= corner[:, 1:]) & (grid < corner[:, 1:] + sides[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


@torch.no_grad()
def inpainting_condition(images: torch.Tensor, mask: torch.Tensor, autoencoder, runtime=None) -> torch.Tensor:
    """[m, E(x * (1 - m_x))]: (B, 1 + C, h, w) from images x (B, 3, H, W) and their hole m_x ((B, H, W) or
    (B, 1, H, W), 1 = regenerate): the hole on the latent grid and the latents of the images with the hole set to 0
    (mid-grey). `runtime` only sets the autocast of the encoder pass."""
    pixel_mask = check_mask(mask, images)  # (B, 1, H, W)
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        z = autoencoder.encode_latents(images * (1 - pixel_mask)).float()  # (B, C, h, w)
    return torch.cat([latent_mask(pixel_mask, z.shape[-2:]), z], dim=1)


def low_resolution(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H / factor, W / factor) by averaging factor x factor blocks (a box filter, no aliasing)."""
    if images.ndim != 4 or images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"images {tuple(images.shape)} must be (B, C, H, W) with H and W divisible by {factor}")
    return F.avg_pool2d(images, factor)


def bicubic_upsample(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """The baseline of super-resolution: bicubic interpolation to size x size, clamped to [-1, 1]."""
    return F.interpolate(low_res, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def layout_condition(semantic_mask: torch.Tensor, size: int) -> torch.Tensor:
    """Shapes masks (B, H, W) of class ids 0..6 -> (B, 7, size, size): the fraction of each latent cell covered by
    the background and by each shape."""
    if semantic_mask.ndim != 3 or semantic_mask.is_floating_point():
        raise ValueError(f"a layout is an integer mask (B, H, W) of class ids (0 = background, 1 + shape index), "
                         f"got {semantic_mask.dtype} {tuple(semantic_mask.shape)}")
    if semantic_mask.numel() and (semantic_mask.min() < 0 or semantic_mask.max() >= LAYOUT_CLASSES):
        raise ValueError(f"layout class ids must lie in 0..{LAYOUT_CLASSES - 1}, got "
                         f"{semantic_mask.min().item()}..{semantic_mask.max().item()}")
    one_hot = F.one_hot(semantic_mask.long(), LAYOUT_CLASSES).permute(0, 3, 1, 2).float()  # (B, 7, H, W)
    return F.adaptive_avg_pool2d(one_hot, size)


def make_condition(kind: str, autoencoder=None, runtime=None, drop: float | None = None):
    """condition(step, batch, z) -> (B, C_c, h, w) for `diffusion_batch_fn`. "inpainting" needs the `autoencoder`
    (it encodes the images with their hole); its training holes come from a generator seeded by the step, so a
    resumed run sees the same ones. `drop` (default `CONDITION_DROP[kind]`): the fraction of items whose condition
    is zeros, drawn for the global batch from a generator seeded by the step (each rank keeps its part)."""
    condition_channels(kind)
    if kind == "inpainting" and autoencoder is None:
        raise ValueError("the inpainting condition encodes the masked image: pass make_condition('inpainting', "
                         "autoencoder)")
    drop = CONDITION_DROP[kind] if drop is None else drop
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop is the fraction of conditions zeroed in training, in [0, 1); got {drop}")

    def condition(step: int, batch: dict, z: torch.Tensor) -> torch.Tensor:
        h, images = z.shape[-1], batch["image"]
        if kind == "inpainting":
            masks = random_box_masks(len(z), images.shape[-1], torch.Generator().manual_seed(step))
            c = inpainting_condition(images, masks.to(images.device), autoencoder, runtime)
        elif kind == "super_resolution":
            c = low_resolution(images, images.shape[-1] // h)
        else:
            c = layout_condition(batch["mask"], h)
        if drop > 0:
            n = len(c) * distributed.place().world_size
            # The caption dropout's draws (DiffusionTask.losses): with caption_drop >= drop, an item whose condition
            # is zeroed also has its caption dropped, the pair a guided sampler's unconditional pass asks for.
            draws = distributed.step_generator(step, "cpu", seed=1)
            keep = distributed.part_of(torch.rand(n, generator=draws) >= drop)  # (B,) bool, on the CPU
            c = c * keep.to(c.device, c.dtype).view(-1, 1, 1, 1)
        return c

    return condition


# ---------------------------------------------------------------------------------------------
# Recipes and training
# ---------------------------------------------------------------------------------------------


def concat_recipe(kind: str, latent_shape: tuple[int, int, int] | None = None, fast: bool | None = None,
                  seconds: float = 60.0) -> DiffusionRecipe:
    """The text-to-image latent recipe (`diffusion_recipe("latent")`) with C_c more input channels. Full mode trains
    for `seconds` (each model fine-tunes the text-to-image model; notebook 10 gives each 45 s), fast mode 10 steps.
    Captions: super-resolution never sees them (the low-resolution image alone, as LDM Sec. 4.4; real data sets have
    none), layout drops them half of the time (the layout alone is a condition it knows), inpainting 10% (for
    classifier-free guidance, as text-to-image)."""
    recipe = diffusion_recipe("latent", fast=fast, latent_shape=latent_shape)
    c = recipe.unet.in_channels
    recipe.unet = replace(recipe.unet, in_channels=c + condition_channels(kind, c), out_channels=c)
    drop = {"inpainting": 0.1, "super_resolution": 1.0, "layout": 0.5}[kind]
    recipe.diffusion = replace(recipe.diffusion, concat=kind, caption_drop=drop)
    if recipe.train.max_seconds is not None:
        recipe.train = replace(recipe.train, max_seconds=seconds)
    else:  # fast mode: a third of text-to-image's steps (notebook 10 trains four of these models in CI)
        recipe.train = replace(recipe.train, steps=10, ckpt_every=10)
    return recipe


def train_concat(kind: str, runtime, ckpt_path, autoencoder, init_from=None, recipe: DiffusionRecipe | None = None,
                 images=None, progress: bool = True):
    """Train (or resume, or load when finished) a denoiser with the condition `kind`; returns (EMA denoiser, schedule,
    history) as `train_diffusion`. init_from: a text-to-image denoiser to start from; images: another feeder of
    {"image", "caption"} batches than the recipe's Shapes (e.g. CIFAR-10 with empty captions)."""
    recipe = recipe or concat_recipe(kind, autoencoder.cfg.latent_shape, runtime.fast)
    batch_at = diffusion_batch_fn(recipe.data, recipe.train.batch_size, runtime, autoencoder,
                                  condition=make_condition(kind, autoencoder, runtime), images_at=images)
    return train_diffusion(recipe, runtime, ckpt_path, autoencoder, progress=progress, batch_at=batch_at,
                           init_from=init_from)


def captionless_batches(dataset, batch_size: int, device, seed: int = 0):
    """batch_at(step) -> {"image": (B, C, H, W) on `device`, "caption": [""] * B} from a map-style data set of
    {"image", ...} items (e.g. `load_dataset("imagefolder", ...)`): real data without captions, every caption empty,
    for `train_concat(..., images=...)` and `train_autoencoder(..., images_at=...)`."""
    batches = dataset_batch_at(dataset, batch_size, seed)

    def batch_at(step: int) -> dict:
        images = batches(step)["image"].to(device)
        return {"image": images, "caption": [""] * len(images)}

    return batch_at


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_concat(denoiser, schedule, concat: torch.Tensor, runtime, autoencoder, captions=None,
                  guidance_scale: float = 1.0, sampler: str = "ddim", steps: int | None = 50, seed: int = 0,
                  prediction: str = "eps", guide_condition: bool = False, start: torch.Tensor | None = None,
                  strength: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from a denoiser with concatenated condition `concat` (B, C_c, h, w); captions:
    None (no caption: the empty one for every image) or one prompt per image (`check_prompts`). With guidance
    (scale != 1) the unconditional pass gets the empty caption and, with `guide_condition`, zeros for `concat` too
    (for a model trained with `CONDITION_DROP`). `start` (B, C, h, w), scaled latents, with `strength` < 1: begin at
    t0 = strength (T - 1) from q(z_t0 | start) and take that fraction of the steps (SDEdit: `img2img`); strength 0
    decodes `start` as it is, strength 1 (the default) starts from pure noise."""
    denoiser.eval()
    schedule.to(runtime.device)
    B, latent = concat.shape[0], autoencoder.cfg.latent_shape
    if guidance_scale != 1.0:
        check_guidance(guidance_scale)
    captions = [""] * B if captions is None else check_prompts(denoiser.tokenizer, captions, B)
    concat = concat.to(runtime.device)

    def model(x, t, ids):  # a guided pass doubles the batch: [unconditional half, conditional half]
        c = concat
        if x.shape[0] == 2 * B:
            c = torch.cat([torch.zeros_like(concat) if guide_condition else concat, concat])
        with runtime.autocast():
            return denoiser(x, t, ids, concat=c).float()

    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    context, uncond = denoiser.tokenize(captions), denoiser.tokenize([""] * B)
    if check_strength(strength) < 1:  # SDEdit from `start`
        if start is None or tuple(start.shape) != (B, *latent):
            raise ValueError(f"strength {strength} < 1 starts from given latents: pass start of shape {(B, *latent)} "
                             f"(e.g. the latents of the bicubic upsampling), got "
                             f"{None if start is None else tuple(start.shape)}")
        z = img2img(model, start.to(runtime.device, torch.float32), schedule, strength, sampler=sampler, steps=steps,
                    context=context, prediction=prediction, guidance_scale=guidance_scale, uncond_context=uncond,
                    generator=generator)
    else:
        z = sample(model, (B, *latent), schedule, sampler=sampler, steps=steps, context=context, prediction=prediction,
                   generator=generator, device=runtime.device, guidance_scale=guidance_scale, uncond_context=uncond)
    with runtime.autocast():
        return autoencoder.decode_latents(z).float().clamp(-1, 1)


def super_resolve(denoiser, schedule, low_res: torch.Tensor, runtime, autoencoder, strength: float = 1.0,
                  **kwargs) -> torch.Tensor:
    """A super-resolution model's images (B, 3, H, W) for low-resolution images (B, 3, h, w), h x w the latent grid
    (e.g. 16 x 16 for 64 px with f = 4). kwargs: those of `sample_concat`; `guidance_scale` > 1 guides on the
    low-resolution image (`guide_condition`, on by default here). strength < 1 starts from the latents of the
    bicubic upsampling noised to t0 = strength (T - 1) instead of pure noise (SDEdit; the module docstring)."""
    kwargs.setdefault("guide_condition", True)
    _, h, w = autoencoder.cfg.latent_shape
    if low_res.ndim != 4 or tuple(low_res.shape[1:]) != (3, h, w):
        got = tuple(low_res.shape)
        raise ValueError(f"this super-resolution model takes low-resolution images (B, 3, {h}, {w}) (its latent grid: "
                         f"{autoencoder.cfg.image_size} px / f={autoencoder.cfg.downsample_factor}), got {got}; "
                         f"make them with low_resolution(images, {autoencoder.cfg.downsample_factor})")
    if check_strength(strength) < 1:
        with torch.no_grad(), runtime.autocast():
            upsampled = bicubic_upsample(low_res.to(runtime.device), autoencoder.cfg.image_size)
            kwargs["start"] = autoencoder.encode_latents(upsampled).float()  # (B, C, h, w), scaled
    return sample_concat(denoiser, schedule, low_res, runtime, autoencoder, strength=strength, **kwargs)


def layout_to_image(denoiser, schedule, semantic_mask: torch.Tensor, runtime, autoencoder, **kwargs) -> torch.Tensor:
    """A layout model's images for Shapes masks (B, H, W) at the image size (class ids 0..6). kwargs: `sample_concat`'s."""
    size = autoencoder.cfg.image_size
    if semantic_mask.ndim != 3 or tuple(semantic_mask.shape[1:]) != (size, size):
        raise ValueError(f"a layout must be a Shapes mask (B, {size}, {size}) at the image size, got "
                         f"{tuple(semantic_mask.shape)}")
    concat = layout_condition(semantic_mask, autoencoder.cfg.latent_shape[-1])
    return sample_concat(denoiser, schedule, concat, runtime, autoencoder, **kwargs)


def inpaint_with_model(denoiser, schedule, images: torch.Tensor, mask: torch.Tensor, runtime, autoencoder,
                       **kwargs) -> torch.Tensor:
    """A mask-conditioned inpainting model's images: the hole (mask (B, H, W) or (B, 1, H, W), 1 = regenerate) drawn
    anew, the pixels outside it pasted from `images` (B, 3, H, W). kwargs: `sample_concat`'s."""
    images = images.to(runtime.device)
    pixel_mask = check_mask(mask, images)  # (B, 1, H, W)
    concat = inpainting_condition(images, pixel_mask, autoencoder, runtime)
    out = sample_concat(denoiser, schedule, concat, runtime, autoencoder, **kwargs)
    return pixel_mask * out + (1 - pixel_mask) * images
