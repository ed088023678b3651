"""Progress bars: a notebook saved after a run shows each bar's last state, not the 0% of its first display."""

import nbformat
import pytest
from nbclient import NotebookClient

from minildm.progress import in_notebook, progress_bar

CELL = """
from minildm.progress import in_notebook, progress_bar
print("in notebook:", in_notebook())
bar = progress_bar(total=5, desc="manual")
for _ in range(5):
    bar.update(1)
bar.close()
for _ in progress_bar(range(3), desc="iterated"):
    pass
quiet = progress_bar(total=2, desc="disabled", disable=True)
quiet.close()
"""


def test_outside_a_notebook_it_is_tqdm_auto():
    from tqdm.auto import tqdm

    assert not in_notebook()
    bar = progress_bar(total=3, disable=True)
    assert type(bar) is tqdm


def test_a_saved_notebook_shows_each_bar_finished(tmp_path):
    pytest.importorskip("ipywidgets")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    NotebookClient(nb, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "in notebook: True" in printed
    bars = [o.data["text/plain"] for o in outputs if o.output_type == "display_data"]
    assert len(bars) == 2, bars  # the disabled bar displays nothing
    for text, desc, n in zip(bars, ("manual", "iterated"), (5, 3)):
        assert text.startswith(desc) and "100%" in text and f"{n}/{n}" in text, text
        assert "application/vnd.jupyter.widget-view+json" in next(
            o.data for o in outputs if o.output_type == "display_data" and o.data["text/plain"] == text)
