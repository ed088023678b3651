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

    def load_widened(self, other: Denoiser) -> None:
        """Start from the weights of `other`, a denoiser of the same architecture with fewer input channels (e.g. the
        text-to-image model): the weights of the extra input channels of conv_in start at zero, so this denoiser at
        first ignores its condition and predicts exactly what `other` does (Stable Diffusion's inpainting model was
        initialised from its text-to-image model this way). Anything else that differs is an error."""
        state, key = dict(other.state_dict()), "unet.conv_in.weight"
        mine = self.state_dict()[key]  # (base, C + C_c, 3, 3)
        theirs = state[key].to(mine.device, mine.dtype)  # (base, C, 3, 3)
        if theirs.shape[0] != mine.shape[0] or theirs.shape[1] > mine.shape[1] or theirs.shape[2:] != mine.shape[2:]:
            raise ValueError(f"cannot widen conv_in {tuple(theirs.shape)} to {tuple(mine.shape)}: the two denoisers "
                             "must share their architecture except for extra input channels")
        state[key] = torch.cat([theirs, theirs.new_zeros(mine.shape[0], mine.shape[1] - theirs.shape[1], *mine.shape[2:])],
                               dim=1)
        self.load_state_dict(state)

    @property
    def concat_channels(self) -> int:
        """Channels of the extra input concatenated to x_t (0 for plain text-to-image): the UNet's in_channels beyond
        its out_channels (stage 10, `minildm.applications.conditioned`)."""
        return self.unet.cfg.in_channels - self.unet.cfg.out_channels

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,), ids (B, L); concat (B, C_c, h, w): an image-shaped condition (a mask, a low-resolution
        image, a layout) fed to the UNet as extra input channels, [x_t, concat] (LDM Sec. 3.3, "concatenation")."""
        extra = self.concat_channels
        if extra or concat is not None:
            expected = (x_t.shape[0], extra, *x_t.shape[2:])
            if concat is None or tuple(concat.shape) != expected:
                got = "none" if concat is None else tuple(concat.shape)
                raise ValueError(f"this denoiser reads {extra} extra input channels by concatenation (UNet in_channels="
                                 f"{self.unet.cfg.in_channels}, out_channels={self.unet.cfg.out_channels}): pass concat "
                                 f"of shape {expected}, got {got}")
            x_t = torch.cat([x_t, concat.to(x_t.dtype)], dim=1)  # (B, C + C_c, h, w)
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
        # What `tokenize` accepts: each name, then (where no class is called that) its number and the parts of
        # MNIST's "7 - seven". Names first, so that a class folder called "2" is that class, not label 2.
        self.names = {name.strip().lower(): label for label, name in enumerate(self.classes)}
        for label, name in enumerate(self.classes):
            for alias in (str(label), *name.split(" - ")):
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
