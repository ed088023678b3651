"""Exercises: released by nbgrader from solutions/, in sync, and graded by checkers that can fail.

- exercises/ must be exactly what `nbgrader generate_assignment` makes from solutions/ today;
- every solution notebook passes its graded cells and every released exercise fails all of them
  (`nbgrader validate` and `--invert`): an unfilled exercise can never score;
- no cell of a solution notebook raises (its demo cells included): the check nbval made when CI ran solutions/ too.

Time (CI runs on 2 cores): nbgrader starts a few times, not twice a notebook. All assignments are released by one
nbgrader process (`NbGraderAPI.generate_assignment` for each); `nbgrader validate` runs as nbgrader's `Validator`
(what the command runs) in two worker processes, two notebooks at a time, every notebook in a kernel of its own.
The solution notebooks are not run again by nbval (`make test`).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from minildm.grade import _env

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())
# Released in a course folder of its own by one nbgrader process: {assignment: NbGraderAPI's result}.
RELEASE_ALL = """
import json, os, sys
from nbgrader.apps import NbGraderAPI
from nbgrader.coursedir import CourseDirectory
from traitlets.config.loader import PyFileConfigLoader

config = PyFileConfigLoader("nbgrader_config.py", path=os.getcwd()).load_config()
api = NbGraderAPI(coursedir=CourseDirectory(config=config, root=os.getcwd()), config=config)
results = {a: api.generate_assignment(a, force=True) for a in sys.argv[1:]}
print("@@results " + json.dumps(results))
"""


def _cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    return [{k: c[k] for k in ("cell_type", "source", "metadata")} for c in nb["cells"]]


def test_there_are_exercises():
    assert ASSIGNMENTS, "solutions/ holds no assignment folders"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict]:
    """`nbgrader generate_assignment <a> --force` for every assignment, in one copied course folder."""
    course = tmp_path_factory.mktemp("release")
    shutil.copytree(ROOT / "solutions", course / "solutions")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    result = subprocess.run([sys.executable, "-c", RELEASE_ALL, *ASSIGNMENTS], cwd=course, env=_env(),
                            capture_output=True, text=True, check=False, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("@@results ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return course / "exercises", json.loads(lines[-1][len("@@results "):])


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_exercises_are_in_sync_with_solutions(assignment, released):
    exercises, results = released
    assert results[assignment]["success"], results[assignment].get("error", "")[-2000:]
    released_nbs = sorted((exercises / assignment).glob("*.ipynb"))
    committed = sorted((ROOT / "exercises" / assignment).glob("*.ipynb"))
    assert [p.name for p in released_nbs] == [p.name for p in committed], "exercise notebooks differ from solutions/"
    for new, old in zip(released_nbs, committed):
        assert _cells(new) == _cells(old), (
            f"exercises/{assignment}/{old.name} is out of date: run "
            f"`nbgrader generate_assignment {assignment} --force` and commit the result")


def _validate(path: str, invert: bool) -> tuple[str, list[str] | None]:
    """`nbgrader validate [--invert] PATH` without starting nbgrader again: nbgrader's Validator with the course's
    config, as ValidateApp runs it (the notebook in a fresh kernel, every cell executed). Returns what the command
    prints and the errors in the executed notebook's cells (None when nothing was executed)."""
    from nbgrader.validator import Validator
    from traitlets.config.loader import PyFileConfigLoader

    class Keeping(Validator):
        executed = None

        def _preprocess(self, nb):
            self.executed = super()._preprocess(nb)
            return self.executed

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    validator = Keeping(config=config, invert=invert)
    validator.stream = io.StringIO()
    # The kernel's environment, as `minildm.grade.nbgrader` gives it, and one torch thread: two kernels run at once,
    # and torch's default of a thread per core made them wait for each other (ex05's demo UNet ran past nbgrader's
    # 30 s cell timeout with two kernels of two threads on two cores; seconds with one thread each).
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", **_env()}):
        validator.validate_and_print(path)
    return validator.stream.getvalue(), None if validator.executed is None else _errors(validator.executed)


def _errors(nb) -> list[str]:
    """'cell N (its first line): Ename: value' for every error output of a code cell (one that raised, or ran past
    nbgrader's cell timeout); N counts all cells from 1."""
    errors = []
    for i, cell in enumerate(nb.cells):
        first = (cell.source.strip().splitlines() or [""])[0][:60]
        errors += [f"cell {i + 1} ({first!r}): {o.get('ename')}: {o.get('evalue', '')}"[:500]
                   for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    return errors


def _validate_jobs(assignment: str) -> list[tuple[str, bool]]:
    return ([(str(nb), False) for nb in sorted((ROOT / "solutions" / assignment).glob("*.ipynb"))]
            + [(str(nb), True) for nb in sorted((ROOT / "exercises" / assignment).glob("*.ipynb"))])


@pytest.fixture(scope="module")
def validated(request) -> dict[tuple[str, bool], Future]:
    """Every validation the selected tests need, two notebooks at a time (each kernel is busy on about one core; CI
    has two) in two worker processes that start nbgrader once each: {(path, invert): future of `_validate`}."""
    selected = sorted({item.callspec.params["assignment"] for item in request.session.items
                       if getattr(item, "originalname", "") == "test_solutions_pass_and_unfilled_exercises_fail"})
    workers = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield {job: pool.submit(_validate, *job) for a in selected for job in _validate_jobs(a)}
        pool.shutdown(cancel_futures=True)  # after a failure under -x: no waiting for the rest


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solutions_pass_and_unfilled_exercises_fail(assignment, validated):
    for path, invert in _validate_jobs(assignment):
        out, errors = validated[path, invert].result(timeout=900)
        if not invert:
            assert "Success! Your notebook passes all the tests." in out, out[-3000:]
            # validate runs every cell but judges only the graded ones: no other cell may raise either (nbval's check)
            assert errors == [], f"{Path(path).relative_to(ROOT)}: cells that raised: {errors}"
        else:
            assert "Success! The notebook does not pass any tests." in out, out[-3000:]


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
