"""Exercises: released by nbgrader from solutions/, in sync, and graded by checkers that can fail.

- exercises/ must be exactly what `nbgrader generate_assignment` makes from solutions/ today;
- every solution notebook passes its graded cells and every released exercise fails all of them
  (`nbgrader validate` and `--invert`): an unfilled exercise can never score.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from minildm.grade import nbgrader as run_nbgrader

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())


def nbgrader(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_nbgrader(*args, cwd=cwd, timeout=300)


def _cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    return [{k: c[k] for k in ("cell_type", "source", "metadata")} for c in nb["cells"]]


def test_there_are_exercises():
    assert ASSIGNMENTS, "solutions/ holds no assignment folders"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_exercises_are_in_sync_with_solutions(assignment, tmp_path):
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions")
    shutil.copy(ROOT / "nbgrader_config.py", tmp_path)
    result = nbgrader("generate_assignment", assignment, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    released = sorted((tmp_path / "exercises" / assignment).glob("*.ipynb"))
    committed = sorted((ROOT / "exercises" / assignment).glob("*.ipynb"))
    assert [p.name for p in released] == [p.name for p in committed], "exercise notebooks differ from solutions/"
    for new, old in zip(released, committed):
        assert _cells(new) == _cells(old), (
            f"exercises/{assignment}/{old.name} is out of date: run "
            f"`nbgrader generate_assignment {assignment} --force` and commit the result")


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solutions_pass_and_unfilled_exercises_fail(assignment):
    for nb in sorted((ROOT / "solutions" / assignment).glob("*.ipynb")):
        result = nbgrader("validate", str(nb), cwd=ROOT)
        assert "Success! Your notebook passes all the tests." in result.stdout, result.stdout[-3000:]
    for nb in sorted((ROOT / "exercises" / assignment).glob("*.ipynb")):
        result = nbgrader("validate", "--invert", str(nb), cwd=ROOT)
        assert "Success! The notebook does not pass any tests." in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("assignment, points, first_task", [("ex02-autoencoder", 8, "test_reparameterize"),
                                                             ("ex01-data", 5, "test_count_objects"),
                                                             ("ex06-latent", 6, "test_latent_scale_factor")])
def test_grade_command_scores_solved_and_unfilled_submissions(assignment, points, first_task, tmp_path, capsys):
    from minildm.cli import main

    for folder in ("solutions", "exercises"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "nbgrader_config.py", tmp_path)
    for student, source in (("alice", "solutions"), ("bob", "exercises")):
        target = tmp_path / "submitted" / student / assignment
        shutil.copytree(tmp_path / source / assignment, target)
    assert main(["grade", assignment, "--course", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines if line.startswith(("alice", "bob"))}
    assert table["alice"][-1] == f"{points}/{points}" and table["bob"][-1] == f"0/{points}", lines
    assert first_task in lines[-3]
