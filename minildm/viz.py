"""Pictures: image grids (with captions), loss curves. Images are tensors in [-1, 1]."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid


def to_numpy_image(images: torch.Tensor, nrow: int = 8, padding: int = 2):
    """(B, C, H, W) in [-1, 1] -> one (H', W', 3) float array in [0, 1] laid out as a grid."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=nrow, padding=padding, pad_value=1.0).permute(1, 2, 0).numpy()


def show_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None, captions: list[str] | None = None,
              scale: float = 1.6, ax=None):
    """Show images as a grid; captions (one per image) are drawn under each image."""
    n = images.shape[0]
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    if captions is None:
        if ax is None:
            _, ax = plt.subplots(figsize=(scale * ncol, scale * rows))
        ax.imshow(to_numpy_image(images, nrow=ncol))
        ax.axis("off")
        if title:
            ax.set_title(title)
        return ax.figure
    fig, axes = plt.subplots(rows, ncol, figsize=(scale * 1.4 * ncol, scale * 2.2 * rows), squeeze=False)
    for i, ax_i in enumerate(axes.flat):
        ax_i.axis("off")
        if i < n:
            ax_i.imshow(to_numpy_image(images[i : i + 1], nrow=1, padding=0))
            ax_i.set_title("\n".join(textwrap.wrap(captions[i], 24)), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_grid(path: str | Path, images: torch.Tensor, nrow: int = 8, title: str | None = None,
              captions: list[str] | None = None) -> Path:
    """Write a grid of images (optionally captioned) to a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = show_grid(images, nrow=nrow, title=title, captions=captions)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_history(history: list[dict], keys: list[str], ax=None, logy: bool = True, label_prefix: str = ""):
    """Curves of logged values against the step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in keys:
        values = [h.get(key, float("nan")) for h in history]
        ax.plot(steps, values, label=label_prefix + key)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def explore(draw, **controls):
    """A figure with sliders: ``draw(**values)`` returns a figure; ``controls`` maps its arguments to widgets.

    The figure for the controls' starting values is an ordinary cell output (so it shows in a static view of
    the notebook), and every change of a control redraws it in place through its display id. This replaces
    ``ipywidgets.interact``, which draws into an Output widget: with no browser attached (nbval in CI, nbclient
    on the GPU machine) that capture can hang the run at random (jupyter/nbclient#312, jupyter/nbconvert#2029),
    and a static view of the notebook shows no figure at all.
    """
    import ipywidgets as widgets
    from IPython.display import display

    def figure():
        fig = draw(**{name: control.value for name, control in controls.items()})
        plt.close(fig)  # shown once, through the display below, not again by pyplot at the end of the cell
        return fig

    display(widgets.HBox(list(controls.values())))
    handle = display(figure(), display_id=True)
    for control in controls.values():
        control.observe(lambda _change: handle.update(figure()), names="value")
