"""A new student's first run, as the README tells it: a fresh clone and virtual environment, `pip install -e ".[test]"`,
JupyterLab started headless in fast mode, notebook 01 opened in headless Chromium and run there (a screenshot shows
the notebook and its slider widget, rendered by JupyterLab), then every notebook run through the new environment's
kernel.

It costs minutes (the install downloads torch; the notebooks run about 4 minutes on two cores), so CI leaves it out:
`make first-run` runs it (MINILDM_FIRST_RUN=1), installing Debian's chromium package where missing. The screenshot
goes to runs/first_run/01_data.png (or $MINILDM_FIRST_RUN_OUT).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, chromium

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("MINILDM_FIRST_RUN"),
                                reason="minutes of install and notebooks: run with MINILDM_FIRST_RUN=1 "
                                       "(make first-run)")
PANEL = "(window.jupyterapp && Array.from(jupyterapp.shell.widgets('main')).find(w => w.sessionContext))"
KERNEL = f"({PANEL}) && ({PANEL}).sessionContext.session && ({PANEL}).sessionContext.session.kernel"
ERRORS = (f"Array.from(({PANEL}).content.model.cells).flatMap(c => c.type === 'code' ? c.outputs.toJSON() : [])"
          ".filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)")


def _step(what: str, cmd: list[str], cwd: Path, env: dict, timeout: float) -> float:
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{what} failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_new_student_runs_the_course(tmp_path):
    if chromium() is None:
        pytest.skip("no Chromium here: apt-get install chromium (make first-run does), or set CHROMIUM=path")
    pytest.importorskip("websocket", reason="websocket-client drives Chromium (it comes with jupyter_server)")
    clone = tmp_path / "minildm"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MINILDM_FIRST_RUN")}
    try:
        _first_run(tmp_path, clone, env)
    finally:
        shutil.rmtree(clone / ".venv", ignore_errors=True)  # gigabytes (torch)


def _first_run(tmp_path: Path, clone: Path, env: dict) -> None:
    times = {}
    times["clone"] = _step("git clone", ["git", "clone", "-q", str(ROOT), str(clone)], tmp_path, env, 120)
    # the README's commands for a CPU laptop
    times["venv"] = _step("venv", [sys.executable, "-m", "venv", ".venv"], clone, env, 300)
    bin_dir = clone / ".venv" / "bin"
    env = {**env, "VIRTUAL_ENV": str(clone / ".venv"), "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
           "MINILDM_FAST": "1"}
    times["install"] = _step("pip install", [str(bin_dir / "pip"), "install", "-q", "-e", ".[test]"], clone, env,
                             1800)
    check = subprocess.run([str(bin_dir / "python"), "-c", "import minildm; print(minildm.__file__)"],
                           cwd=clone / "notebooks", env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == str(clone / "minildm" / "__init__.py")  # the clone, not this checkout

    port, token = _free_port(), secrets.token_hex(16)
    lab = [str(bin_dir / "jupyter"), "lab", "--no-browser", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={clone / 'notebooks'}", "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        lab.append("--allow-root")
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(lab, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    browser = None
    try:
        start = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-3000:]
                assert time.monotonic() - start < 120, "JupyterLab did not answer within 120 s"
                time.sleep(1)
        times["jupyterlab start"] = time.monotonic() - start
        start = time.monotonic()
        browser = Browser()
        browser.open(f"http://127.0.0.1:{port}/lab/tree/01_data.ipynb?token={token}")
        cells = len(json.loads((clone / "notebooks" / "01_data.ipynb").read_text())["cells"])
        browser.wait_for(f"({PANEL}) && ({PANEL}).content.widgets.length === {cells} && "
                         f"document.querySelectorAll('.jp-Notebook .jp-Cell').length > 0", 120, f"{cells} cells")
        browser.wait_for(f"({KERNEL}) && ({KERNEL}).status === 'idle'", 180, "an idle kernel")
        browser.evaluate(f"jupyterapp.shell.activateById(({PANEL}).id)")
        time.sleep(1)
        browser.evaluate("jupyterapp.commands.execute('notebook:run-all-cells')")
        browser.wait_for("document.querySelectorAll('.jupyter-widgets.widget-slider').length", 600, "the slider")
        browser.wait_for(f"({KERNEL}).status === 'idle' && !document.body.innerText.includes('[*]')", 600,
                         "every cell run")
        assert browser.evaluate(ERRORS) == []
        assert browser.evaluate(f"({PANEL}).content.widgets.every(c => c.model.type !== 'code' || "
                                "c.model.executionCount !== null)")
        browser.evaluate("document.querySelector('.jupyter-widgets.widget-slider').scrollIntoView({block: 'center'})")
        time.sleep(2)  # let the figure under the slider paint
        out = Path(os.environ.get("MINILDM_FIRST_RUN_OUT", ROOT / "runs" / "first_run"))
        shot = browser.screenshot(out / "01_data.png")
        times["notebook 01 in JupyterLab"] = time.monotonic() - start
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()

    # every notebook, in order, through the new environment's kernel (what `make test` does with nbval)
    times["notebooks (nbval)"] = _step("the notebooks", [str(bin_dir / "python"), "-m", "pytest", "-q",
                                                          "-p", "no:cacheprovider", "--nbval-lax", "notebooks"],
                                       clone, env, 1800)
    (out / "times.json").write_text(json.dumps({k: round(v, 1) for k, v in times.items()}, indent=1) + "\n")
    print(json.dumps(times, indent=1), f"\nscreenshot: {shot}")
