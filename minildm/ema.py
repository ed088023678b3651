"""Exponential moving average (EMA) of a model's weights (course stage 5).

Diffusion models are sampled with averaged weights: after every optimiser step

    shadow <- d * shadow + (1 - d) * weights,

which smooths out the noise of the last few thousand steps (Ho et al. 2020 use d = 0.9999; the LDM
code keeps one too). Early in training the shadow would mostly remember the random initialisation, so
the decay is warmed up: after n updates (counting the current one) d_n = min(decay, (1 + n) / (10 + n)).
Buffers (e.g. normalisation statistics) are not averaged, only copied.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Shadow copies of `model`'s trainable parameters (averaged) and buffers (copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1] (typically 0.999 or 0.9999), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        # a model whose weights were renamed converts old checkpoints' names (e.g. Autoencoder.upgrade_state_dict)
        self.upgrade_state_dict = getattr(model, "upgrade_state_dict", None)

    def next_decay(self) -> float:
        """The decay the next `update` will use (n = updates so far + 1)."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _check_same_model(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"this EMA was made for another model: parameters {missing[:5]} are missing "
                             f"(the model has {len(params)} parameters, the EMA tracks {len(self.shadow)})")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d shadow + (1 - d) params; buffers copied. Call after each optimiser step."""
        d = self.next_decay()
        self.num_updates += 1
        params = self._check_same_model(model)
        shadows = list(self.shadow.values())
        current = [params[name].detach().to(s.dtype) for name, s in self.shadow.items()]
        # s <- s + (1 - d)(p - s) for every tensor at once: one fused kernel launch instead of one per
        # parameter (a UNet has hundreds; launching them one by one costs more than the optimiser step).
        torch._foreach_lerp_(shadows, current, 1.0 - d)
        for name, buf in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(buf)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters and buffers with the EMA's."""
        params = self._check_same_model(model)
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)
        for name, buf in model.named_buffers():
            if name in self.buffers:
                buf.copy_(self.buffers[name])

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """`with ema.applied(model): sample(model, ...)` uses the EMA weights, then puts the others back."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def to(self, device) -> EMA:
        """Move the shadow tensors (in place); returns self."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def state_dict(self) -> dict:
        """Plain tensors, numbers and dicts: loadable with torch.load(weights_only=True)."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(self.shadow), "buffers": dict(self.buffers)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for key in ("shadow", "buffers"):
            mine, theirs = getattr(self, key), dict(state[key])
            if self.upgrade_state_dict is not None:
                theirs = self.upgrade_state_dict(theirs)
            if set(mine) != set(theirs):
                diff = sorted(set(mine) ^ set(theirs))
                raise ValueError(f"EMA state does not match this model: {key} differ in {diff[:5]}")
            for name, tensor in theirs.items():
                mine[name].copy_(tensor)
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], int(state["num_updates"])
