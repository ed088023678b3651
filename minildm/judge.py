"""Stage 7: the Shapes judge — a classifier of our own that reads back what an image shows.

A generated image "follows its caption" when every captioned object is where the caption puts it, with
the captioned shape, colour and size, and nothing else is there. To measure that without a human we train
a small classifier on real Shapes renders (its own seed, `JUDGE_SEED`, never the training seed 0 nor the
held-out seed) that reads, for each of the 3x3 grid cells a Shapes object can occupy, whether an object is
there and its shape, colour and size.

The network is fully convolutional, and its output grid *is* the layout grid: a conv trunk turns the image
(B, 3, S, S) into features (B, C, S/8, S/8), adaptive average pooling brings them to (B, C, 3, 3), and a
small 1x1-conv head gives 1 + 6 + 6 + 2 logits per cell (present; shape, colour, size). The hidden
activations of that head, (B, 32 * 9), are the features that Fréchet distance and KID use (`features`).

Generated and decoded images are softer than renders (a first stage at 30-40 dB blurs edges), so the judge
trains on renders that are randomly blurred and noised: it must read real images and an autoencoder's good
reconstructions alike. `caption_accuracy` then compares what the judge reads with the captioned attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm import distributed
from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.data.shapes import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES, ShapesConfig, shapes_batch_at
from minildm.device import Runtime
from minildm.train import TrainConfig, Trainer

JUDGE_SEED = 777  # Shapes seed of the judge's training images (training uses 0, evaluation 12345)
CELLS = len(POSITIONS)  # 9 cells of the 3x3 grid, row-major: top left, top, top right, left, center, ...
ATTRIBUTES = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
FEATURE_WIDTH = 32  # per cell: the judge's features have FEATURE_WIDTH * CELLS dimensions


@dataclass
class JudgeConfig:
    """image_size: the judge reads images of exactly this size (the trunk's 3 halvings need a multiple of 8).
    blur_sigma, noise_std: the largest Gaussian blur (in pixels) and additive noise of the training images."""

    image_size: int = 64
    channels: int = 64
    blur_sigma: float = 1.5
    noise_std: float = 0.08

    def __post_init__(self):
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError(f"the judge needs an image_size that is a multiple of 8 and >= 16, got {self.image_size}")


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class ShapesJudge(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> per-cell logits: present (B, 9), shape (B, 9, 6), colour (B, 9, 6),
    size (B, 9, 2)."""

    def __init__(self, cfg: JudgeConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or JudgeConfig()
        c = cfg.channels
        self.trunk = nn.Sequential(  # (B, 3, S, S) -> (B, 2c, S/8, S/8)
            _conv_block(3, c, 1), _conv_block(c, c, 1),
            _conv_block(c, c, 2), _conv_block(c, c, 1),
            _conv_block(c, 2 * c, 2), _conv_block(2 * c, 2 * c, 1),
            _conv_block(2 * c, 2 * c, 2), _conv_block(2 * c, 2 * c, 1),
        )
        self.hidden = nn.Sequential(nn.Conv2d(2 * c, FEATURE_WIDTH, 1), nn.SiLU())
        self.logits = nn.Conv2d(FEATURE_WIDTH, 1 + sum(ATTRIBUTES.values()), 1)

    def check_images(self, x: Tensor) -> None:
        size = self.cfg.image_size
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the judge reads RGB image batches (B, 3, {size}, {size}) in [-1, 1], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"this judge was trained on {size}x{size} images but got {x.shape[-2]}x{x.shape[-1]}; "
                             f"use the judge for {x.shape[-1]} px (judge_for(image_size={x.shape[-1]}, ...)) "
                             "or resize the images")

    def cell_features(self, x: Tensor) -> Tensor:
        """(B, FEATURE_WIDTH, 3, 3): one feature vector per grid cell."""
        self.check_images(x)
        h = F.adaptive_avg_pool2d(self.trunk(x), 3)  # (B, 2c, 3, 3): the layout grid
        return self.hidden(h)

    def features(self, x: Tensor) -> Tensor:
        """(B, FEATURE_WIDTH * 9) float32: what FD and KID compare."""
        return rearrange(self.cell_features(x), "b c h w -> b (h w c)").float()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = rearrange(self.logits(self.cell_features(x)), "b k h w -> b (h w) k").float()  # (B, 9, 15)
        present, *rest = out.split([1, *ATTRIBUTES.values()], dim=-1)
        return {"present": present.squeeze(-1), **dict(zip(ATTRIBUTES, rest))}

    @torch.no_grad()
    def read(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """(B, 9, 3) int64: (shape, colour, size) the judge sees in each cell, -1 everywhere in an empty cell."""
        reads = []
        for chunk in x.split(batch_size):
            out = self(chunk)
            cells = torch.stack([out[k].argmax(-1) for k in ATTRIBUTES], dim=-1)  # (b, 9, 3)
            reads.append(torch.where((out["present"] > 0)[..., None], cells, torch.full_like(cells, -1)))
        return torch.cat(reads)


# --------------------------------------------------------------------------------------------------
# Labels, training
# --------------------------------------------------------------------------------------------------


def cell_labels(attributes: Tensor) -> Tensor:
    """Shapes attributes (B, 3, 4) (shape, colour, size, position; -1 rows for absent objects) -> the judge's
    targets (B, 9, 3): (shape, colour, size) per cell, -1 in empty cells."""
    B = attributes.shape[0]
    labels = torch.full((B * CELLS + 1, 3), -1, dtype=torch.long, device=attributes.device)
    present = attributes[..., 0] >= 0  # (B, 3)
    rows = torch.arange(B, device=attributes.device)[:, None] * CELLS + attributes[..., 3]  # (B, 3)
    rows = torch.where(present, rows, torch.full_like(rows, B * CELLS))  # absent objects write to a spare row
    labels[rows.flatten()] = attributes[..., :3].reshape(-1, 3)
    return labels[:-1].view(B, CELLS, 3)


def soften(images: Tensor, max_sigma: float, max_noise: float, generator: torch.Generator | None = None) -> Tensor:
    """Random Gaussian blur (sigma ~ U(0, max_sigma) px per image) and additive noise (std ~ U(0, max_noise)):
    renders made to look like decoded or generated images."""
    B, device = images.shape[0], images.device
    rand = torch.rand(3, B, generator=generator, device=generator.device if generator else "cpu").to(device)
    sigma, noise_std = rand[0] * max_sigma, rand[1] * max_noise
    radius = max(int(3 * max_sigma + 0.5), 1)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-offsets**2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (B, K)
    kernel = kernel / kernel.sum(1, keepdim=True)
    x = rearrange(images, "b c h w -> 1 (b c) h w")
    k = kernel.repeat_interleave(images.shape[1], 0)  # one kernel per (image, channel)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=k.shape[0])
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=k.shape[0])
    x = rearrange(x, "1 (b c) h w -> b c h w", b=B)
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu").to(device)
    return (x + noise_std[:, None, None, None] * noise).clamp(-1, 1)


def judge_loss(out: dict[str, Tensor], labels: Tensor) -> Tensor:
    """Binary cross-entropy on presence over all cells + cross-entropy on each attribute over occupied cells."""
    present = labels[..., 0] >= 0  # (B, 9)
    loss = F.binary_cross_entropy_with_logits(out["present"], present.float())
    for i, name in enumerate(ATTRIBUTES):
        loss = loss + F.cross_entropy(out[name][present], labels[..., i][present])
    return loss


class JudgeTask(nn.Module):
    """The judge for the `Trainer`: renders of seed JUDGE_SEED, softened, and their per-cell labels."""

    kind = "judge"

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        self.cfg, self.judge = cfg, ShapesJudge(cfg)

    def param_groups(self) -> dict:
        return {"judge": list(self.judge.parameters())}

    def losses(self, batch: dict, step: int):
        # The blur and noise are drawn on the images' device from a generator seeded by the step: no batch of noise
        # drawn on the CPU and copied over in every step, and a resumed run draws what the interrupted one would have.
        draws = distributed.step_generator(step, batch["image"].device, seed=JUDGE_SEED)
        x = soften(batch["image"], self.cfg.blur_sigma, self.cfg.noise_std, draws)
        loss = judge_loss(self.judge(x), cell_labels(batch["attributes"]))
        return {"judge": loss}, {"loss": loss.detach()}

    def ema_module(self) -> None:
        return None

    def config_dict(self) -> dict:
        return {"judge": asdict(self.cfg)}


def train_judge(cfg: JudgeConfig, train_cfg: TrainConfig, runtime: Runtime, ckpt_path: str | Path | None,
                progress: bool = True) -> ShapesJudge:
    """Train (or resume, or load when finished) the judge on renders of seed JUDGE_SEED."""
    task = JudgeTask(cfg)
    trainer = Trainer(task, train_cfg, runtime, ckpt_path)
    data = ShapesConfig(image_size=cfg.image_size, seed=JUDGE_SEED)
    trainer.fit(shapes_batch_at(data, train_cfg.batch_size, runtime.device), progress=progress)
    return task.judge.eval()


def load_judge(path: str | Path, device="cpu", image_size: int | None = None) -> ShapesJudge:
    """Rebuild a trained judge; with `image_size`, refuse a judge trained for another size."""
    state = load_checkpoint(path, kind="judge", map_location=device)
    cfg = JudgeConfig(**state["config"]["judge"])
    if image_size is not None and cfg.image_size != image_size:
        raise CheckpointError(f"'{path}' holds a judge for {cfg.image_size}x{cfg.image_size} images, but the images "
                              f"to judge are {image_size}x{image_size}; delete it to train a judge for "
                              f"{image_size} px, or pass the judge of the right size")
    task = JudgeTask(cfg)
    task.load_state_dict(state["model"])
    return task.judge.to(device).eval()


def judge_for(image_size: int, runtime: Runtime, folder: str | Path, progress: bool = True) -> ShapesJudge:
    """The judge for `image_size` px kept in `folder` (judge_<size>.pt): loaded when there, trained when
    missing (3,000 steps, 80 s on an H200; fast mode trains a small one in well under a minute on a CPU)."""
    from minildm.config import judge_recipe  # the presets import this module's config

    cfg, train_cfg = judge_recipe(image_size, fast=runtime.fast)
    path = Path(folder) / f"judge_{image_size}.pt"
    if path.exists():
        return load_judge(path, runtime.device, image_size=image_size)
    return train_judge(cfg, train_cfg, runtime, path, progress=progress).to(runtime.device)


# --------------------------------------------------------------------------------------------------
# Reading captions back
# --------------------------------------------------------------------------------------------------


def caption_accuracy(read: Tensor, attributes: Tensor) -> dict[str, float]:
    """Compare what the judge reads (B, 9, 3) with the captioned attributes (B, 3, 4) of the same images.

    Per captioned object: "place" (its cell holds an object), "shape", "colour", "size" (that object has the
    captioned attribute; an empty cell is wrong for all of them) and "object" (all four right). Per image:
    "caption" (every captioned object right and no object in an uncaptioned cell) and "extra_per_image" (mean
    number of occupied uncaptioned cells). "objects" and "images" count what was scored."""
    if read.ndim != 3 or read.shape[1:] != (CELLS, 3):
        raise ValueError(f"read must be the judge's (B, {CELLS}, 3) reading, got shape {tuple(read.shape)}")
    if attributes.ndim != 3 or attributes.shape[1:] != (MAX_OBJECTS, 4) or len(attributes) != len(read):
        raise ValueError(f"attributes must be Shapes attributes (B, {MAX_OBJECTS}, 4) for the same B={len(read)} "
                         f"images, got shape {tuple(attributes.shape)}")
    if len(read) == 0:
        raise ValueError("caption_accuracy got 0 images; sample at least one")
    attributes = attributes.to(read.device)
    present = attributes[..., 0] >= 0  # (B, 3): captioned objects
    cell = attributes[..., 3].clamp(min=0)  # (B, 3)
    seen = torch.gather(read, 1, cell[..., None].expand(-1, -1, 3))  # (B, 3, 3): the judge at each captioned cell
    right = {"place": seen[..., 0] >= 0}
    for i, name in enumerate(ATTRIBUTES):
        right[name] = seen[..., i] == attributes[..., i]
    right["object"] = right["place"] & right["shape"] & right["colour"] & right["size"]
    asked = torch.zeros(read.shape[:2], dtype=torch.long, device=read.device).scatter_add_(1, cell, present.long()) > 0
    extra = (read[..., 0] >= 0) & ~asked  # (B, 9)
    caption_right = (right["object"] | ~present).all(1) & ~extra.any(1)
    n = int(present.sum())
    result = {name: right[name][present].float().sum().item() / n for name in right}
    result.update(caption=caption_right.float().mean().item(), extra_per_image=extra.sum(1).float().mean().item(),
                  objects=n, images=len(read))
    return result


def confusion(read: Tensor, attributes: Tensor, attribute: str) -> Tensor:
    """(n + 1, n + 1) counts for one attribute over captioned objects: rows = captioned value, columns = what
    the judge read at that cell; the last row/column is "nothing there"."""
    i, n = list(ATTRIBUTES).index(attribute), ATTRIBUTES[attribute]
    attributes = attributes.to(read.device)
    present = attributes[..., 0] >= 0
    seen = torch.gather(read, 1, attributes[..., 3].clamp(min=0)[..., None].expand(-1, -1, 3))[..., i]
    truth, got = attributes[..., i][present], seen[present]
    got = torch.where(got < 0, torch.full_like(got, n), got)
    return torch.bincount(truth * (n + 1) + got, minlength=(n + 1) ** 2).view(n + 1, n + 1).cpu()
