"""The denoiser of text-to-image latent diffusion: eps_theta(z_t, t, tau_theta(y)) (Rombach et al. 2022, Sec. 3.3).

The caption encoder tau_theta (text.py) and the UNet (unet.py), trained together as one model. Its condition is
a caption's token ids, so samplers treat it like any other context tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from minildm.device import to_device
from minildm.text import ClassEmbedder, TextConfig, TextEncoder, WordTokenizer
from minildm.unet import UNet, UNetConfig


class Denoiser(nn.Module):
    """The trained part of text-to-image diffusion: caption encoder tau_theta + UNet eps_theta.

    Its condition is a caption's token ids (B, L) (`tokenize`), encoded inside `forward`, so a sampler treats
    them like any other context tensor and the padding mask travels with them: with `text_cfg.mask_padding`
    the UNet's cross-attention reads only the real tokens (<bos>, the words, <eos>), never the padding.
    """

    def __init__(self, unet_cfg: UNetConfig, text_cfg: TextConfig, tokenizer: WordTokenizer):
        super().__init__()
        if unet_cfg.context_dim != text_cfg.dim:
            raise ValueError(f"the UNet's context_dim ({unet_cfg.context_dim}) must equal the text encoder's "
                             f"dim ({text_cfg.dim})")
        self.tokenizer, self.text_cfg = tokenizer, text_cfg
        self.text_encoder = TextEncoder(tokenizer.vocab_size, text_cfg.dim, text_cfg.depth, text_cfg.heads,
                                        text_cfg.max_length)
        self.unet = UNet(unet_cfg)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids (B, max_length) on the model's device."""
        ids = self.tokenizer.encode(captions, self.text_cfg.max_length, truncate=True)
        return to_device(ids, self.unet.conv_in.weight.device)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, L) -> (context (B, L, dim), mask (B, L), True at real tokens; None without masking)."""
        mask = ids != self.text_encoder.pad_id if self.text_cfg.mask_padding else None
        return self.text_encoder(ids), mask

    def upgrade_state_dict(self, state: dict) -> dict:
        """Weights named in an older layout of the UNet, renamed to today's (the EMA calls this when a run
        resumes from an old checkpoint; `load_state_dict` converts by itself)."""
        return self.unet.upgrade_state_dict(dict(state), prefix="unet.")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        context, mask = self.encode_text(ids)
        return self.unet(x_t, t, context, mask)


CONDITIONS = ("text", "class", "none")


class ClassDenoiser(nn.Module):
    """The denoiser of class-conditional (or unconditional) diffusion: `ClassEmbedder` + UNet eps_theta.

    Its condition is a class label (B,), one context token through the class embedder; label `len(classes)` is
    the null class of classifier-free guidance. Built with no classes it is unconditional: every image gets the null
    class. Like `Denoiser` it turns what a user types into its condition (`tokenize`): class names (or their
    numbers) -> labels, "" -> the null class, so `generate` and the samplers treat both denoisers alike.
    """

    def __init__(self, unet_cfg: UNetConfig, classes: list[str]):
        super().__init__()
        if unet_cfg.context_dim is None:
            raise ValueError("a ClassDenoiser needs a UNet with cross-attention (context_dim set)")
        self.classes = list(classes)
        self.class_embedder = ClassEmbedder(len(self.classes), unet_cfg.context_dim)
        self.unet = UNet(unet_cfg)
        self.names = {}  # what `tokenize` accepts: each name, its number, and "seven" for MNIST's "7 - seven"
        for label, name in enumerate(self.classes):
            for alias in (name, str(label), *name.split(" - ")):
                self.names.setdefault(alias.strip().lower(), label)

    def label(self, name: str) -> int:
        """The label of a class name (case-insensitive) or number; "" is the null class."""
        if name.strip() == "":
            return self.class_embedder.null_class
        if not self.classes:
            raise ValueError(f"this model is unconditional (trained without classes), so it takes no class name, "
                             f"got {name!r}; sample it without names")
        key = name.strip().lower()
        if key not in self.names:
            raise ValueError(f"unknown class {name!r}; this model knows {len(self.classes)} classes: "
                             f"{', '.join(self.classes)} (a name or its number 0-{len(self.classes) - 1})")
        return self.names[key]

    def tokenize(self, names: list[str]) -> torch.Tensor:
        """Class names -> labels (B,) on the model's device."""
        labels = torch.tensor([self.label(name) for name in names], dtype=torch.long)
        return to_device(labels, self.unet.conv_in.weight.device)

    def upgrade_state_dict(self, state: dict) -> dict:
        return self.unet.upgrade_state_dict(dict(state), prefix="unet.")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, self.class_embedder(labels))
