"""Reading a Dockerfile, and running its `uv sync` steps here as the image build would."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if match := re.match(r"([A-Z]+)\s+(.*)", line.strip()):
            instructions.append((match[1], re.sub(r"\s+", " ", match[2]).strip()))
    return instructions


def uv_steps(path: Path) -> list[list[str]]:
    runs = [re.sub(r"--mount=\S+", "", args).split()
            for op, args in dockerfile_instructions(path) if op == "RUN"]
    return [argv for argv in runs if argv[:1] == ["uv"]]


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from + 1:]


def exec_form(path: Path, instruction: str) -> list[str]:
    values = [json.loads(args) for op, args in runtime_stage(path) if op == instruction]
    assert len(values) == 1, f"want one {instruction} in the runtime stage of {path}: {values}"
    return values[0]


def runtime_env(path: Path) -> dict[str, str]:
    """The runtime stage's ENV (KEY=value form, no quoting), as the container sees it."""
    env: dict[str, str] = {}
    for op, args in runtime_stage(path):
        if op == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def build_image_venv(dockerfile: Path, workdir: Path, extra: str) -> Path:
    """The venv the image's two `uv sync` steps produce, with the source gone afterwards."""
    uv = os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".cache/uv/bin/uv")
    context = workdir / "src-copy"
    context.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, context / name)
    venv = workdir / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never",
           "UV_LINK_MODE": "copy", "VIRTUAL_ENV": ""}

    steps = uv_steps(dockerfile)
    assert len(steps) == 2, steps
    assert all(step[step.index("--extra") + 1] == extra for step in steps if "--extra" in step), steps
    # Step 1 runs before `COPY src`: dependencies alone must install from the lock.
    subprocess.run([uv, *steps[0][1:]], cwd=context, env=env, check=True, capture_output=True)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([uv, *steps[1][1:]], cwd=context, env=env, check=True, capture_output=True)
    # Not editable: the image's venv must work once /src is gone.
    shutil.rmtree(context / "src")
    return venv


def container_env_here(declared: dict[str, str], venv: Path, container_tmp: Path) -> dict[str, str]:
    """The image's ENV mapped onto this machine: /app/.venv is the venv built here and /tmp a
    fresh empty directory, as an emptyDir mounted there starts out. TMPDIR points there too."""

    def here(value: str) -> str:
        value = value.replace("$PATH", os.environ["PATH"]).replace("/app/.venv", str(venv))
        return re.sub(r"(?<![\w/])/tmp(?=/|$|:)", str(container_tmp), value)

    return {**{key: here(value) for key, value in declared.items()}, "TMPDIR": str(container_tmp)}
