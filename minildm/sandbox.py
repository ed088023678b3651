"""Each submission's kernel in a bubblewrap sandbox: student code is untrusted.

nbgrader's autograde runs a student's notebook as the instructor, in the course folder, where the hidden tests
(solutions/), other students' work (submitted/, autograded/) and the SQLite gradebook lie within reach
(jupyter/nbgrader#483). `minildm grade` therefore starts every kernel through this file, which wraps it in
bubblewrap (`bwrap`, Debian's `bubblewrap` package). Inside, the kernel sees

- a throw-away copy of its own notebook folder, at the same path (it may write there; nothing is kept),
- the Python interpreter, its installed packages and the minildm package read-only (only the package's folder:
  not the checkout around it, where solutions/ and tests/ lie), the system's /usr and /etc read-only,
- its own /tmp, /dev and /proc, and the folder of the kernel's connection file (ZeroMQ talks over Unix sockets
  there, since the sandbox has no network, not even a loopback shared with the grader),

and nothing else: no course folder, no gradebook, no other student, no home folder, no network, none of the
instructor's environment variables but a few harmless ones, and no capabilities, even when grading as root.

Where bwrap is missing or cannot run (no user namespaces, e.g. some containers), `minildm grade` says so and, with
`--sandbox auto` (the default), grades without isolation after a warning; `--sandbox bwrap` refuses instead, and
`--sandbox none` skips it knowingly. Install: `apt-get install bubblewrap` (`make grading-sandbox` does it).

This file is also the kernel's launcher (`python sandbox.py SPEC CONNECTION_FILE`, named in the kernel spec that
`kernelspec` writes). It runs as a script, standard library only, so starting a kernel does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "minildm-sandbox"
# what a kernel keeps of the grader's environment (nothing else: the instructor's tokens and paths stay outside)
KEEP_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "MPLBACKEND", "MINILDM_FAST", "MINILDM_DEVICE")
SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt/conda")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`, or `make grading-sandbox`; "
                "Fedora: `dnf install bubblewrap`)")


class SandboxError(RuntimeError):
    """The sandbox cannot run here, or would expose the course folder; the message says why and what to do."""


def package_folder() -> Path:
    """The minildm package's own folder (minildm/), the only part of a source checkout a kernel may read."""
    return Path(__file__).resolve().parent


def python_paths(private: list[Path] = ()) -> list[Path]:
    """Folders a kernel needs read-only: the interpreter's prefixes, its standard library and site-packages, and
    the minildm package folder (never the checkout around it). Ordered, without duplicates or nested repeats.

    sys.path entries that are a checkout around the package or one of the `private` folders (Python puts the
    current folder, the course, first on sys.path for `python -m`) are left out."""
    skip = {package_folder().parent, *(Path(p).resolve() for p in private)}
    found = [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
    found.append(Path(sys.executable).resolve().parent.parent)
    found += [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    for entry in sys.path:
        if entry and Path(entry).is_dir() and Path(entry).resolve() not in skip:
            found.append(Path(entry))
    found.append(package_folder())
    paths: list[Path] = []
    for p in found:
        p = p.resolve()
        if p.is_dir() and p != Path("/") and p not in paths:
            paths.append(p)
    # a folder inside another one in the list is already there
    return [p for p in paths if not any(q != p and q in p.parents for q in paths)]


def exposed(paths: list[Path], private: list[Path]) -> list[str]:
    """'path (shows private)' for each read-only path that would show one of the private folders (the course)."""
    out = []
    for p in paths:
        for q in private:
            q = q.resolve()
            if p == q or p in q.parents:
                out.append(f"{p} (holds {q})")
    return out


def bwrap_command(workdir: Path, copy: Path, runtime: Path, kernel: list[str], ro_paths: list[str],
                  env: dict[str, str], connection_file: Path | None = None) -> list[str]:
    """The bwrap command line that runs `kernel` isolated, with `copy` mounted at `workdir` as its notebook folder,
    `runtime` (where the ZeroMQ sockets go) writable and the connection file read-only."""
    cmd = ["bwrap", "--die-with-parent", "--unshare-all", "--cap-drop", "ALL", "--clearenv"]
    # the fresh /tmp, /dev and /proc first: a later bind of a folder inside /tmp (a virtual environment or a course
    # kept there) then lands on top of the empty /tmp instead of being hidden by it
    cmd += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    for path in SYSTEM:
        p = Path(path)
        if p.is_symlink():  # merged /usr: /lib -> usr/lib
            cmd += ["--symlink", os.readlink(p), path]
        elif p.is_dir():
            cmd += ["--ro-bind", path, path]
    for path in ro_paths:
        cmd += ["--ro-bind", path, path]
    cmd += ["--bind", str(runtime), str(runtime), "--bind", str(copy), str(workdir), "--chdir", str(workdir)]
    if connection_file:
        cmd += ["--ro-bind", str(connection_file), str(connection_file)]
    cmd += ["--remount-ro", "/"]  # the sandbox's own root too: only /tmp, /dev/shm, its folder and sockets take writes
    for key, value in {"HOME": "/tmp", "PATH": "/usr/local/bin:/usr/bin:/bin", "MPLCONFIGDIR": "/tmp",
                       **env}.items():
        cmd += ["--setenv", key, value]
    return cmd + ["--", *kernel]


def probe(timeout: float = 20) -> str:
    """'' when bwrap runs here with the namespaces the sandbox needs, else why not (with what to do)."""
    if shutil.which("bwrap") is None:
        return f"bwrap is not installed: {INSTALL_HINT}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = bwrap_command(Path(tmp), Path(tmp), Path(tmp), [sys.executable, "-c", "pass"],
                            [str(p) for p in python_paths([Path.cwd()])], {})
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap could not start: {e}"
    if result.returncode != 0:
        return (f"bwrap is installed but cannot create the sandbox here ({result.stderr.strip()[:300]}): it needs "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or root, and, in a "
                "container, one started with --privileged or a seccomp profile that allows them")
    return ""


def kernelspec(folder: Path, runtime: Path, private: list[Path]) -> Path:
    """Write the sandboxed kernel's spec under folder/kernels/ (put `folder` on JUPYTER_PATH) and return its file.

    `runtime` is the one folder besides its notebook's that a kernel may write: its ZeroMQ sockets go there (give
    the kernel manager an `ip` in it and transport "ipc"). `private` are the folders no kernel may see (the
    course). Raises SandboxError when a path the kernel needs would show one of them."""
    paths = python_paths(private)
    shown = exposed(paths + [Path(p) for p in SYSTEM if Path(p).is_dir() and not Path(p).is_symlink()], private)
    if shown:
        raise SandboxError("the sandbox would show the course folder to student code, because a folder the kernel "
                           f"needs holds it: {'; '.join(shown)}. Move the course folder out of it.")
    spec = {"ro_paths": [str(p) for p in paths], "runtime": str(runtime.resolve()),
            "copies": str((folder / "copies").resolve()), "python": sys.executable}
    (folder / "copies").mkdir(parents=True, exist_ok=True)
    kernel_dir = folder / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    (kernel_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    argv = [sys.executable, "-I", str(Path(__file__).resolve()), str((kernel_dir / "spec.json").resolve()),
            "{connection_file}"]
    (kernel_dir / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": "Python 3 (minildm sandbox)", "language": "python"}, indent=1))
    return kernel_dir / "kernel.json"


def launch(spec_file: str, connection_file: str) -> None:
    """The kernel spec's command: copy the notebook folder (the current directory), then exec the kernel in bwrap."""
    spec = json.loads(Path(spec_file).read_text())
    workdir = Path.cwd().resolve()
    copy = Path(tempfile.mkdtemp(dir=spec["copies"]))
    shutil.copytree(workdir, copy, dirs_exist_ok=True, symlinks=True)
    env = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
    connection = Path(connection_file).resolve()
    kernel = [spec["python"], "-m", "ipykernel_launcher", "-f", str(connection)]
    cmd = bwrap_command(workdir, copy, Path(spec["runtime"]), kernel, spec["ro_paths"], env, connection)
    # The kernel manager interrupts a cell with SIGINT to the kernel's process group, bwrap included: bwrap must
    # ignore it (it would die and take the kernel with it); ipykernel sets its own handler while a cell runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: sandbox.py SPEC.json CONNECTION_FILE (started by a kernel spec of minildm grade)")
    launch(*sys.argv[1:])
