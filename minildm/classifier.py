"""Stage 7 on real data: a classifier the course trains for each labelled data set.

What the Shapes judge (judge.py) is for Shapes, this small CNN is for MNIST, CIFAR-10 or your labelled image
folder. It trains on the training images of a run (never on its held-out images, which measure its own accuracy)
and then serves twice:

- **class accuracy** of class-conditional samples: how often it reads the class the sample was asked for, next to
  its accuracy on the real held-out images (a model's samples can hardly do better than that);
- **feature network of FD and KID** (`features`, the activations before its last layer): Fréchet distance and KID
  on these features are comparable across this course's runs on the same data set, never with papers' Inception
  FIDs, and are never called that.

conv blocks at three resolutions (GroupNorm, SiLU, stride 2 between them) -> global average pool -> a hidden
layer of `feature_dim` (the features) -> class logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.checkpoint import load_checkpoint
from minildm.device import Runtime
from minildm.train import TrainConfig, Trainer


@dataclass
class ClassifierConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    width: int = 64  # channels of the first level (then 2x, 4x)
    feature_dim: int = 128

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class Classifier(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> class logits (B, num_classes); `features` -> (B, feature_dim)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg, w = cfg, cfg.width
        self.trunk = nn.Sequential(
            _block(cfg.in_channels, w, 1), _block(w, w, 1),
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.hidden = nn.Sequential(nn.Linear(4 * w, cfg.feature_dim), nn.SiLU())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def check_images(self, x: Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"this classifier reads images (B, {c}, {s}, {s}) in [-1, 1] (the data set of its "
                             f"run), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")

    def features(self, x: Tensor) -> Tensor:
        """(B, feature_dim) float32: what FD and KID compare."""
        self.check_images(x)
        return self.hidden(self.trunk(x).mean((2, 3))).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """(B,) the class each image is read as."""
        self.eval()
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])

    @torch.no_grad()
    def all_features(self, x: Tensor, batch_size: int = 512) -> Tensor:
        self.eval()
        return torch.cat([self.features(chunk) for chunk in x.split(batch_size)])


class ClassifierTask(nn.Module):
    """The classifier for the `Trainer`: cross-entropy on {"image", "label"} batches."""

    kind = "classifier"

    def __init__(self, cfg: ClassifierConfig, classes: list[str] | None = None):
        super().__init__()
        self.cfg, self.classifier = cfg, Classifier(cfg)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(cfg.num_classes)]

    def param_groups(self) -> dict:
        return {"classifier": list(self.classifier.parameters())}

    def losses(self, batch: dict, step: int):
        loss = F.cross_entropy(self.classifier(batch["image"]), batch["label"])
        return {"classifier": loss}, {"loss": loss.detach()}

    def ema_module(self) -> nn.Module:
        return self.classifier

    def config_dict(self) -> dict:
        return {"classifier": asdict(self.cfg), "classes": self.classes}


def train_classifier(cfg: ClassifierConfig, train_cfg: TrainConfig, batch_at, runtime: Runtime,
                     ckpt_path: str | Path | None, classes: list[str] | None = None,
                     progress: bool = True) -> Classifier:
    """Train (or resume, or load when finished) a classifier on `batch_at(step)` -> {"image", "label"}; returns
    it with its averaged weights when it keeps an EMA."""
    task = ClassifierTask(cfg, classes)
    trainer = Trainer(task, train_cfg, runtime, ckpt_path)
    trainer.fit(batch_at, progress=progress)
    if trainer.ema is not None:
        trainer.ema.copy_to(task.classifier)
    return task.classifier.eval()


def load_classifier(path: str | Path, device="cpu") -> Classifier:
    """Rebuild a trained classifier (its averaged weights when it kept them)."""
    from minildm.pipeline import use_ema_weights  # the pipeline imports this module

    state = load_checkpoint(path, kind="classifier", map_location=device)
    task = ClassifierTask(ClassifierConfig(**state["config"]["classifier"]), state["config"]["classes"])
    task.load_state_dict(state["model"])
    if state.get("ema"):
        use_ema_weights(task.classifier, state["ema"])
    return task.classifier.to(device).eval()


def accuracy(classifier: Classifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images read as their label."""
    if len(images) == 0:
        raise ValueError("accuracy of 0 images: pass at least one")
    return (classifier.predict(images) == labels.to(images.device)).float().mean().item()
