"""minildm: latent diffusion from scratch, one stage per notebook.

Stages (one module each, data flowing one way):
data -> autoencoder (+ regularizers) -> schedules / unet / text / denoiser / diffusion -> samplers -> judge / metrics,
with the shared layers (layers.py), the trainer (train.py), checkpoints (checkpoint.py), device handling
(device.py), presets (config.py) and the stages wired together (pipeline.py) beside them.

The names a notebook needs most:
"""

from minildm.autoencoder import Autoencoder, AutoencoderConfig
from minildm.config import DATA_PRESETS, autoencoder_recipe, checkpoint_dir, data_preset, diffusion_recipe
from minildm.data import ShapesConfig, ShapesDataset, load_dataset, load_images, tensor_batch_at
from minildm.device import fast_mode, setup
from minildm.judge import caption_accuracy, judge_for
from minildm.pipeline import (
    evaluate_autoencoder,
    evaluate_classes,
    evaluate_text_to_image,
    generate,
    load_autoencoder,
    load_diffusion,
    train_autoencoder,
    train_diffusion,
)
from minildm.schedules import NoiseSchedule
from minildm.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "DATA_PRESETS",
    "Autoencoder",
    "AutoencoderConfig",
    "NoiseSchedule",
    "ShapesConfig",
    "ShapesDataset",
    "UNet",
    "UNetConfig",
    "autoencoder_recipe",
    "caption_accuracy",
    "checkpoint_dir",
    "data_preset",
    "diffusion_recipe",
    "evaluate_autoencoder",
    "evaluate_classes",
    "evaluate_text_to_image",
    "fast_mode",
    "generate",
    "judge_for",
    "load_autoencoder",
    "load_dataset",
    "load_diffusion",
    "load_images",
    "setup",
    "tensor_batch_at",
    "train_autoencoder",
    "train_diffusion",
]
