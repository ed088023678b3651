"""Grading exercises: nbgrader does the work, this makes a report an instructor can trust.

    minildm grade ex02-autoencoder            # in the course folder (the one with nbgrader_config.py)
    minildm grade ex02-autoencoder --csv grades.csv --json grades.json --timeout 60

Submissions go in submitted/<student>/<assignment>/<notebook>.ipynb (nbgrader's layout, e.g. what
`nbgrader collect` or a download from an LMS gives). What happens:

- Every student folder under submitted/ with the assignment gets one row of the table; a student whose folder is
  gone is not listed (the gradebook keeps their old grades, the report does not show them).
- A file an LMS renamed (`autoencoder (1).ipynb`, `autoencoder-2.ipynb`, `Copy of autoencoder.ipynb`, or the only
  notebook in the folder when the assignment has one) is renamed to the assignment's notebook name first (the
  newest of several copies), and the report says so.
- The assignment is registered in the gradebook by `nbgrader generate_assignment` into a scratch folder (the
  course's exercises/ is never rewritten), then each notebook is autograded on its own (nbgrader's Autograde for
  one student and one notebook, all in one helper process so nbgrader starts once; a few seconds a notebook,
  mostly the kernel's start and imports). A notebook that cannot be graded gets a status instead of a score and
  the others are graded anyway:
    graded            points for every test cell;
    timed out         a cell ran past --timeout. nbgrader 0.9 interrupts it, records a CellTimeoutError in that
                      cell and runs the rest, so the notebook still has a score ("graded, timed out: <cell>");
                      only a cell that ignores the interrupt leaves the notebook "not graded: timed out";
    kernel died       e.g. `os._exit()` in a cell, a crash, out of memory (the cell is named);
    invalid notebook  not JSON, or not a notebook;
    missing notebook  no file that could be the notebook;
    error             nbgrader itself failed: the only status that makes the command exit non-zero.
  A notebook that was not graded has its grades cleared in the gradebook (auto score None, needs manual grade), so
  the score of an earlier run never passes for a new one.
- Test cells run as the instructor wrote them, whatever the student did to them. nbgrader replaces the source of
  every test cell with the source in the gradebook (with its hidden tests). A *deleted* test cell is another
  matter: nbgrader 0.9 only puts it back with `OverwriteCells.add_missing_cells` (off by default; without it the
  cell is simply not run and its score is left empty, "needs manual grade"), and then fails the whole submission
  with a KeyError when the cell before it was deleted too. `RestoreTestCells` below puts deleted test cells back
  in both cases; the report lists every edited or deleted test cell.
- Plain nbgrader warns "Attribute 'checksum' ... has changed" for every test cell with hidden tests of every
  submission, untouched ones included (jupyter/nbgrader#1961: the gradebook keeps the checksum of the source cell,
  hidden tests included, the release the checksum without them). RestoreTestCells warns only about cells the
  student changed. nbgrader_config.py uses it too, for plain `nbgrader autograde` and the formgrader.
- The table has points per task ("-" when not graded, never a 0), the total, the grading time and the status;
  the lines above it say what was renamed, put back, cut off, or why a notebook was not graded. `--csv` (one row
  per student and task) and `--json` add the checker's message of every failed test cell (its `ExerciseError`
  text, read from the autograded notebook) and nbgrader's warnings.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

GRADED, TIMED_OUT, KERNEL_DIED, INVALID, MISSING, ERROR = (
    "graded", "timed out", "kernel died", "invalid notebook", "missing notebook", "error")
SOURCE = "solutions"      # CourseDirectory.source_directory in nbgrader_config.py
SUBMITTED = "submitted"   # nbgrader's default submitted_directory
_MARK = "@@minildm-grade "  # prefix of the helper's result lines (a kernel's stray output cannot look like one)


def nbgrader(*args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run this environment's `nbgrader` with its bin folder on PATH (nbgrader starts alembic and kernels)."""
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "nbgrader"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          check=False, timeout=timeout)


def _env() -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    package_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": pythonpath}


# ----------------------------------------------------------------------------------------------- the report


@dataclass
class Task:
    notebook: str
    name: str  # the grade cell's grade_id
    max_points: float


@dataclass
class NotebookResult:
    notebook: str
    status: str = MISSING
    graded: bool = False          # whether the points below are a grade (True also for "timed out" with a score)
    detail: str = ""              # why it was not graded, or which cell timed out
    traceback: str = ""           # nbgrader's traceback when it failed ("error": a grading failure)
    file: str | None = None       # the submitted file that was graded (after renaming)
    renamed_from: str | None = None
    seconds: float | None = None  # grading time of this notebook
    points: dict[str, float | None] = field(default_factory=dict)  # task -> points (None: needs manual grading)
    messages: dict[str, str] = field(default_factory=dict)         # task -> error of a failed test cell
    timed_out: list[str] = field(default_factory=list)             # cells cut off after --timeout
    restored: list[str] = field(default_factory=list)              # "test_x (deleted)", "test_y (edited)"
    warnings: list[str] = field(default_factory=list)              # what nbgrader warned about while grading

    def text(self) -> str:
        if self.status == GRADED:
            return GRADED
        if self.graded:
            return f"graded, {self.status}: {', '.join(self.timed_out)}" if self.timed_out else f"graded, {self.status}"
        return f"not graded: {self.status}"


@dataclass
class StudentResult:
    student: str
    notebooks: list[NotebookResult]
    notes: list[str] = field(default_factory=list)  # renamed or ignored files

    @property
    def graded(self) -> bool:
        return any(nb.graded for nb in self.notebooks)

    @property
    def status(self) -> str:
        if len(self.notebooks) == 1:
            return self.notebooks[0].status
        statuses = [nb.status for nb in self.notebooks if nb.status != GRADED]
        return statuses[0] if statuses else GRADED

    def text(self) -> str:
        if len(self.notebooks) == 1:
            return self.notebooks[0].text()
        odd = [f"{nb.notebook}: {nb.text()}" for nb in self.notebooks if nb.status != GRADED]
        return "; ".join(odd) if odd else GRADED

    @property
    def seconds(self) -> float | None:
        times = [nb.seconds for nb in self.notebooks if nb.seconds is not None]
        return sum(times) if times else None

    def points(self) -> float | None:
        if not self.graded:
            return None
        return sum(p or 0.0 for nb in self.notebooks if nb.graded for p in nb.points.values())


@dataclass
class Report:
    assignment: str
    timeout: int
    tasks: list[Task]
    students: list[StudentResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # grading itself failed (not a student's notebook)
    seconds: float = 0.0
    isolation: str = ""  # how the kernels ran: in the bwrap sandbox, or why not

    @property
    def max_points(self) -> float:
        return sum(t.max_points for t in self.tasks)

    def _labels(self) -> list[str]:
        names = [t.name for t in self.tasks]
        return [t.name if names.count(t.name) == 1 else f"{t.notebook}/{t.name}" for t in self.tasks]

    def table(self) -> str:
        """One row per student: status, grading time, points per task ("-": not graded) and the total."""
        if not self.students:
            return f"no submissions found (expected {SUBMITTED}/<student>/{self.assignment}/*.ipynb)"
        labels = self._labels()
        head = ["student", "status", "time"] + labels + ["total"]
        rows = []
        for s in self.students:
            nbs = {nb.notebook: nb for nb in s.notebooks}
            marks = []
            for t in self.tasks:
                nb = nbs[t.notebook]
                p = nb.points.get(t.name)
                marks.append("-" if not nb.graded else f"{'?' if p is None else f'{p:g}'}/{t.max_points:g}")
            got = s.points()
            total = "-" if got is None else f"{got:g}/{self.max_points:g}"
            seconds = "-" if s.seconds is None else f"{s.seconds:.1f} s"
            rows.append([s.student, s.text(), seconds] + marks + [total])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

        def line(cells):  # text columns to the left, numbers to the right
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        return "\n".join(line(r).rstrip() for r in [head] + rows)

    def notes(self) -> list[str]:
        """What the table does not say: renamed files, restored test cells, timeouts, why a notebook was not graded."""
        out = []
        for s in self.students:
            out += [f"{s.student}: {note}" for note in s.notes]
            for nb in s.notebooks:
                where = f"{s.student}: {nb.file or nb.notebook + '.ipynb'}"
                if nb.renamed_from:
                    out.append(f"{s.student}: renamed '{nb.renamed_from}' -> '{nb.file}' before grading")
                if nb.restored:
                    out.append(f"{where}: test cells put back as released: {', '.join(nb.restored)}")
                if nb.detail:
                    out.append(f"{where}: {nb.text()} ({nb.detail})")
        return out

    def to_dict(self) -> dict:
        students = []
        for s in self.students:
            notebooks = []
            for nb in s.notebooks:
                d = asdict(nb)
                d["tasks"] = {t.name: {"points": nb.points.get(t.name) if nb.graded else None,
                                       "max_points": t.max_points, "message": nb.messages.get(t.name)}
                              for t in self.tasks if t.notebook == nb.notebook}
                del d["points"], d["messages"]
                notebooks.append(d)
            students.append({"student": s.student, "status": s.status, "graded": s.graded, "text": s.text(),
                             "points": s.points(), "max_points": self.max_points, "seconds": s.seconds,
                             "notes": s.notes, "notebooks": notebooks})
        return {"assignment": self.assignment, "timeout": self.timeout, "seconds": round(self.seconds, 1),
                "isolation": self.isolation,
                "max_points": self.max_points, "tasks": [asdict(t) for t in self.tasks],
                "failures": self.failures, "students": students}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def write_csv(self, path: str | Path) -> Path:
        """One row per student and task: points (empty when not graded), the status and the failed cell's message."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["student", "notebook", "task", "points", "max_points", "status", "graded", "message",
                        "seconds", "file"])
            for s in self.students:
                nbs = {nb.notebook: nb for nb in s.notebooks}
                for t in self.tasks:
                    nb = nbs[t.notebook]
                    p = nb.points.get(t.name) if nb.graded else None
                    w.writerow([s.student, t.notebook, t.name, "" if p is None else f"{p:g}", f"{t.max_points:g}",
                                nb.status, nb.graded, nb.messages.get(t.name, "" if nb.graded else nb.detail),
                                "" if nb.seconds is None else f"{nb.seconds:.1f}", nb.file or ""])
        return path


# ------------------------------------------------------------------------------------- before nbgrader runs


def assignment_tasks(assignment: str, course: Path) -> list[Task]:
    """The graded cells of the assignment's source notebooks, in notebook order."""
    tasks = []
    for path in sorted((course / SOURCE / assignment).glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("grade"):
                tasks.append(Task(path.stem, meta["grade_id"], float(meta.get("points", 0))))
    return tasks


_COPY_NAMES = [re.compile(p, re.IGNORECASE) for p in (
    r"^copy of (.+)$",         # Copy of autoencoder (Google Drive)
    r"^(.+?)\s*\(\d+\)$",      # autoencoder (1) (browsers, Windows, LMS downloads)
    r"^(.+?)[\s_-]+copy$",     # autoencoder - Copy, autoencoder_copy
    r"^(.+?)[\s_-]+\d+$",      # autoencoder-2, autoencoder_2 (LMS resubmissions)
)]


def _names(stem: str) -> list[str]:
    """The name itself and every name it was copied from, lowercased: 'Copy of ae (1)' -> ['copy of ae (1)', ...]."""
    chain = [stem.strip().lower()]
    changed = True
    while changed:
        changed = False
        for pattern in _COPY_NAMES:
            m = pattern.match(chain[-1])
            if m and m.group(1).strip():
                chain.append(m.group(1).strip().lower())
                changed = True
    return chain


def match_notebooks(folder: Path, expected: list[str]) -> tuple[dict[str, Path | None], dict[str, str], list[str]]:
    """Find each expected notebook in a student's folder, renaming LMS-style copies to the expected name.

    Returns {notebook: path or None (missing)}, {notebook: the name it had before renaming} and notes on the
    notebooks that were left alone. Of several copies of one notebook the newest is taken."""
    files = sorted(p for p in folder.glob("*.ipynb") if p.is_file() and not p.name.startswith("."))
    found: dict[str, Path | None] = {}
    renamed: dict[str, str] = {}
    notes: list[str] = []
    exact = {p.stem for p in files} & set(expected)
    unused = [p for p in files if p.stem not in exact]
    for name in expected:
        if name in exact:
            found[name] = folder / f"{name}.ipynb"
            continue
        candidates = [p for p in unused if name.lower() in _names(p.stem)]
        if not candidates and len(expected) == 1 and len(unused) == 1:
            candidates = unused  # the only notebook of a one-notebook assignment, whatever its name
        if not candidates:
            found[name] = None
            continue
        newest = max(candidates, key=lambda p: (p.stat().st_mtime, p.name))
        target = folder / f"{name}.ipynb"
        newest.rename(target)
        unused.remove(newest)
        found[name] = target
        renamed[name] = newest.name
    for p in unused:
        notes.append(f"ignored '{p.name}' (not graded: an older copy, or not a notebook of this assignment)")
    return found, renamed, notes


def _check_json(path: Path) -> str:
    """'' when the file parses as a notebook's JSON, else what is wrong (nbgrader would fail on it)."""
    try:
        nb = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON: {e}"
    if not isinstance(nb, dict) or not isinstance(nb.get("cells", nb.get("worksheets")), list):
        return "JSON but not a notebook (no list of cells)"
    return ""


# ------------------------------------------------------------------------------------------------- grading


SANDBOX_MODES = ("auto", "bwrap", "none")


def _isolation(mode: str, course: Path, scratch: Path, env: dict[str, str]) -> tuple[str, str | None, str]:
    """How the kernels will run: (the report's line, the kernel spec's name or None for nbgrader's own kernel, why
    grading must stop or ''). With a sandbox, `env` gets the Jupyter paths of its kernel spec."""
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox={mode!r}: use one of {', '.join(SANDBOX_MODES)}")
    if mode == "none":
        return "none (--sandbox none): student code runs as you, with the course folder in reach", None, ""
    from minildm import sandbox

    why = sandbox.probe()
    if not why:
        try:
            sandbox.kernelspec(scratch / "jupyter", scratch / "rt", [course])
        except sandbox.SandboxError as e:
            why = str(e)
    if why and mode == "bwrap":
        return f"none: {why}", None, f"--sandbox bwrap: the sandbox cannot run: {why}"
    if why:
        return (f"NOT ISOLATED: {why}. Student code runs as you, with solutions/, the gradebook and other students' "
                "work in reach: read suspicious submissions (--sandbox bwrap refuses to grade instead)"), None, ""
    (scratch / "rt").mkdir(exist_ok=True)
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(scratch / "jupyter"), env.get("JUPYTER_PATH")) if p)
    env["JUPYTER_RUNTIME_DIR"] = str(scratch / "rt")
    env["MINILDM_GRADE_IPC"] = str(scratch / "rt" / "k")  # the helper's kernels put their Unix sockets there
    return ("bubblewrap: each kernel sees only a copy of its own notebook folder and the installed packages, "
            "no course folder, no network"), sandbox.KERNEL_NAME, ""


def grade(assignment: str, course: str | Path = ".", timeout: int = 120,
          progress: Callable[[str], None] | None = None, sandbox: str = "auto") -> Report:
    """Autograde every submission of `assignment` in the course folder and return the report.

    sandbox: "auto" runs each kernel in the bubblewrap sandbox (minildm.sandbox) where it can run, else grades
    without isolation and says so in `Report.isolation`; "bwrap" fails instead; "none" skips the sandbox.
    Never raises because of a student's notebook; `Report.failures` says when grading itself failed."""
    with tempfile.TemporaryDirectory(prefix="mldm-") as scratch:  # short: ZeroMQ's socket paths go in there
        return _grade(assignment, Path(course).resolve(), timeout, progress, sandbox, Path(scratch))


def _grade(assignment: str, course: Path, timeout: int, progress: Callable[[str], None] | None, sandbox: str,
           scratch: Path) -> Report:
    progress = progress or (lambda line: None)
    start = time.monotonic()
    report = Report(assignment, timeout, assignment_tasks(assignment, course))
    expected = list(dict.fromkeys(t.notebook for t in report.tasks)) or sorted(
        p.stem for p in (course / SOURCE / assignment).glob("*.ipynb"))
    jobs, clear, results = [], [], {}
    submitted = course / SUBMITTED
    folders = sorted(p for p in submitted.glob(f"*/{assignment}") if p.is_dir() and not p.parent.name.startswith("."))
    for folder in folders:
        student = folder.parent.name
        found, renamed, notes = match_notebooks(folder, expected)
        nbs = []
        for name in expected:
            nb = NotebookResult(name)
            path = found[name]
            if path is None:
                nb.detail = f"no {name}.ipynb in {folder.relative_to(course)}"
                clear.append([student, name])
            else:
                nb.file, nb.renamed_from = path.name, renamed.get(name)
                problem = _check_json(path)
                if problem:
                    nb.status, nb.detail = INVALID, problem
                    clear.append([student, name])
                else:
                    nb.status = "queued"
                    jobs.append([student, name])
            nbs.append(nb)
            results[student, name] = nb
        report.students.append(StudentResult(student, nbs, notes))
    if not folders:
        report.seconds = time.monotonic() - start
        return report

    env = _env()
    report.isolation, kernel, stop = _isolation(sandbox, course, scratch, env)
    progress(f"isolation: {report.isolation}")
    if stop:  # grading must not run student code unisolated: nothing is graded
        report.failures.append(stop)
        for nb in results.values():
            if nb.status == "queued":
                nb.status, nb.detail = ERROR, "not graded: the sandbox cannot run (see the error)"
        report.seconds = time.monotonic() - start
        return report
    width = max(len(s.student) for s in report.students)
    spec = {"assignment": assignment, "timeout": timeout, "jobs": jobs, "clear": clear, "kernel": kernel}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minildm.grade", "--helper"], cwd=course, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if not line.startswith(_MARK):
                continue
            msg = json.loads(line[len(_MARK):])
            if msg["kind"] == "fatal":
                report.failures.append(msg["error"])
            elif msg["kind"] == "job":
                nb = results[msg["student"], msg["notebook"]]
                for key in ("status", "graded", "detail", "traceback", "seconds", "points", "messages", "timed_out",
                            "restored", "warnings"):
                    setattr(nb, key, msg[key])
                if nb.status == ERROR:
                    report.failures.append(f"nbgrader failed on {msg['student']}/{nb.file}:\n{nb.traceback}")
                progress(f"  {msg['student']:{width}}  {nb.file}  {nb.text()}  ({nb.seconds:.1f} s)")
        rc = proc.wait()
        if rc != 0 and not report.failures:
            log.seek(0)
            report.failures.append(f"the grading helper exited with status {rc}:\n{log.read()[-3000:]}")
    for nb in results.values():
        if nb.status == "queued":  # the helper stopped before this one
            nb.status, nb.detail = ERROR, "grading stopped before this notebook (see the error)"
    report.seconds = time.monotonic() - start
    return report


# ------------------------------------------------------------------- the helper process (imports nbgrader)

RESTORED: list[str] = []   # test cells RestoreTestCells put back in the notebook being graded
_CURRENT_CELL: list = []    # [index, cell] of the cell being executed (to say where a kernel died)


def _restore_test_cells_class():
    from nbgrader import utils
    from nbgrader.preprocessors import OverwriteCells
    from traitlets import Bool

    class RestoreTestCells(OverwriteCells):
        """nbgrader's OverwriteCells, changed in three ways:

        - a test cell the student deleted is put back (add_missing_cells defaults to True here), after the nearest
          earlier cell of the source that is still there, or at the end (nbgrader's own placement raises a
          KeyError when the cell before it was deleted too, failing the whole submission);
        - putting the hidden tests back into an untouched test cell is not reported as a changed checksum: the
          gradebook keeps the checksum of the source cell with its hidden tests, the release the one without them,
          so plain nbgrader warns for every test cell with hidden tests of every submission (jupyter/nbgrader#1961);
          a test cell the student edited is still reported;
        - what was put back is listed in minildm.grade.RESTORED.
        """

        add_missing_cells = Bool(True, help="Put deleted test cells back before grading.").tag(config=True)
        _untouched = False

        def preprocess_cell(self, cell, resources, cell_index):
            meta = cell.metadata.get("nbgrader", {})
            try:  # the checksum the release gave this cell still matches: the student did not touch it
                self._untouched = bool(meta.get("checksum")) and meta["checksum"] == utils.compute_checksum(cell)
            except (KeyError, TypeError, ValueError, AttributeError):  # malformed metadata: treat as edited
                self._untouched = False
            return super().preprocess_cell(cell, resources, cell_index)

        def report_change(self, name, attr, old, new):
            if attr == "checksum":
                if self._untouched:
                    self.log.debug("Putting the hidden tests back into cell %s", name)
                    return
                RESTORED.append(f"{name} (edited)")
            super().report_change(name, attr, old, new)

        def add_missing_grade_cells(self, nb, resources):
            source_nb = self.gradebook.find_notebook(self.notebook_id, self.assignment_id)
            order = [c.name for c in source_nb.source_cells]
            solutions = {c.name for c in source_nb.solution_cells}

            def grade_id(cell):
                return cell.metadata.get("nbgrader", {}).get("grade_id")

            for grade_cell in sorted(source_nb.grade_cells, key=lambda c: order.index(c.name)):
                present = [grade_id(c) for c in nb.cells]
                if grade_cell.name in present:
                    continue
                self.log.warning("Test cell %s was deleted; putting it back", grade_cell.name)
                source_cell = source_nb.source_cells[order.index(grade_cell.name)]
                new = self.missing_cell_transform(source_cell, grade_cell.max_score,
                                                  is_solution=grade_cell.name in solutions)
                if nb.get("nbformat", 4) > 4 or nb.get("nbformat_minor", 0) >= 5:
                    new["id"] = re.sub(r"[^A-Za-z0-9_-]", "-", f"restored-{grade_cell.name}")[:64]
                before = [n for n in order[:order.index(grade_cell.name)] if n in present]
                at = len(nb.cells) if not before else max(i for i, n in enumerate(present) if n == before[-1]) + 1
                nb.cells.insert(at, new)
                RESTORED.append(f"{grade_cell.name} (deleted)")
            return nb, resources

    return RestoreTestCells


def _hide_hidden_tests_class():
    from nbgrader.preprocessors import ClearHiddenTests

    class HideHiddenTests(ClearHiddenTests):
        """Feedback without the hidden tests: nbgrader's generate_feedback shows the autograded notebook, hidden tests
        included. This removes them (nbgrader's ClearHiddenTests), and cuts the traceback of an error in such a cell
        down to its last line (`ExerciseError: kl_divergence (...): ...`), since IPython's traceback quotes the
        lines around the one that failed. A marker in a student's own cell does not stop the feedback."""

        enforce_metadata = False

        def preprocess_cell(self, cell, resources, cell_index):
            had_hidden = cell.cell_type == "code" and self.begin_test_delimeter in cell.source
            cell, resources = super().preprocess_cell(cell, resources, cell_index)
            if had_hidden:
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "error":
                        output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
            return cell, resources

    return HideHiddenTests


def __getattr__(name: str):
    # These subclass nbgrader's classes: built on first use, so importing this module needs no nbgrader.
    builders = {"RestoreTestCells": _restore_test_cells_class, "HideHiddenTests": _hide_hidden_tests_class}
    if name in builders:
        cls = globals()[name] = builders[name]()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _remember_cell(cell, cell_index, **_):
    _CURRENT_CELL[:] = [cell_index, cell]


def _cell_label(index: int, cell) -> str:
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    return grade_id or f"cell {index + 1}"


def _error_text(output) -> str:
    """'ExerciseError: kl_divergence: ...' from an error output (evalue, else the traceback's last line)."""
    text = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}".strip()
    if not output.get("evalue") and output.get("traceback"):
        text = output["traceback"][-1]
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _classify(exc: BaseException, timeout: int) -> tuple[str, str]:
    """(status, detail) for an exception that stopped nbgrader on one notebook."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    cell = _cell_label(*_CURRENT_CELL) if _CURRENT_CELL else "a cell"
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if "DeadKernelError" in names:
        return KERNEL_DIED, (f"the kernel stopped while running {cell}: os._exit or exit() in a cell, a crash, "
                             "or out of memory")
    if "CellTimeoutError" in names:
        return TIMED_OUT, f"{cell} ran past {timeout} s and ignored the interrupt; nothing could be graded"
    if names & {"NotJSONError", "ValidationError", "JSONDecodeError", "SchemaTooOldError", "SchemaTooNewError",
                "MetadataValidationError", "UnicodeDecodeError"}:
        return INVALID, f"{type(exc).__name__}: {first_line}"
    return ERROR, f"nbgrader failed: {type(exc).__name__}: {first_line}"


class _Warnings(logging.Handler):
    """Keeps nbgrader's warnings about one notebook: a changed test cell, a missing cell, a late submission...
    (not its errors, which the status and traceback report, nor the 'Removing ...' of --force)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if record.levelno == logging.WARNING and not message.startswith(("Removing ", "Updating existing")):
            self.messages.append(message[:500])


def _helper() -> int:
    """Run in a subprocess by grade(): release the assignment into the gradebook, then autograde one student and one
    notebook at a time, printing one result line per notebook."""
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.load(sys.stdin)
    assignment, timeout = spec["assignment"], int(spec["timeout"])

    def emit(**msg):
        print(_MARK + json.dumps(msg), flush=True)

    from nbgrader.api import Gradebook, MissingEntry
    from nbgrader.converters import Autograde, GenerateAssignment
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.preprocessors import OverwriteCells
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader
    from traitlets.log import get_logger

    config = PyFileConfigLoader("nbgrader_config.py", path=os.getcwd()).load_config()
    overrides = Config()
    overrides.Execute.timeout = timeout
    overrides.Execute.on_cell_start = _remember_cell
    if spec.get("kernel"):  # the sandboxed kernel (minildm.sandbox): no network, so ZeroMQ over Unix sockets
        overrides.Execute.kernel_name = spec["kernel"]
        overrides.KernelManager.transport = "ipc"
        overrides.KernelManager.ip = os.environ["MINILDM_GRADE_IPC"]
    default = Autograde.class_traits()["sanitize_preprocessors"].default()
    overrides.Autograde.sanitize_preprocessors = [sys.modules[__name__].RestoreTestCells if p is OverwriteCells else p
                                                 for p in default]
    config.merge(overrides)

    def coursedir(**kw):
        return CourseDirectory(config=config, root=os.getcwd(), assignment_id=assignment, **kw)

    class Failing:
        failure: BaseException | None = None

        def init_assignment(self, assignment_id, student_id):
            try:
                super().init_assignment(assignment_id, student_id)
            except Exception as e:
                self.failure = self.failure or e
                raise

        def convert_single_notebook(self, notebook_filename):
            try:
                super().convert_single_notebook(notebook_filename)
            except Exception as e:
                self.failure = self.failure or e
                raise

    class Generate(Failing, GenerateAssignment):
        pass

    class Grade(Failing, Autograde):
        pass

    # Registering the assignment (notebooks, test cells, points, checksums) in the gradebook needs a release: made in
    # a scratch folder, so grading never rewrites the course's released exercises.
    with tempfile.TemporaryDirectory() as scratch:
        cd = coursedir()
        cd.release_directory = scratch
        app = Generate(coursedir=cd, config=config)
        app.force = True
        try:
            app.start()
        except Exception as e:  # noqa: BLE001 (reported: grading cannot start)
            exc = app.failure or e
            emit(kind="fatal", error=f"nbgrader generate_assignment {assignment} failed: "
                                     + "".join(traceback.format_exception(exc))[-2000:])
            return 1

    def clear_grades(student, notebook):
        """A notebook that was not graded must not keep the score of an earlier run."""
        cd = coursedir()
        try:
            with Gradebook(cd.db_url, cd.course_id) as gb:
                submission = gb.find_submission_notebook(notebook, assignment, student)
                for g in submission.grades:
                    g.auto_score, g.needs_manual_grade = None, True
                gb.db.commit()
        except MissingEntry:
            pass

    def grade_one(student, notebook):
        cd = coursedir(student_id=student, notebook_id=notebook)
        app = Grade(coursedir=cd, config=config)
        app.force = True
        app.create_student = True
        result = {"status": GRADED, "graded": True, "detail": "", "traceback": "", "points": {}, "messages": {},
                  "timed_out": []}
        try:
            app.start()
        except Exception as e:  # noqa: BLE001 (nbgrader stops on a notebook in many ways; the report says which)
            exc = app.failure or e
            status, detail = _classify(exc, timeout)
            result.update(status=status, graded=False, detail=detail,
                          traceback="".join(traceback.format_exception(exc))[-3000:])
            clear_grades(student, notebook)
            return result
        with Gradebook(cd.db_url, cd.course_id) as gb:
            for g in gb.find_submission_notebook(notebook, assignment, student).grades:
                unscored = g.auto_score is None and g.manual_score is None
                result["points"][g.name] = None if unscored else float(g.score)
        path = Path(cd.format_path(cd.autograded_directory, student, assignment)) / f"{notebook}.ipynb"
        for index, cell in enumerate(json.loads(path.read_text())["cells"]):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if any(o.get("ename") == "CellTimeoutError" for o in errors):
                result["timed_out"].append(_cell_label(index, cell))
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("grade") and errors:
                result["messages"][meta["grade_id"]] = _error_text(errors[0])
        if result["timed_out"]:
            result.update(status=TIMED_OUT, detail=f"cut off after {timeout} s, the rest graded")
        return result

    logger = get_logger()  # where nbgrader's converters and preprocessors log (they have no parent application)
    for student, notebook in spec["jobs"]:
        RESTORED.clear()
        _CURRENT_CELL.clear()
        start = time.monotonic()
        warned = _Warnings()
        logger.addHandler(warned)
        try:
            result = grade_one(student, notebook)
        except Exception as e:  # noqa: BLE001 (reading the results failed: a grading failure, the rest goes on)
            result = {"status": ERROR, "graded": False, "detail": f"reading nbgrader's results failed: {e}",
                      "traceback": traceback.format_exc()[-3000:], "points": {}, "messages": {}, "timed_out": []}
        finally:
            logger.removeHandler(warned)
        emit(kind="job", student=student, notebook=notebook, seconds=round(time.monotonic() - start, 2),
             restored=list(RESTORED), warnings=warned.messages, **result)
    for student, notebook in spec["clear"]:
        clear_grades(student, notebook)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--helper"]:
        from minildm.grade import _helper  # the module's own objects, not __main__'s copies

        sys.exit(_helper())
    sys.exit("usage: minildm grade ASSIGNMENT (this module's --helper is started by it)")
