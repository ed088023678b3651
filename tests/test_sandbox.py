"""The grading sandbox (minildm/sandbox.py): what a student's kernel sees, and what grading does where bwrap cannot run.

The attacks through nbgrader (a submission reading solutions/, writing the gradebook, reaching the network) are in
test_grading.py; here the sandbox's command runs a plain Python snippet, about a second a test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minildm import sandbox

NO_SANDBOX = sandbox.probe()
needs_sandbox = pytest.mark.skipif(bool(NO_SANDBOX), reason=f"grading sandbox unavailable: {NO_SANDBOX}")
ROOT = Path(__file__).resolve().parents[1]


def test_the_kernel_reads_the_package_folder_never_the_checkout_around_it(tmp_path):
    paths = sandbox.python_paths([tmp_path])
    assert sandbox.package_folder() in paths
    assert ROOT not in paths and tmp_path not in paths  # the checkout holds solutions/ and tests/
    assert not any(p in ROOT.parents or p == ROOT for p in paths)
    assert Path(sys.base_prefix).resolve() in paths or any(p in Path(sys.base_prefix).resolve().parents for p in paths)


def test_a_course_inside_a_folder_the_kernel_needs_is_refused(tmp_path, monkeypatch):
    course = tmp_path / "env" / "course"
    course.mkdir(parents=True)
    monkeypatch.setattr(sandbox, "python_paths", lambda private=(): [tmp_path / "env"])
    assert sandbox.exposed([tmp_path / "env"], [course]) == [f"{tmp_path / 'env'} (holds {course})"]
    with pytest.raises(sandbox.SandboxError, match="would show the course folder.*Move the course folder"):
        sandbox.kernelspec(tmp_path / "spec", tmp_path / "rt", [course])


def test_without_bwrap_the_probe_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "bwrap is not installed" in sandbox.probe() and "apt-get install bubblewrap" in sandbox.probe()


def test_the_kernel_spec_starts_the_launcher(tmp_path):
    spec = json.loads(sandbox.kernelspec(tmp_path / "jupyter", tmp_path / "rt", [tmp_path / "course"]).read_text())
    assert spec["argv"][2:] == [str(Path(sandbox.__file__).resolve()),
                                str(tmp_path / "jupyter" / "kernels" / sandbox.KERNEL_NAME / "spec.json"),
                                "{connection_file}"]
    assert spec["argv"][1] == "-I"  # the launcher runs isolated from PYTHONPATH: standard library only


def _in_sandbox(tmp_path: Path, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    work, copy, runtime = tmp_path / "course" / "submitted" / "ann", tmp_path / "copy", tmp_path / "rt"
    for p in (work, copy, runtime):
        p.mkdir(parents=True, exist_ok=True)
    (work / "mine.txt").write_text("the original")
    shutil.copytree(work, copy, dirs_exist_ok=True)
    ro = [str(p) for p in sandbox.python_paths([tmp_path / "course"])]
    cmd = sandbox.bwrap_command(work, copy, runtime, [sys.executable, "-c", code], ro, env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@needs_sandbox
def test_the_sandbox_shows_a_copy_of_the_notebook_folder_and_nothing_of_the_course(tmp_path):
    (tmp_path / "course" / "solutions").mkdir(parents=True)
    (tmp_path / "course" / "solutions" / "answers.txt").write_text("hidden tests")
    (tmp_path / "course" / "gradebook.db").write_text("grades")
    code = f"""
import os, pathlib
course = pathlib.Path({str(tmp_path / "course")!r})
print(sorted(os.listdir(course)), sorted(os.listdir(course / "submitted")))
print(pathlib.Path("mine.txt").read_text())
pathlib.Path("mine.txt").write_text("changed")
for target in (course / "gradebook.db", pathlib.Path({str(ROOT / "README.md")!r})):
    try:
        target.write_text("x")
        print("wrote", target)
    except OSError as e:
        print(type(e).__name__)
print(os.path.exists({str(ROOT / "solutions")!r}), os.path.exists({str(ROOT / "minildm" / "checks")!r}))
print(os.environ.get("SECRET_TOKEN"), os.environ.get("MINILDM_FAST"), os.getuid() == 0 and os.access("/usr", os.W_OK))
"""
    env = {"MINILDM_FAST": "1"}
    readme = (ROOT / "README.md").read_text()
    os.environ["SECRET_TOKEN"] = "s3cret"
    try:
        result = _in_sandbox(tmp_path, code, env)
    finally:
        del os.environ["SECRET_TOKEN"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['submitted'] ['ann']"  # only the path to its own folder
    assert lines[1] == "the original"
    # the course of this test lies in /tmp: the write lands in the sandbox's own /tmp (the real one is checked below);
    # elsewhere the sandbox's root is read-only. So is the checkout's README, unless the checkout itself lies in /tmp
    # (then its path exists only in the sandbox's empty /tmp, and the real file is checked below)
    assert lines[3] == "OSError" or Path("/tmp") in ROOT.resolve().parents, lines
    assert (ROOT / "README.md").read_text() == readme
    assert lines[4] == "False True"  # the checkout's solutions/ is not there, the package is
    assert lines[5] == "None 1 False"  # no secrets of the grader's environment; no write access as root
    assert (tmp_path / "course" / "submitted" / "ann" / "mine.txt").read_text() == "the original"
    assert (tmp_path / "course" / "gradebook.db").read_text() == "grades"


@needs_sandbox
def test_packages_kept_under_tmp_are_visible_in_the_sandbox(tmp_path):
    """A virtual environment under /tmp (a course cloned there) must show through the sandbox's own empty /tmp."""
    env = tmp_path / "venv" / "site-packages"
    env.mkdir(parents=True)
    (env / "a_package.py").write_text("VALUE = 42\n")
    work, copy, runtime = (tmp_path / name for name in ("work", "copy", "rt"))
    for p in (work, copy, runtime):
        p.mkdir()
    ro = [str(p) for p in sandbox.python_paths([work])] + [str(env)]
    code = f"import sys; sys.path.insert(0, {str(env)!r}); import a_package; print(a_package.VALUE)"
    cmd = sandbox.bwrap_command(work, copy, runtime, [sys.executable, "-c", code], ro, {})
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr


@needs_sandbox
def test_the_sandbox_has_no_network(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3)
    print("reached")
except OSError as e:
    print("refused", type(e).__name__)
"""
    try:
        result = _in_sandbox(tmp_path, code)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused")


def _course(path: Path) -> Path:
    """A course with one student's untouched ex03."""
    for folder in ("solutions", "exercises"):
        shutil.copytree(ROOT / folder / "ex03-schedules", path / folder / "ex03-schedules")
    shutil.copy(ROOT / "nbgrader_config.py", path)
    (path / "submitted" / "ann" / "ex03-schedules").mkdir(parents=True)
    shutil.copy(ROOT / "exercises" / "ex03-schedules" / "schedules.ipynb", path / "submitted" / "ann" / "ex03-schedules")
    return path


def test_where_bwrap_cannot_run_auto_warns_and_grades(tmp_path, monkeypatch):
    from minildm.grade import _isolation

    monkeypatch.setattr(sandbox, "probe", lambda: "bwrap is not installed: install bubblewrap")
    env = {}
    line, kernel, stop = _isolation("auto", tmp_path, tmp_path, env)
    assert line.startswith("NOT ISOLATED: bwrap is not installed") and "solutions/" in line
    assert kernel is None and stop == "" and env == {}  # nbgrader's own kernel


def test_where_bwrap_cannot_run_sandbox_bwrap_grades_nothing_and_fails(tmp_path, monkeypatch):
    from minildm.cli import main

    monkeypatch.setattr(sandbox, "probe", lambda: "bwrap is not installed: install bubblewrap")
    course = _course(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["grade", "ex03-schedules", "--course", str(course), "--sandbox", "bwrap"])
    assert rc == 1 and "--sandbox bwrap: the sandbox cannot run: bwrap is not installed" in err.getvalue()
    assert "ann      not graded: error" in out.getvalue()
    assert not (course / "autograded").exists()  # no student code ran
