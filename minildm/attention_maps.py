"""Stage 9: where each caption word lands -- the cross-attention maps of a trained denoiser.

In every SpatialTransformer of the UNet the image tokens attend to the caption's tokens (`TransformerBlock.attn2`,
LDM eq. (2)). Its weights

    A = softmax(Q K^T / sqrt(d))    (B, heads, h*w, L),   Q from the image features, K from the caption's tokens,

say for each place of an h x w feature map how much it reads each of the L tokens; every row sums to 1 over the
tokens (the padding gets 0: it is masked out). Averaged over heads, over the layers of one resolution and over the
sampling steps, and upsampled to the image, A[..., j] shows where the model puts token j ("red", "circle", "left"):
the maps of Hertz et al. 2022 ("Prompt-to-Prompt", Sec. 3.1 and Fig. 4).

The UNet computes attention with `F.scaled_dot_product_attention`, which never forms A. `CrossAttentionRecorder`
hooks the cross-attention layers and recomputes A from the layer's own q and k, but only while it is active (a
`with` block): outside it nothing is hooked, so normal sampling runs exactly as fast and gives exactly the same
numbers (tests/test_attention_maps.py checks both ways). Hooks do not run inside a recorded CUDA graph, so record
with eager sampling (`generate(..., cuda_graph=False)`; `cross_attention_maps` does it for you).

    with CrossAttentionRecorder(denoiser) as recorder:
        images = generate(denoiser, captions, ..., cuda_graph=False)
    maps = recorder.maps(resolution=8, rows=slice(-len(captions), None))   # (B, L, 8, 8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minildm.device import autocast_off
from minildm.pipeline import generate
from minildm.unet import SpatialTransformer, TransformerBlock, attention_probs


@dataclass
class AttentionRecord:
    """One call of one cross-attention layer: its name in the model, the call's index (one per model call, i.e. per
    sampler step; Heun makes two), the feature map's (h, w), and the weights averaged over heads (B, L, h, w)."""

    layer: str
    call: int
    size: tuple[int, int]
    probs: torch.Tensor


class CrossAttentionRecorder:
    """A context manager that records the cross-attention weights of every TransformerBlock of `model` (a Denoiser,
    a UNet, anything holding them) while it is active. `records` holds one AttentionRecord per layer and call, on
    the model's device, in float32."""

    def __init__(self, model: nn.Module):
        self.layers = [(f"{name}.attn2", block.attn2) for name, block in model.named_modules()
                       if isinstance(block, TransformerBlock) and block.attn2 is not None]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no cross-attention layers (TransformerBlocks built with a "
                             "context_dim): there is nothing to record")
        self.transformers = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
        self.first = self.layers[0][1]
        self._names = {attn: name for name, attn in self.layers}
        self.records: list[AttentionRecord] = []
        self._handles: list = []
        self._size: tuple[int, int] | None = None
        self._calls = 0

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _note_size(self, module, args):
        self._size = tuple(args[0].shape[-2:])  # the SpatialTransformer's input (B, C, h, w)

    def _record(self, attn, args, kwargs, output):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("CrossAttentionRecorder cannot record inside a CUDA graph (the graph's replays skip "
                               "the hooks): sample eagerly, e.g. generate(..., cuda_graph=False)")
        x, context = args[0], args[1] if len(args) > 1 else kwargs.get("context")  # (B, h*w, dim), (B, L, dim_c)
        mask = args[2] if len(args) > 2 else kwargs.get("key_mask")  # (B, L) bool, True = a real token
        if attn is self.first:
            self._calls += 1
        with torch.no_grad():  # the layer's own q and k (in the layer's precision), as in Attention.forward
            q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.heads).float()
            k = rearrange(attn.to_k(context), "b l (h d) -> b h l d", h=attn.heads).float()
            with autocast_off(x.device):  # the weights themselves in float32, also under bf16 autocast
                probs = attention_probs(q, k, None if mask is None else rearrange(mask, "b l -> b 1 1 l"))
            hh, ww = self._size
            probs = rearrange(probs.mean(1), "b (h w) l -> b l h w", h=hh, w=ww)  # mean over heads
        self.records.append(AttentionRecord(self._names[attn], self._calls - 1, (hh, ww), probs))

    def __enter__(self):
        if self._handles:
            raise RuntimeError("this CrossAttentionRecorder is already recording")
        self.records, self._calls = [], 0
        self._handles = [m.register_forward_pre_hook(self._note_size) for m in self.transformers]
        self._handles += [attn.register_forward_hook(self._record, with_kwargs=True) for _, attn in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- what was recorded -----------------------------------------------------------------------------------------

    @property
    def resolutions(self) -> list[int]:
        """The feature-map heights with cross-attention, finest first (e.g. [8, 4] for 16x16 latents)."""
        return sorted({r.size[0] for r in self.records}, reverse=True)

    def maps(self, resolution: int | None = None, rows: slice | None = None, calls: slice | None = None) -> torch.Tensor:
        """The weights (B, L, h, w) averaged over heads, over every layer of feature-map height `resolution` (default:
        the finest) and over the recorded calls (`calls`, a slice of the call indices: e.g. slice(0, 5) for the first
        five steps). `rows` picks images of each call: with classifier-free guidance every call holds 2B rows, the
        unconditional ones first (`samplers.model_output`), so rows=slice(-B, None) keeps the captioned ones."""
        if not self.records:
            raise ValueError("nothing was recorded: run the model inside `with recorder:` first")
        resolution = resolution or self.resolutions[0]
        if resolution not in self.resolutions:
            raise ValueError(f"no cross-attention at resolution {resolution}; recorded: {self.resolutions}")
        picked = [r for r in self.records if r.size[0] == resolution]
        if calls is not None:
            wanted = set(range(self._calls)[calls])
            picked = [r for r in picked if r.call in wanted]
            if not picked:
                raise ValueError(f"no recorded call in {calls} (recorded calls: 0 .. {self._calls - 1})")
        out = sum(r.probs if rows is None else r.probs[rows] for r in picked) / len(picked)
        return out


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (B, L, h, w) -> (B, L, size, size), bilinear: to lay them over images of `size` px."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def cross_attention_maps(denoiser, captions: list[str], schedule, shape, runtime, autoencoder=None,
                         guidance_scale: float = 3.0, sampler: str = "dpmpp_2m", steps: int | None = 20,
                         seed: int = 0, resolution: int | None = None, prediction: str = "eps"):
    """Sample one image per caption (`pipeline.generate`, eagerly) and return (images (B, 3, H, W), maps (B, L, H, W)
    upsampled to the image, tokens: one list of token strings per caption, aligned with the maps' L axis). The maps
    are those of the captioned (conditional) pass, averaged over heads, layers of `resolution` and every step."""
    with CrossAttentionRecorder(denoiser) as recorder:
        images = generate(denoiser, captions, schedule, shape, runtime, prediction=prediction,
                          guidance_scale=guidance_scale, autoencoder=autoencoder, seed=seed, cuda_graph=False,
                          sampler=sampler, steps=steps)
    maps = recorder.maps(resolution, rows=slice(-len(captions), None))
    tokens = [denoiser.tokenizer.tokens(c) for c in captions]
    return images, upsample(maps, images.shape[-1]).cpu(), tokens
