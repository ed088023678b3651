"""Stage 10, part 3: one number per application, read by the Shapes judge of stage 7.

- inpainting: the hole is the grid cell of one captioned object; the judge must read the captioned object there
  ("inside") and still read every other object right ("outside": the rest of the picture is kept);
- layout to image: every object of the layout read with its place, shape and size ("objects"), and every cell of
  the 3 x 3 grid read as the layout has it, empty cells empty ("cells"); colour is not in a layout;
- super-resolution: PSNR (`minildm.metrics.psnr`) against the high-resolution original, next to bicubic upsampling.
"""

from __future__ import annotations

import math

import torch

from minildm.data.shapes import MAX_OBJECTS
from minildm.judge import caption_accuracy, cell_labels


def cell_masks(attributes: torch.Tensor, image_size: int, objects=(0,)) -> torch.Tensor:
    """(B, S, S) masks, 1 on the 3 x 3 grid cell(s) of the captioned objects `objects` (indices into the caption's
    objects; absent ones are skipped) of each image, from Shapes attributes (B, 3, 4)."""
    B, S = attributes.shape[0], image_size
    mask = torch.zeros(B, S, S, device=attributes.device)
    edges = [math.floor(k * S / 3) for k in range(4)]
    for b in range(B):
        for k in objects:
            if attributes[b, k, 0] >= 0:
                row, col = divmod(int(attributes[b, k, 3]), 3)
                mask[b, edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = 1
    return mask


def inpainting_accuracy(read: torch.Tensor, attributes: torch.Tensor, objects=(0,)) -> dict[str, float]:
    """The judge's object accuracy (all four attributes right, `caption_accuracy`) for the captioned objects in the
    hole ("inside": `objects`) and for the others ("outside"); nan where there are none."""
    inside = torch.zeros(attributes.shape[:2], dtype=torch.bool, device=attributes.device)
    inside[:, [k for k in objects if k < MAX_OBJECTS]] = True
    result = {}
    for name, keep in (("inside", inside), ("outside", ~inside)):
        subset = torch.where(keep[..., None], attributes, torch.full_like(attributes, -1))
        n = int((subset[..., 0] >= 0).sum())
        result[name] = caption_accuracy(read, subset)["object"] if n else math.nan
        result[f"{name}_objects"] = n
    return result


def layout_accuracy(read: torch.Tensor, attributes: torch.Tensor) -> dict[str, float]:
    """How well images follow their layouts: the judge's reading (B, 9, 3) against the layout's objects (attributes
    (B, 3, 4)). "objects": fraction of the layout's objects read at their cell with their shape and size; "cells":
    fraction of all cells read as the layout has them (object with that shape and size, or empty)."""
    labels = cell_labels(attributes.to(read.device))  # (B, 9, 3): shape, colour, size per cell, -1 when empty
    right = (read[..., 0] == labels[..., 0]) & (read[..., 2] == labels[..., 2])  # (B, 9); empty == empty is right
    occupied = labels[..., 0] >= 0
    return {"objects": right[occupied].float().mean().item(), "cells": right.float().mean().item(),
            "n_objects": int(occupied.sum())}
