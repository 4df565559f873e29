"""Shared fixtures of the deploy tests: pinned versions, the real helm binary, the Tiltfile's run.

tilt, kind, ctlptl and Docker cannot run here, so these tests check every file they would read
and every command they would run: the Tiltfile is evaluated by a Starlark interpreter against
recording stand-ins (tiltfile_sim.py), charts are rendered by the real helm, and
deploy/install.sh runs for real (against recording stand-ins for helm and docker, and against a
real kube-apiserver for its kubectl steps). Nothing is skipped: a missing tool fails the run.
"""

from __future__ import annotations

import json
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from morgana_devtools.kube_apiserver import ensure_binaries
from tests.deploy.tiltfile_sim import ROOT, TiltRun, evaluate

DEPLOY = ROOT / "deploy"
VALUES = DEPLOY / "values"
INSTALL_SH = DEPLOY / "install.sh"
VERSIONS_ENV = DEPLOY / "versions.env"
COMPONENTS = ("api", "agent", "controller")


def read_versions() -> dict[str, str]:
    """deploy/versions.env as the shell sources it (plain KEY=value lines)."""
    versions = {}
    for line in VERSIONS_ENV.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and re.fullmatch(r"[A-Za-z0-9._-]+", value), line
        versions[key] = value
    return versions


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---- Dockerfiles, read from their text (the Tiltfile builds from text too) ----


@dataclass
class Dockerfile:
    text: str

    def instructions(self) -> list[tuple[str, str]]:
        lines = [line for line in self.text.splitlines() if not line.lstrip().startswith("#")]
        joined = "\n".join(lines).replace("\\\n", " ")
        found = []
        for line in joined.splitlines():
            if match := re.match(r"([A-Z]+)\s+(.*)", line.strip()):
                found.append((match[1], re.sub(r"\s+", " ", match[2]).strip()))
        return found

    def global_args(self) -> dict[str, str]:
        args = {}
        for op, rest in self.instructions():
            if op == "FROM":
                break
            if op == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value
        return args

    def stages(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """(stage name or image, instructions) per FROM."""
        stages: list[tuple[str, list[tuple[str, str]]]] = []
        for op, rest in self.instructions():
            if op == "FROM":
                words = rest.split()
                stages.append((words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0], []))
            elif stages:
                stages[-1][1].append((op, rest))
        return stages

    def stage(self, name: str) -> list[tuple[str, str]]:
        for stage_name, instructions in self.stages():
            if stage_name == name:
                return instructions
        raise KeyError(name)

    def runtime(self) -> list[tuple[str, str]]:
        return self.stages()[-1][1]

    @staticmethod
    def env(instructions: list[tuple[str, str]]) -> dict[str, str]:
        env: dict[str, str] = {}
        for op, rest in instructions:
            if op == "ENV":
                for pair in rest.split():
                    key, _, value = pair.partition("=")
                    env[key] = value
        return env

    def exec_form(self, instruction: str) -> list[str]:
        values = [json.loads(rest) for op, rest in self.runtime() if op == instruction]
        assert values, f"no {instruction} in the runtime stage"
        return values[-1]

    def user(self) -> str:
        users = [rest for op, rest in self.runtime() if op == "USER"]
        assert users, "the runtime stage sets no USER"
        return users[-1]

    def context_copies(self) -> list[str]:
        """Sources of COPY instructions that read the build context (not --from a stage)."""
        sources = []
        for _, instructions in self.stages():
            for op, rest in instructions:
                if op in ("COPY", "ADD") and "--from=" not in rest:
                    words = [w for w in rest.split() if not w.startswith("--")]
                    sources += words[:-1]
        return sources

    def installed_package_dir(self, package: str = "morgana") -> str:
        """Where `uv sync --no-editable` puts the package: UV_PROJECT_ENVIRONMENT's site-packages."""
        venv = self.env(self.stage("build"))["UV_PROJECT_ENVIRONMENT"]
        python = self.global_args()["PYTHON_VERSION"]
        return f"{venv}/lib/python{python}/site-packages/{package}"


def dockerfile(component: str) -> Dockerfile:
    return Dockerfile((ROOT / "images" / component / "Dockerfile").read_text())


def controller_dockerfile_text() -> str:
    return (ROOT / "images" / "controller" / "Dockerfile").read_text()


# ---- Fixtures ----


@pytest.fixture(scope="session")
def versions() -> dict[str, str]:
    return read_versions()


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return ensure_binaries()["helm"]


@pytest.fixture(scope="session")
def tilt(helm_binary: Path) -> TiltRun:
    """The Tiltfile as `tilt up` runs it in this checkout, with no extra environment."""
    return evaluate(helm_binary)


@pytest.fixture(scope="session")
def tilt_with_controller(helm_binary: Path) -> TiltRun:
    """The Tiltfile as it is, images/controller/Dockerfile included."""
    return evaluate(helm_binary)


@pytest.fixture(scope="session")
def tilt_without_controller(helm_binary: Path) -> TiltRun:
    return evaluate(helm_binary, missing_files=frozenset({"images/controller/Dockerfile"}))


@pytest.fixture(scope="session", params=["with-controller", "without-controller"])
def tilt_variant(request: pytest.FixtureRequest) -> TiltRun:
    return request.getfixturevalue(
        "tilt_with_controller" if request.param == "with-controller" else "tilt_without_controller"
    )


# Recording stand-ins for helm, kubectl and docker: each call is a JSON line in $RECORD.
SHIM = """#!{python}
import json, os, sys
tool = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
stdin = sys.stdin.read() if argv[-2:] == ["-f", "-"] else None
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"tool": tool, "argv": argv, "stdin": stdin}}) + "\\n")
if tool == "kubectl" and argv[:2] == ["config", "current-context"]:
    print(os.environ.get("FAKE_CONTEXT", "kind-morgana"))
elif tool == "kubectl" and argv[:1] == ["create"] and "--dry-run=client" in argv:
    print("kind: " + argv[1].capitalize())
"""


@pytest.fixture
def shims(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("helm", "kubectl", "docker"):
        shim = bin_dir / tool
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    yield bin_dir, tmp_path / "record.jsonl"
