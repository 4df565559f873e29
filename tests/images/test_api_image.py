"""The API image's build and start commands, run on this machine (no Docker engine here).

The `uv sync` lines are read from the Dockerfile itself, so the image and this test cannot
drift apart; the result must serve under gunicorn and migrate, as the chart runs it.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx

from morgana.devtools.processes import ApiProcess

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "api" / "Dockerfile"


def dockerfile_run_commands() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            command = re.sub(r"--mount=\S+", "", line[4:]).strip()
            commands.append(re.sub(r"\s+", " ", command))
    return commands


def test_image_installs_the_locked_api_and_runs_its_entry_points(api_env: dict, tmp_path: Path) -> None:
    uv = os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".cache/uv/bin/uv")
    context = tmp_path / "src-copy"
    context.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, context / name)
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never",
           "UV_LINK_MODE": "copy", "VIRTUAL_ENV": ""}

    uv_steps = [c for c in dockerfile_run_commands() if c.startswith("uv ")]
    assert len(uv_steps) == 2, uv_steps
    # Step 1 runs before `COPY src`: dependencies alone must install from the lock.
    subprocess.run([uv, *uv_steps[0].split()[1:]], cwd=context, env=env, check=True, capture_output=True)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([uv, *uv_steps[1].split()[1:]], cwd=context, env=env, check=True, capture_output=True)

    # Not editable: the image's venv must work once /src is gone.
    shutil.rmtree(context / "src")
    entry = venv / "bin" / "morgana-api"
    image_env = {**api_env, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "ENVIRONMENT": "production",
                 "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "WEB_CONCURRENCY": "2"}
    dev_only = subprocess.run([venv / "bin" / "python", "-c", "import pytest"], capture_output=True)
    assert dev_only.returncode != 0, "test dependencies leaked into the image"

    migrate = subprocess.run([entry, "migrate"], env=image_env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr

    process = ApiProcess(image_env, tmp_path / "api.log")
    process.command = [str(entry), "serve"]
    with process, httpx.Client(base_url=process.url, timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
    assert "Booting worker" in process.log_path.read_text()
