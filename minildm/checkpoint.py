"""Checkpoints that never lose work and never run code.

- `save_checkpoint` writes to a temporary file in the same folder, flushes it to disk and
  renames it over the old one (`os.replace` is atomic), so an interrupted save leaves the
  previous checkpoint intact.
- `load_checkpoint` uses `torch.load(weights_only=True)`: only tensors and plain Python
  containers/numbers/strings are unpickled. A file that asks to build arbitrary objects
  (which is how a malicious pickle runs code) is refused with a clear error.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

FORMAT = "minildm-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, untrusted or of the wrong kind."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Atomically write `state` (tensors, dicts, lists, numbers, strings) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`, refusing anything that could execute code.

    `kind` (e.g. "autoencoder") checks that the file holds what the caller expects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at '{path}'. Train one first (e.g. `minildm train`), "
            "or pass the path of an existing .pt file."
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load '{path}': it contains Python objects other than tensors and plain "
            "containers, which could execute code when unpickled. Only load checkpoints written by "
            f"minildm (or re-save the weights as a plain state dict). Details: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint '{path}' is corrupt or truncated and cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}). Delete it and train again, "
            "or restore it from a backup."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a minildm checkpoint (no '{FORMAT}' marker). "
            "Load it with torch.load(weights_only=True) yourself if it is a plain state dict."
        )
    if kind is not None and state.get("kind") != kind:
        raise CheckpointError(
            f"'{path}' holds a '{state.get('kind')}' checkpoint, but a '{kind}' checkpoint was expected."
        )
    return state
