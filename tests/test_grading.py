"""`minildm grade`: a report an instructor can trust, whatever the students submitted.

One module-scoped course is graded once (about two minutes on 2 cores, nbgrader and a kernel per notebook) with
crafted submissions of ex02-autoencoder: the solution, the untouched release, cells that raise, an edited and
deleted test cells, a loop the kernel interrupt stops and one it cannot stop, a kernel that dies, a file that is not
JSON, a renamed file, a folder without the notebook, answers imported from the package, replaced checkers, and, where
the bubblewrap sandbox runs, submissions that read the solutions, write the gradebook and another student's files,
reach the network, and replace torch functions. Then the same course again with most folders removed.

Where bwrap cannot run the attacking submissions are left out and their tests skip with the reason (without the
sandbox they would succeed); MINILDM_REQUIRE_SANDBOX=1 (set by CI) turns that skip into a failure.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from minildm.grade import (
    GRADED,
    INVALID,
    KERNEL_DIED,
    MISSING,
    TIMED_OUT,
    NotebookResult,
    Report,
    StudentResult,
    Task,
    match_notebooks,
)

pytest.importorskip("nbgrader")

from minildm.sandbox import probe

NO_SANDBOX = probe()  # '' where bwrap runs here
if NO_SANDBOX and os.environ.get("MINILDM_REQUIRE_SANDBOX"):
    raise RuntimeError(f"MINILDM_REQUIRE_SANDBOX is set but the grading sandbox cannot run: {NO_SANDBOX}")
needs_sandbox = pytest.mark.skipif(bool(NO_SANDBOX), reason=f"grading sandbox unavailable: {NO_SANDBOX}")

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "ex02-autoencoder"
NOTEBOOK = "autoencoder.ipynb"
# seconds a cell may run: the loops cost this much, the slowest real cell (import torch) needs ~5 on 2 idle cores;
# raise it on a busy machine, where the imports alone can take longer (MINILDM_GRADE_TEST_TIMEOUT=40)
TIMEOUT = int(os.environ.get("MINILDM_GRADE_TEST_TIMEOUT", "10"))
TASKS = ["test_reparameterize", "test_kl_divergence", "test_nearest_code", "test_straight_through"]


def _run(argv) -> tuple[int, str, str]:
    from minildm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _course(path: Path) -> Path:
    for folder in ("solutions", "exercises"):
        shutil.copytree(ROOT / folder, path / folder)
    shutil.copy(ROOT / "nbgrader_config.py", path)
    return path


def _cell(nb: dict, grade_id: str) -> dict:
    return next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)


def _without(nb: dict, *grade_ids: str) -> dict:
    nb["cells"] = [c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") not in grade_ids]
    return nb


ATTACKERS = ["oscar", "peggy", "rita", "sam"]
# oscar copies the hidden tests' source: the solution of each answer cell, read from the course's solutions/
STEAL = """import json, pathlib
source = pathlib.Path.cwd().parents[2] / "solutions" / "ex02-autoencoder" / "autoencoder.ipynb"
for c in json.loads(source.read_text())["cells"]:
    if c["metadata"].get("nbgrader", {}).get("grade_id") == GRADE_ID:
        exec("".join(c["source"]))
"""
# peggy solves everything, then tries to wreck the gradebook, another student's files and the hidden tests
WRECK = """
import pathlib, shutil
course = pathlib.Path.cwd().parents[2]
for target in [course / "gradebook.db", course / "submitted" / "alice" / "ex02-autoencoder" / "autoencoder.ipynb",
               course / "autograded" / "alice" / "ex02-autoencoder" / "autoencoder.ipynb"]:
    try:
        target.write_bytes(b"peggy was here")
        print("wrote", target)
    except OSError as e:
        print("refused", target, type(e).__name__)
shutil.rmtree(course / "solutions", ignore_errors=True)
"""
# rita solves everything, then tries to reach the grader's machine (a listener of this test) and the internet
REACH = """
import socket
for host, port in [("127.0.0.1", PORT), ("pypi.org", 443)]:
    try:
        socket.create_connection((host, port), timeout=3).sendall(b"rita was here")
        print("reached", host)
    except OSError as e:
        print("no network:", host, type(e).__name__)
"""


def _submissions(course: Path, port: int) -> None:
    released = json.loads((course / "exercises" / ASSIGNMENT / NOTEBOOK).read_text())
    solution = json.loads((course / "solutions" / ASSIGNMENT / NOTEBOOK).read_text())

    def solved() -> dict:  # the release with the solution code typed in, as a student would
        nb = json.loads(json.dumps(released))
        for cell in nb["cells"]:
            meta = cell["metadata"].get("nbgrader", {})
            if meta.get("solution"):  # a string: `+=` below appends code, not characters to a shared list
                cell["source"] = "".join(_cell(solution, meta["grade_id"])["source"])
        return nb

    def put(student: str, nb: dict | str, name: str = NOTEBOOK) -> None:
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(nb if isinstance(nb, str) else json.dumps(nb, indent=1))

    put("alice", solved())
    put("bob", released)
    # carol: a solution cell that raises after defining its function (the rest still runs), a wrong KL, and a
    # test cell replaced with `pass` above a wrong straight-through
    nb = solved()
    _cell(nb, "reparameterize")["source"] += "\nraise RuntimeError('carol was here')\n"
    _cell(nb, "kl_divergence")["source"] = "def kl_divergence(mean, logvar):\n    return mean.sum()\n"
    _cell(nb, "straight_through")["source"] = "def straight_through(z, z_q):\n    return z_q\n"
    _cell(nb, "test_straight_through")["source"] = "pass\n"
    put("carol", nb)
    nb = solved()
    _cell(nb, "nearest_code")["source"] = "while True:\n    pass\n"
    put("dave", nb)
    nb = solved()
    _cell(nb, "kl_divergence")["source"] = "import os\nos._exit(0)\n"
    put("erin", nb)
    put("frank", '{"cells": [ this is not JSON')
    put("grace", solved(), name="autoencoder (1).ipynb")
    # heidi: deletes the KL test (her KL is wrong), and both the nearest-code solution and its test
    nb = _without(solved(), "test_kl_divergence", "nearest_code", "test_nearest_code")
    _cell(nb, "kl_divergence")["source"] = "def kl_divergence(mean, logvar):\n    return mean.sum()\n"
    put("heidi", nb)
    nb = solved()
    _cell(nb, "nearest_code")["source"] = ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                           "while True:\n    pass\n")
    put("kim", nb)
    put("mallory", solved(), name="notes.ipynb")
    put("mallory", solved(), name="scratch.ipynb")
    # ivan takes three answers from the package (an import, a wrapper, the checkers' own reference) and writes one
    nb = solved()
    _cell(nb, "reparameterize")["source"] = "from minildm.regularizers import reparameterize\n"
    _cell(nb, "kl_divergence")["source"] = ("from minildm import regularizers\n\n\ndef kl_divergence(mean, logvar):\n"
                                            "    return regularizers.kl_divergence(mean, logvar)\n")
    _cell(nb, "nearest_code")["source"] = "nearest_code = checks.ref.nearest_code\n"
    put("ivan", nb)
    # judy: a wrong KL that passes the hidden asserts, and every checker (and the guard) replaced by a no-op
    nb = solved()
    _cell(nb, "reparameterize")["source"] += ("\nimport minildm.checks\n\nminildm.checks.written_here = lambda fn, name: None\n"
                                              "for _name in dir(checks):\n    if _name.startswith('check_'):\n"
                                              "        setattr(checks, _name, lambda fn: None)\n")
    _cell(nb, "kl_divergence")["source"] = ("def kl_divergence(mean, logvar):\n"
                                            "    return 0.5 * (mean**2).sum(dim=(1, 2, 3))\n")
    put("judy", nb)
    if NO_SANDBOX:
        return
    nb = json.loads(json.dumps(released))
    for cell in nb["cells"]:
        if cell["metadata"].get("nbgrader", {}).get("solution"):
            cell["source"] = f"GRADE_ID = {cell['metadata']['nbgrader']['grade_id']!r}\n" + STEAL
    put("oscar", nb)
    nb = solved()
    _cell(nb, "reparameterize")["source"] += WRECK
    put("peggy", nb)
    nb = solved()
    _cell(nb, "reparameterize")["source"] += REACH.replace("PORT", str(port))
    put("rita", nb)
    # sam: every answer right, then what the checkers compare with is made to agree with anything
    nb = solved()
    _cell(nb, "reparameterize")["source"] += "\ntorch.allclose = lambda *args, **kwargs: True\n"
    put("sam", nb)


def _outputs(path: Path) -> str:
    """What the cells of an autograded notebook printed, and the names of the errors they raised."""
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(o.get("text", "")) + o.get("ename", "") + "\n"
                   for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))


class Listener:
    """A TCP server on the grader's loopback that records what connects to it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.received = self.sock.getsockname()[1], []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.received.append(conn.recv(100))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    course = _course(tmp_path_factory.mktemp("course"))
    listener = Listener()
    _submissions(course, listener.port)
    before = {p: p.read_bytes() for p in (course / "submitted").rglob("*.ipynb")
              if p.parts[-3] != "grace"}  # hers is renamed by grading
    start = time.monotonic()
    rc, out, err = _run(["grade", ASSIGNMENT, "--course", str(course), "--timeout", str(TIMEOUT),
                         "--csv", str(course / "grades.csv"), "--json", str(course / "grades.json")])
    seconds = time.monotonic() - start
    listener.sock.close()
    changed = sorted(str(p.relative_to(course)) for p, data in before.items()
                     if not p.is_file() or p.read_bytes() != data)
    outputs = {p.parts[-3]: _outputs(p) for p in (course / "autograded").glob(f"*/{ASSIGNMENT}/{NOTEBOOK}")}
    solutions = sorted(str(p.relative_to(course)) for p in (course / "solutions").rglob("*.ipynb"))
    report = json.loads((course / "grades.json").read_text())
    with (course / "grades.csv").open() as f:
        rows = list(csv.DictReader(f))
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "minildm") as gb:
        auto = {s.student_id: [g.auto_score for nb in s.notebooks for g in nb.grades]
                for s in gb.assignment_submissions(ASSIGNMENT)}
    grace = sorted(p.name for p in (course / "submitted" / "grace" / ASSIGNMENT).iterdir())
    # the course again, most folders gone and alice's notebook replaced by a broken one
    for folder in (course / "submitted").iterdir():
        if folder.name not in ("alice", "frank"):
            shutil.rmtree(folder)
    (course / "submitted" / "alice" / ASSIGNMENT / NOTEBOOK).write_text("")
    rc2, out2, err2 = _run(["grade", ASSIGNMENT, "--course", str(course), "--json", str(course / "again.json")])
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "minildm") as gb:
        auto2 = {s.student_id: [g.auto_score for nb in s.notebooks for g in nb.grades]
                 for s in gb.assignment_submissions(ASSIGNMENT)}
    print(out, f"\n(first run {seconds:.0f} s)")
    return {"course": course, "rc": rc, "out": out, "err": err, "json": report, "csv": rows, "auto": auto,
            "received": listener.received, "changed": changed, "outputs": outputs, "solutions": solutions,
            "rc2": rc2, "out2": out2, "err2": err2, "json2": json.loads((course / "again.json").read_text()),
            "auto2": auto2, "seconds": seconds, "grace": grace}


def _table(out: str) -> dict[str, str]:
    lines = out.splitlines()
    head = max(i for i, line in enumerate(lines) if line.split()[:2] == ["student", "status"])
    return {line.split()[0]: line for line in lines[head + 1:]}


def _student(report: dict, name: str) -> dict:
    return next(s for s in report["students"] if s["student"] == name)


def _points(report: dict, name: str) -> list:
    nb = _student(report, name)["notebooks"][0]
    return [nb["tasks"][t]["points"] for t in TASKS]


def _marks(row: str) -> list[str]:
    return row.split()[-5:]


EXPECTED = {  # student: (status, graded, points per task or None, marks in the table)
    "alice": (GRADED, True, [2, 2, 2, 2], ["2/2", "2/2", "2/2", "2/2", "8/8"]),
    "bob": (GRADED, True, [0, 0, 0, 0], ["0/2", "0/2", "0/2", "0/2", "0/8"]),
    "carol": (GRADED, True, [2, 0, 2, 0], ["2/2", "0/2", "2/2", "0/2", "4/8"]),
    "dave": (TIMED_OUT, True, [2, 2, 0, 2], ["2/2", "2/2", "0/2", "2/2", "6/8"]),
    "erin": (KERNEL_DIED, False, None, ["-", "-", "-", "-", "-"]),
    "frank": (INVALID, False, None, ["-", "-", "-", "-", "-"]),
    "grace": (GRADED, True, [2, 2, 2, 2], ["2/2", "2/2", "2/2", "2/2", "8/8"]),
    "heidi": (GRADED, True, [2, 0, 0, 2], ["2/2", "0/2", "0/2", "2/2", "4/8"]),
    "ivan": (GRADED, True, [0, 0, 0, 2], ["0/2", "0/2", "0/2", "2/2", "2/8"]),
    "judy": (GRADED, True, [2, 0, 2, 2], ["2/2", "0/2", "2/2", "2/2", "6/8"]),
    "kim": (TIMED_OUT, False, None, ["-", "-", "-", "-", "-"]),
    "mallory": (MISSING, False, None, ["-", "-", "-", "-", "-"]),
    "oscar": (GRADED, True, [0, 0, 0, 0], ["0/2", "0/2", "0/2", "0/2", "0/8"]),
    "peggy": (GRADED, True, [2, 2, 2, 2], ["2/2", "2/2", "2/2", "2/2", "8/8"]),
    "rita": (GRADED, True, [2, 2, 2, 2], ["2/2", "2/2", "2/2", "2/2", "8/8"]),
    "sam": (GRADED, True, [0, 0, 0, 0], ["0/2", "0/2", "0/2", "0/2", "0/8"]),
}
if NO_SANDBOX:
    EXPECTED = {k: v for k, v in EXPECTED.items() if k not in ATTACKERS}


def test_bad_notebooks_do_not_fail_the_command_and_every_student_has_a_row(graded):
    assert graded["rc"] == 0, graded["err"]
    assert graded["err"] == ""
    table = _table(graded["out"])
    assert sorted(table) == sorted(EXPECTED), graded["out"]
    assert [s["student"] for s in graded["json"]["students"]] == sorted(EXPECTED)
    assert graded["json"]["failures"] == []
    assert graded["seconds"] < 300 + 4 * (TIMEOUT - 10)


@pytest.mark.parametrize("student", sorted(EXPECTED))
def test_each_row_has_its_status_and_points(graded, student):
    status, is_graded, points, marks = EXPECTED[student]
    row, entry = _table(graded["out"])[student], _student(graded["json"], student)
    assert _marks(row) == marks, row
    assert (entry["status"], entry["graded"]) == (status, is_graded)
    assert _points(graded["json"], student) == (points or [None] * 4)
    assert entry["points"] == (sum(points) if points else None) and entry["max_points"] == 8
    # "not graded (why)" and a score of 0 never look alike
    assert ("not graded: " + status in row) == (not is_graded), row
    seconds = entry["notebooks"][0]["seconds"]
    if status in (INVALID, MISSING):  # found out before nbgrader ran
        assert seconds is None
    else:  # grading time per notebook
        assert seconds > 0 and f"{seconds:.1f} s" in row


def test_the_checkers_messages_are_reported(graded):
    report = graded["json"]
    for task in TASKS:
        assert "not implemented yet" in _student(report, "bob")["notebooks"][0]["tasks"][task]["message"]
        assert _student(report, "alice")["notebooks"][0]["tasks"][task]["message"] is None
    carol = _student(report, "carol")["notebooks"][0]["tasks"]
    assert carol["test_kl_divergence"]["message"].startswith("ExerciseError: kl_divergence")
    assert carol["test_reparameterize"]["message"] is None  # the cell raised after defining the function
    assert carol["test_straight_through"]["message"]  # the test ran, not the student's `pass`
    rows = {(r["student"], r["task"]): r for r in graded["csv"]}
    assert len(rows) == len(EXPECTED) * len(TASKS)
    assert rows["carol", "test_kl_divergence"]["message"] == carol["test_kl_divergence"]["message"]
    assert rows["carol", "test_kl_divergence"]["points"] == "0"
    assert rows["alice", "test_kl_divergence"]["points"] == "2" and rows["alice", "test_kl_divergence"]["message"] == ""
    assert rows["erin", "test_kl_divergence"]["points"] == "" and rows["erin", "test_kl_divergence"]["status"] == KERNEL_DIED


def test_answers_from_the_package_and_replaced_checkers_score_nothing(graded):
    """Issue 14: the package's reference answers do not count, and the hidden part of each test cell calls freshly
    reloaded checkers, which an answer cell cannot have replaced."""
    ivan = _student(graded["json"], "ivan")["notebooks"][0]["tasks"]
    assert "expected your own function" in ivan["test_reparameterize"]["message"]
    assert "from the minildm package" in ivan["test_kl_divergence"]["message"]
    assert "expected your own function" in ivan["test_nearest_code"]["message"]
    judy = _student(graded["json"], "judy")["notebooks"][0]["tasks"]
    assert judy["test_kl_divergence"]["message"].startswith("ExerciseError: kl_divergence")


@needs_sandbox
def test_the_kernel_cannot_read_the_solutions(graded):
    """oscar's answer cells exec the solution cells of solutions/: the sandbox shows no course folder."""
    assert "isolation: bubblewrap" in graded["out"] and graded["json"]["isolation"].startswith("bubblewrap")
    oscar = _student(graded["json"], "oscar")["notebooks"][0]["tasks"]
    assert "reparameterize" in oscar["test_reparameterize"]["message"]  # NameError: nothing was defined
    assert "FileNotFoundError" in graded["outputs"]["oscar"]


@needs_sandbox
def test_the_kernel_cannot_write_the_gradebook_or_other_students_files(graded):
    assert graded["changed"] == []  # every submitted notebook as it was, alice's included
    assert graded["auto"]["alice"] == [2.0] * 4 and graded["auto"]["peggy"] == [2.0] * 4  # the gradebook is whole
    assert len(graded["solutions"]) == len(list((ROOT / "solutions").rglob("*.ipynb")))  # rmtree did nothing
    peggy = graded["outputs"]["peggy"]
    # her write to the gradebook's path may land in the sandbox's own /tmp (this test's course lies in /tmp): the
    # gradebook itself is whole (above); alice's folders are not even there
    course = graded["course"]
    assert f"refused {course}/submitted/alice/{ASSIGNMENT}/{NOTEBOOK} FileNotFoundError" in peggy, peggy
    assert f"refused {course}/autograded/alice/{ASSIGNMENT}/{NOTEBOOK} FileNotFoundError" in peggy, peggy


@needs_sandbox
def test_the_kernel_cannot_reach_the_network(graded):
    assert graded["received"] == []  # the listener on the grader's loopback heard nothing
    rita = graded["outputs"]["rita"]
    assert "no network: 127.0.0.1" in rita and "no network: pypi.org" in rita and "reached" not in rita


@needs_sandbox
def test_replaced_torch_functions_make_every_check_fail(graded):
    sam = _student(graded["json"], "sam")["notebooks"][0]["tasks"]
    assert all("torch.allclose was replaced" in sam[t]["message"] for t in TASKS)


def test_edited_and_deleted_test_cells_are_put_back_and_run(graded):
    report = graded["json"]
    carol = _student(report, "carol")["notebooks"][0]
    assert carol["restored"] == ["test_straight_through (edited)"]
    heidi = _student(report, "heidi")["notebooks"][0]
    assert heidi["restored"] == ["test_kl_divergence (deleted)", "test_nearest_code (deleted)"]
    assert heidi["tasks"]["test_kl_divergence"]["message"].startswith("ExerciseError: kl_divergence")
    assert "nearest_code" in heidi["tasks"]["test_nearest_code"]["message"]  # NameError: her function is gone
    assert "heidi: autoencoder.ipynb: test cells put back as released: test_kl_divergence (deleted)" in graded["out"]


def test_untouched_submissions_log_no_checksum_warnings(graded):
    report = graded["json"]
    for student in ("alice", "bob", "grace", "dave"):
        assert not any("checksum" in w for w in _student(report, student)["notebooks"][0]["warnings"]), student
    assert any("checksum" in w and "test_straight_through" in w
               for w in _student(report, "carol")["notebooks"][0]["warnings"])


def test_timeouts_kernel_deaths_and_broken_files_say_what_happened(graded):
    report, out = graded["json"], graded["out"]
    dave = _student(report, "dave")["notebooks"][0]
    assert dave["timed_out"] == ["nearest_code"] and dave["seconds"] >= TIMEOUT
    assert "graded, timed out: nearest_code" in _table(out)["dave"]
    kim = _student(report, "kim")["notebooks"][0]
    assert "ignored the interrupt" in kim["detail"] and "nearest_code" in kim["detail"]
    erin = _student(report, "erin")["notebooks"][0]
    assert "kl_divergence" in erin["detail"] and "os._exit" in erin["detail"]
    frank = _student(report, "frank")["notebooks"][0]
    assert frank["detail"].startswith("not valid JSON")
    mallory = _student(report, "mallory")
    assert mallory["notes"] == [f"ignored '{n}' (not graded: an older copy, or not a notebook of this assignment)"
                                for n in ("notes.ipynb", "scratch.ipynb")]
    # the gradebook keeps no score for what was not graded (nbgrader never saw frank or mallory)
    assert graded["auto"]["erin"] == [None] * 4 and graded["auto"]["kim"] == [None] * 4
    assert graded["auto"]["alice"] == [2.0] * 4 and "frank" not in graded["auto"]


def test_a_renamed_file_is_renamed_and_graded(graded):
    grace = _student(graded["json"], "grace")["notebooks"][0]
    assert grace["renamed_from"] == "autoencoder (1).ipynb" and grace["file"] == NOTEBOOK
    assert "grace: renamed 'autoencoder (1).ipynb' -> 'autoencoder.ipynb' before grading" in graded["out"]
    assert graded["grace"] == [NOTEBOOK]


def test_grading_never_rewrites_the_released_exercises(graded):
    released = graded["course"] / "exercises" / ASSIGNMENT / NOTEBOOK
    assert released.read_text() == (ROOT / "exercises" / ASSIGNMENT / NOTEBOOK).read_text()


def test_removed_students_disappear_and_old_scores_are_cleared(graded):
    assert graded["rc2"] == 0, graded["err2"]
    assert sorted(_table(graded["out2"])) == ["alice", "frank"]
    alice = _student(graded["json2"], "alice")
    assert alice["status"] == INVALID and alice["points"] is None
    assert graded["auto2"]["alice"] == [None] * 4  # her 8/8 of the first run is not shown as a grade any more
    assert graded["auto2"]["bob"] == [0.0] * 4  # the gradebook keeps removed students; the report does not show them


def test_a_grading_failure_exits_non_zero_and_still_prints_the_table(tmp_path):
    course = _course(tmp_path)
    folder = course / "submitted" / "alice" / ASSIGNMENT
    folder.mkdir(parents=True)
    shutil.copy(course / "exercises" / ASSIGNMENT / NOTEBOOK, folder)
    (course / "gradebook.db").write_bytes(b"this is not a database" * 100)
    rc, out, err = _run(["grade", ASSIGNMENT, "--course", str(course)])
    assert rc == 1
    assert "generate_assignment" in err
    assert "not graded: error" in _table(out)["alice"]


def _folder(tmp_path: Path, *names: str) -> Path:
    for i, name in enumerate(names):
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))  # later names are newer
    return tmp_path


@pytest.mark.parametrize("name", ["autoencoder (1).ipynb", "autoencoder-2.ipynb", "autoencoder_3.ipynb",
                                  "Copy of autoencoder.ipynb", "Autoencoder.ipynb", "autoencoder - Copy.ipynb",
                                  "Copy of autoencoder (2).ipynb", "my answers.ipynb"])
def test_lms_renamed_copies_are_matched(tmp_path, name):
    found, renamed, notes = match_notebooks(_folder(tmp_path, name), ["autoencoder"])
    assert found == {"autoencoder": tmp_path / NOTEBOOK} and renamed == {"autoencoder": name} and notes == []
    assert [p.name for p in tmp_path.iterdir()] == [NOTEBOOK]


def test_matching_takes_the_exact_name_else_the_newest_copy(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    found, renamed, notes = match_notebooks(_folder(a, "autoencoder.ipynb", "autoencoder (1).ipynb"), ["autoencoder"])
    assert found["autoencoder"] == a / NOTEBOOK and renamed == {} and len(notes) == 1 and "autoencoder (1)" in notes[0]
    found, renamed, notes = match_notebooks(_folder(b, "autoencoder (1).ipynb", "autoencoder (2).ipynb"),
                                            ["autoencoder"])
    assert renamed == {"autoencoder": "autoencoder (2).ipynb"} and "autoencoder (1).ipynb" in notes[0]


def test_matching_with_several_notebooks_needs_the_name(tmp_path):
    found, renamed, notes = match_notebooks(_folder(tmp_path, "part-1 (1).ipynb", "other.ipynb"),
                                            ["part-1", "part-2"])
    assert found == {"part-1": tmp_path / "part-1.ipynb", "part-2": None}
    assert renamed == {"part-1": "part-1 (1).ipynb"} and "other.ipynb" in notes[0]


def test_the_table_tells_not_graded_from_zero():
    tasks = [Task("nb", "t1", 1.0), Task("nb", "t2", 2.0)]
    zero = NotebookResult("nb", GRADED, True, points={"t1": 0.0, "t2": 0.0}, seconds=1.0)
    died = NotebookResult("nb", KERNEL_DIED, False, detail="the kernel stopped", seconds=2.0)
    manual = NotebookResult("nb", GRADED, True, points={"t1": 1.0, "t2": None}, seconds=1.0)
    report = Report("ex", 30, tasks, [StudentResult("ann", [zero]), StudentResult("ben", [died]),
                                      StudentResult("cy", [manual])])
    rows = _table(report.table())
    assert rows["ann"].split()[-3:] == ["0/1", "0/2", "0/3"] and "graded" in rows["ann"]
    assert rows["ben"].split()[-3:] == ["-", "-", "-"] and "not graded: kernel died" in rows["ben"]
    assert rows["cy"].split()[-3:] == ["1/1", "?/2", "1/3"]  # a cell waiting for manual grading
    assert report.to_dict()["students"][1]["points"] is None


def test_the_course_config_names_the_course_and_restores_test_cells():
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import OverwriteCells
    from traitlets.config.loader import PyFileConfigLoader
    from traitlets.utils.importstring import import_item

    from minildm.grade import RestoreTestCells

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert config.CourseDirectory.course_id == "minildm"  # release_assignment and collect refuse to run without
    assert config.OverwriteCells.add_missing_cells is True
    # plain `nbgrader autograde` runs nbgrader's own sanitizing steps, with RestoreTestCells for OverwriteCells
    defaults = Autograde.class_traits()["sanitize_preprocessors"].default()
    assert [import_item(name) for name in config.Autograde.sanitize_preprocessors] == [
        RestoreTestCells if cls is OverwriteCells else cls for cls in defaults]
    assert issubclass(RestoreTestCells, OverwriteCells)


def test_nbgrader_release_fetch_submit_collect_then_grade(tmp_path, monkeypatch):
    """The whole course round trip through nbgrader's exchange, then `minildm grade` on what was collected: the
    instructor releases ex03, a student fetches it, solves it (the solution code typed into the release's answer
    cells) and submits; the instructor collects and grades, and the student scores full marks."""
    import getpass
    import subprocess
    import sys

    course, student, exchange = _course(tmp_path / "course"), tmp_path / "student", tmp_path / "exchange"
    student.mkdir()
    exchange.mkdir(mode=0o777)
    assignment, notebook = "ex03-schedules", "schedules.ipynb"
    bin_dir = str(Path(sys.executable).parent)  # nbgrader and alembic live beside this Python
    # nbgrader_config.py imports minildm.grade: this checkout's, as `minildm grade` gives its helper (grade._env)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    monkeypatch.setenv("PATH", env["PATH"])
    flag = f"--Exchange.root={exchange}"

    def nbgrader(*args, cwd):
        result = subprocess.run([sys.executable, "-m", "nbgrader", *args, flag], cwd=cwd, env=env, check=False,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"nbgrader {args[0]}: {result.stderr[-2000:]}"

    nbgrader("generate_assignment", assignment, "--force", cwd=course)
    nbgrader("release_assignment", assignment, cwd=course)
    nbgrader("fetch_assignment", assignment, "--course", "minildm", cwd=student)
    fetched = student / assignment / notebook
    nb = json.loads(fetched.read_text())
    solution = json.loads((course / "solutions" / assignment / notebook).read_text())
    for cell in nb["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if meta.get("solution"):
            cell["source"] = _cell(solution, meta["grade_id"])["source"]
    fetched.write_text(json.dumps(nb))
    nbgrader("submit", assignment, "--course", "minildm", cwd=student)
    nbgrader("collect", assignment, cwd=course)
    name = getpass.getuser()
    assert (course / "submitted" / name / assignment / notebook).is_file()
    monkeypatch.chdir(course)
    rc, out, err = _run(["grade", assignment, "--timeout", "60"])
    assert rc == 0, err
    row = _table(out)[name]
    assert "graded" in row and "8/8" in row, out


def test_feedback_shows_the_visible_tests_and_messages_never_the_hidden_tests():
    """nbgrader generate_feedback renders the autograded notebook: through HideHiddenTests (nbgrader_config.py), the
    hidden tests' code and the traceback lines that quote it are gone, the visible check and the message stay."""
    import nbformat
    from traitlets.config.loader import PyFileConfigLoader
    from traitlets.utils.importstring import import_item

    from minildm.grade import HideHiddenTests

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert HideHiddenTests in [import_item(p) for p in config.GenerateFeedback.preprocessors]
    nb = nbformat.read(ROOT / "solutions" / ASSIGNMENT / NOTEBOOK, as_version=4)
    cell = _cell(nb, "test_kl_divergence")
    hidden = cell.source.split("### BEGIN HIDDEN TESTS")[1]
    assert "_importlib.reload" in hidden
    message = "kl_divergence (mean 0, logvar 0): values are off"
    cell.outputs = [nbformat.v4.new_output("error", ename="ExerciseError", evalue=message, traceback=[
        "---------", "Cell In[7], line 6", "----> 6 _importlib.reload(_stage).check_kl_divergence(kl_divergence)",
        f"ExerciseError: {message}"])]
    nb, _ = HideHiddenTests().preprocess(nb, {})
    cell = _cell(nb, "test_kl_divergence")
    assert cell.source.strip() == "checks.check_kl_divergence(kl_divergence)"
    assert cell.outputs[0]["traceback"] == [f"ExerciseError: {message}"]
    assert "HIDDEN" not in json.dumps(nb) and "_importlib" not in json.dumps(nb)
