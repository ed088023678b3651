"""Execute notebooks top to bottom and save them with their outputs.

Used to produce the committed outputs on the GPU machine (see CONTRIBUTING.md):

    python scripts/run_notebooks.py notebooks/01_data.ipynb notebooks/02_autoencoder.ipynb --out $OUT

Each executed copy is written to --out under the same file name (or in place with --inplace); the
wall time of each notebook is printed, and a failing cell stops that notebook with its traceback
kept in the saved copy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError


def execute(path: Path, out: Path, timeout: int) -> bool:
    nb = nbformat.read(path, as_version=4)
    # A cell past `timeout` gets a KeyboardInterrupt, so its traceback in the saved copy shows the line it was on.
    client = NotebookClient(nb, timeout=timeout, interrupt_on_timeout=True, kernel_name="python3",
                            resources={"metadata": {"path": "."}})
    start, ok = time.perf_counter(), True

    def cell_done(cell, cell_index, **_):  # progress per cell, so a stuck cell is easy to spot
        print(f"  {path.name} cell {cell_index}: done at {time.perf_counter() - start:.0f} s", flush=True)

    client.on_cell_executed = cell_done
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        ok = False
        print(f"FAILED {path}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else e}", file=sys.stderr)
    nbformat.write(nb, out)
    print(f"{'ok' if ok else 'FAILED':6} {path.name}: {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies")
    where.add_argument("--inplace", action="store_true", help="overwrite the notebooks")
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds a cell may run before it is interrupted (default 900; keep it under the "
                        "device command's limit so a stalled cell still comes back with its traceback)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = [execute(nb, nb if args.inplace else args.out / nb.name, args.timeout) for nb in args.notebooks]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
