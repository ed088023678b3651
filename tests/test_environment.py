"""pyproject.toml and environment.yml must list the same requirements."""

from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _normalise(req: str) -> str:
    return req.replace(" ", "").lower()


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs |= set(extra)
    return {_normalise(r) for r in reqs}


def conda_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_normalise(r) for r in pip if not r.startswith("-e")}


def test_environment_yml_matches_pyproject():
    py, conda = pyproject_requirements(), conda_requirements()
    assert py - conda == set(), f"in pyproject.toml but not environment.yml: {sorted(py - conda)}"
    assert conda - py == set(), f"in environment.yml but not pyproject.toml: {sorted(conda - py)}"


def test_ci_pins_a_supported_torch():
    pins = dict(line.split("==") for line in (ROOT / "constraints-ci.txt").read_text().split("\n")
                if "==" in line and not line.startswith("#"))
    major, minor = (int(x) for x in pins["torch"].split(".")[:2])
    assert (major, minor) >= (2, 4), "CI must test a torch the package supports (>= 2.4)"
