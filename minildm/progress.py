"""Progress bars that a saved notebook shows in their last state.

`tqdm.auto` draws an ipywidgets bar in a Jupyter kernel. A saved notebook keeps the widget's state (JupyterLab draws
it finished) and, for every viewer without the widget (GitHub, `nbconvert`, a terminal), a text copy of the bar taken
when it was first displayed: 0%, forever. `progress_bar` displays the widget under a display id and sends it again
when it closes, so that text copy is the last state too ("100%| 45/45 s"). Outside a notebook it is `tqdm.auto.tqdm`.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def in_notebook() -> bool:
    """Whether `tqdm.auto` draws widget bars here (a Jupyter kernel with ipywidgets; decided when it was imported)."""
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:
        return False
    return issubclass(tqdm, notebook_tqdm)


class _RedisplayedBar(tqdm):
    """The widget bar (only made where `in_notebook()`), displayed under a display id and sent again, with its text
    copy, when it closes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, display=False, **kwargs)
        self._handle = None
        if not self.disable:
            from IPython.display import display

            self._handle = display(self.container, display_id=True)
            self.displayed = True

    def close(self):
        if self.disable:  # closed already (tqdm's close sets disable), or never shown
            return
        super().close()
        if self._handle is not None:
            self._handle.update(self.container)  # the text copy is taken now: the bar's last state
            self._handle = None


def progress_bar(iterable=None, **kwargs):
    """`tqdm.auto.tqdm(iterable, **kwargs)`; in a notebook, a widget bar whose saved text shows its last state."""
    if in_notebook() and not kwargs.get("delay"):
        return _RedisplayedBar(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
