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
    return save_figure(show_grid(images, nrow=nrow, title=title, captions=captions), path)


def misreads(read: torch.Tensor, rows, per_class: int) -> torch.Tensor:
    """(B,) bool, True where a reading (e.g. a classifier's labels) is not the class of the sample's row: images
    ordered row by row, `per_class` per row, row r showing class rows[r]."""
    return read.cpu() != torch.as_tensor(list(rows)).repeat_interleave(per_class)


def show_class_rows(images: torch.Tensor, classes: list[str], per_class: int, title: str | None = None,
                    read: torch.Tensor | None = None, rows: list[int] | None = None):
    """`per_class` images per row, one row per class, the class name at the left; `rows` gives the class of each
    row (default: every class in order) and images are ordered row by row. With `read` ((B,) labels, e.g. a
    classifier's), a sample read as another class than its row's gets a red frame and the name (up to " - ") of
    the class it was read as."""
    rows = list(range(len(classes))) if rows is None else list(rows)
    fig, ax = plt.subplots(figsize=(0.9 * per_class + 1.5, 0.9 * len(rows)))
    ax.imshow(to_numpy_image(images, nrow=per_class))
    size = images.shape[-1] + 2  # make_grid's padding is 2 px
    ax.set_yticks([size * (r + 0.5) for r in range(len(rows))], [classes[c] for c in rows])
    ax.set_xticks([])
    if read is not None:
        for i in torch.nonzero(misreads(read, rows, per_class)).flatten().tolist():
            row, col = divmod(i, per_class)
            label = int(read[i])
            ax.add_patch(plt.Rectangle((col * size + 1, row * size + 1), size - 2, size - 2, fill=False,
                                       edgecolor="red", linewidth=2))
            ax.text(col * size + 3, row * size + 8, classes[label].split(" - ")[0], color="red", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure to a PNG file (folders made as needed) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def quality_over_time(result: dict, key: str, title: str):
    """The figure of a `benchmarks/claims.py` result: caption accuracy and FD / floor against seconds of training,
    one line per entry of result[key] ("spaces": pixel and latent; "factors": f = 1, 2, 4, 8). Returns the figure."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in result[key].items():
        label = f"f={name}" if key == "factors" else name
        seconds = [p["seconds"] for p in run["curve"]]
        a1.plot(seconds, [100 * p["caption"] for p in run["curve"]], "o-", label=label)
        a2.plot(seconds, [p["fd_ratio"] for p in run["curve"]], "o-", label=label)
    targets = result.get("targets", {})  # (a) only: the pixel model's final levels
    for ax, measure, scale in ((a1, "caption", 100), (a2, "fd_ratio", 1)):
        if measure in targets:
            ax.axhline(scale * targets[measure]["target"], color="gray", ls="--", lw=1, label="pixel model's final")
    a1.set_ylabel("captions right (%)")
    a2.set_ylabel("FD / real-data floor")
    a2.axhline(1, color="black", ls=":", lw=1, label="real data (the floor)")
    a2.set_yscale("log")
    a2.set_ylim(bottom=min(a2.get_ylim()[0], 0.9))
    a2.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # labels at 1, 2, 5, 10, 20: never crowded
    a2.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 1.5, not 1.5 x 10^0
    a2.yaxis.set_minor_formatter(NullFormatter())
    for ax in (a1, a2):
        ax.set_xlabel("seconds of training")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}, {result.get('gpu', 'device not recorded')}\nn = {result['n']} held-out captions, guidance "
                 f"{result['guidance']:g}, {result['sampler']}; read by and FD on {result['feature_network']}",
                 fontsize=9)
    fig.tight_layout()
    return fig


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
    """A figure with controls: ``draw(**values)`` returns a figure; ``controls`` maps its arguments to widgets.

    The figure for the controls' starting values is an ordinary cell output (so it shows in a static view of
    the notebook), and every change of a control redraws it in place through its display id. This replaces
    ``ipywidgets.interact``, which draws into an Output widget: with no browser attached (nbval in CI, nbclient
    on the GPU machine) that capture can hang the run at random (jupyter/nbclient#312, jupyter/nbconvert#2029),
    and a static view of the notebook shows no figure at all.

    Any widget with a ``value`` works: sliders, dropdowns, and text boxes (``ipywidgets.Text``, e.g. a prompt), which
    redraw when Enter is pressed or the box loses focus, not at every key (their continuous_update is switched off).
    A ValueError from ``draw`` (bad input, such as a word the model never saw) is drawn as a figure with its message,
    so the controls stay usable; other errors are raised as usual.
    """
    import ipywidgets as widgets
    from IPython.display import display

    for control in controls.values():
        if isinstance(control, (widgets.Text, widgets.Textarea)):
            control.continuous_update = False

    def figure():
        try:
            fig = draw(**{name: control.value for name, control in controls.items()})
        except ValueError as error:
            fig = message_figure(f"{type(error).__name__}: {error}")
        plt.close(fig)  # shown once, through the display below, not again by pyplot at the end of the cell
        return fig

    display(widgets.HBox(list(controls.values())))
    handle = display(figure(), display_id=True)
    for control in controls.values():
        control.observe(lambda _change: handle.update(figure()), names="value")


def message_figure(text: str, width: float = 6.0):
    """A figure that shows only `text`, wrapped (what `explore` draws instead of a picture when the input is bad)."""
    fig, ax = plt.subplots(figsize=(width, 1.2))
    ax.text(0.01, 0.5, "\n".join(textwrap.wrap(text, int(width * 14))), va="center", fontsize=8, color="#b00000")
    ax.axis("off")
    return fig


def show_attention(image: torch.Tensor, maps: torch.Tensor, tokens: list[str], title: str | None = None,
                   skip: tuple[str, ...] = ("<bos>", "<eos>"), scale: float = 1.35):
    """One image (3, H, W) and, for each of its caption's tokens, where the image attended to it: `maps` (L, H, W)
    (e.g. from `attention_maps.cross_attention_maps`, aligned with `tokens`) over the image in grey, each map
    scaled to its own maximum. Under each token: its mean weight over the image (the maps sum to 1 over the
    tokens at every pixel, so this is the token's share of the attention). Returns the figure."""
    shown = [(j, token) for j, token in enumerate(tokens) if token not in skip]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(scale * (len(shown) + 1), scale * 1.25), squeeze=False)
    picture = to_numpy_image(image[None], nrow=1, padding=0)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("sample", fontsize=7)
    grey = picture.mean(-1)
    for ax, (j, token) in zip(axes[0, 1:], shown):
        m = maps[j].float().cpu()
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        ax.imshow((m / m.max().clamp(min=1e-12)).numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=1)
        ax.set_title(f"{token}\n{m.mean().item():.2f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def show_readings(images: torch.Tensor, reads: torch.Tensor, attributes: torch.Tensor | None = None,
                  captions: list[str] | None = None, ncol: int = 8, title: str | None = None, scale: float = 1.9,
                  row_names: list[str] | None = None):
    """Shapes images with what the judge reads (`ShapesJudge.read`, (B, 9, 3)) written into each grid cell.

    With the captioned `attributes` (B, 3, 4), cells read wrong are red ("missed" where an object was not seen)
    and each image gets a green frame when the judge reads exactly its caption, red otherwise. `row_names` label
    the rows (one per `ncol` images). Returns the figure."""
    from minildm.data.shapes import COLOUR_NAMES, SHAPES, SIZES
    from minildm.judge import cell_labels

    n, S = len(images), images.shape[-1]
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(scale * ncol, scale * nrow * (1.45 if captions else 1.0)),
                             squeeze=False)
    reads = reads.cpu()
    truth = cell_labels(attributes.cpu()) if attributes is not None else None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(to_numpy_image(images[i:i + 1], nrow=1, padding=0))
        for k in range(9):  # the 3x3 cells, row-major
            right = truth is None or bool((reads[i, k] == truth[i, k]).all())
            shape, colour, size = reads[i, k].tolist()
            if shape < 0 and right:
                continue
            text = f"{SIZES[size]} {COLOUR_NAMES[colour]}\n{SHAPES[shape]}" if shape >= 0 else "missed"
            row, col = divmod(k, 3)
            ax.text((col + 0.5) * S / 3 - 0.5, (row + 0.78) * S / 3 - 0.5, text, ha="center", va="center",
                    fontsize=5, linespacing=0.9, color="white" if right else "#ff4040", clip_on=True,
                    bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.5, "edgecolor": "none"})
        if truth is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if bool((reads[i] == truth[i]).all()) else "red")
                spine.set_linewidth(3)
        if captions is not None:
            ax.set_title("\n".join(textwrap.wrap(captions[i], 28)), fontsize=6)
        if row_names is not None and i % ncol == 0:
            ax.set_ylabel(row_names[i // ncol], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
