"""The plotting helpers: grids of the right size, and `explore`'s sliders in a real kernel."""

import base64
from pathlib import Path

import matplotlib
import nbformat
import torch
from nbclient import NotebookClient

from minildm.viz import show_class_rows, to_numpy_image

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def test_grid_layout_and_range():
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    grid = to_numpy_image(images, nrow=3, padding=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (4 + 2) + 2, 3)  # 2 rows of 3 cells, padding around each
    assert grid.min() == 0.0 and grid.max() == 1.0


def test_class_rows_label_each_row_and_frame_only_the_misread_samples():
    images = torch.zeros(4, 1, 8, 8)  # 2 classes x 2 samples, ordered class by class
    read = torch.tensor([0, 1, 1, 1])  # the second sample of class 0 was read as class 1
    fig = show_class_rows(images, ["0 - zero", "1 - one"], 2, "t", read=read)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 - zero", "1 - one"]
    assert len(ax.patches) == 1 and [t.get_text() for t in ax.texts] == ["1"]
    (frame,) = ax.patches
    assert frame.get_xy() == (1 * 10 + 1, 0 * 10 + 1)  # column 1, row 0; cells are 8 + 2 px of padding
    # rows of chosen classes (minildm sample 7 3): a sample is right when it is read as its row's class
    fig = show_class_rows(images, [f"{d}" for d in range(10)], 2, read=torch.tensor([7, 7, 7, 3]), rows=[7, 3])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["7", "3"]
    assert [t.get_text() for t in ax.texts] == ["7"] and ax.patches[0].get_xy() == (0 * 10 + 1, 1 * 10 + 1)


def _pngs(cell):
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def test_explore_draws_once_then_redraws_in_place_when_a_control_moves():
    """The starting figure is a plain output of the cell (no Output widget), and moving the slider replaces
    that figure through its display id instead of adding a second one."""
    draw = """
import ipywidgets as widgets, matplotlib.pyplot as plt
from minildm.viz import explore
def line(slope=1):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, slope])
    ax.set_ylim(0, 5)
    return fig
slider = widgets.IntSlider(1, 0, 5)
explore(line, slope=slider)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(draw)])
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    widget_view, figure = nb.cells[0].outputs  # the controls, then the figure as a plain output
    assert "application/vnd.jupyter.widget-view+json" in widget_view["data"] and "image/png" in figure["data"]
    (first,) = _pngs(nb.cells[0])

    nb.cells.append(nbformat.v4.new_code_cell("slider.value = 4"))
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    (moved,) = _pngs(nb.cells[0])  # still one figure in the first cell ...
    assert moved != first  # ... and it is the redrawn one
    assert _pngs(nb.cells[1]) == []


def test_explore_takes_a_text_box_and_shows_bad_input_as_a_message():
    """A prompt box: it redraws on Enter (not at every key), and a ValueError from draw becomes a figure with the
    message instead of a traceback lost in the widget's log."""
    draw = """
import ipywidgets as widgets, matplotlib.pyplot as plt
from minildm.viz import explore
def words(prompt="a red circle", n=1):
    if "dog" in prompt:
        raise ValueError(f"prompt {prompt!r} has words the model never saw in training: ['dog']")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.bar(range(len(prompt.split())), [n] * len(prompt.split()))
    return fig
box, slider = widgets.Text("a red circle"), widgets.IntSlider(1, 1, 5)
explore(words, prompt=box, n=slider)
print(box.continuous_update)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(draw)])
    run = NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    run.execute()
    assert nb.cells[0].outputs[-1]["text"].strip() == "False"
    (first,) = _pngs(nb.cells[0])
    nb.cells.append(nbformat.v4.new_code_cell("box.value = 'a red dog'"))
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    (message,) = _pngs(nb.cells[0])
    assert message != first and not any(o.get("output_type") == "error" for c in nb.cells for o in c.outputs)
    nb.cells.append(nbformat.v4.new_code_cell("box.value = 'a big red circle'"))
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    (again,) = _pngs(nb.cells[0])
    assert again not in (first, message)


def test_no_notebook_uses_ipywidgets_interact():
    """interact draws into an Output widget, which can hang a run with no browser attached (CI's nbval, the GPU
    machine's nbclient; jupyter/nbclient#312): the course's sliders go through `explore` instead."""
    notebooks = sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("solutions/**/*.ipynb"))
    assert notebooks
    for path in notebooks:
        for cell in nbformat.read(path, as_version=4).cells:
            assert "interact(" not in cell.source, f"{path.name} calls ipywidgets.interact; use minildm.viz.explore"
