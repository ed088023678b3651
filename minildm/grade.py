"""Grading exercises: nbgrader does the work, this prints a per-exercise score report.

    minildm grade ex02-autoencoder            # in the course folder (the one with nbgrader_config.py)

Submissions go in submitted/<student>/<assignment>/<notebook>.ipynb (nbgrader's layout, e.g. what
`nbgrader collect` or a download from JupyterHub gives). nbgrader restores the original test cells and the
hidden tests before running each notebook, so editing a test cell never earns points.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def nbgrader(*args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run this environment's `nbgrader` with its bin folder on PATH (nbgrader starts alembic and kernels)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(bin_dir / "nbgrader"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False, timeout=timeout)


def autograde(assignment: str, course: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `nbgrader autograde` on every submission of `assignment`."""
    # The gradebook must know the assignment: releasing it again (idempotent) registers it.
    for args in (["generate_assignment", assignment, "--force"],
                 ["autograde", assignment, "--force", f"--ExecutePreprocessor.timeout={timeout}"]):
        result = nbgrader(*args, cwd=course)
        if result.returncode != 0:
            raise RuntimeError(f"nbgrader {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def scores(assignment: str, course: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{student: {grade cell: (score, max score)}} from the course's gradebook."""
    from nbgrader.api import Gradebook

    table: dict[str, dict[str, tuple[float, float]]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for submission in gradebook.assignment_submissions(assignment):
            row = table.setdefault(submission.student_id, {})
            for notebook in submission.notebooks:
                for grade in notebook.grades:
                    row[grade.name] = (float(grade.score), float(grade.max_score))
    return table


def report(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """A plain-text table: one row per student, one column per graded cell, and the total."""
    if not table:
        return "no submissions found (expected submitted/<student>/<assignment>/*.ipynb)"
    cells = sorted({cell for row in table.values() for cell in row})
    width = max(len("student"), *(len(s) for s in table))
    lines = [f"{'student':{width}}  " + "  ".join(cells) + "  total"]
    for student in sorted(table):
        row = table[student]
        got = sum(score for score, _ in row.values())
        out_of = sum(max_score for _, max_score in row.values())
        marks = [f"{row[c][0]:g}/{row[c][1]:g}".rjust(len(c)) if c in row else "-".rjust(len(c)) for c in cells]
        lines.append(f"{student:{width}}  " + "  ".join(marks) + f"  {got:g}/{out_of:g}")
    return "\n".join(lines)
