"""The API image's build and start commands, run on this machine (no Docker engine here).

The `uv sync` lines are read from the Dockerfile itself, so the image and this test cannot
drift apart; the result must serve under gunicorn and migrate, as the chart runs it.
"""

import os
import subprocess
from pathlib import Path

import httpx

from morgana.devtools.processes import ApiProcess
from tests.images.dockerfile import ROOT, build_image_venv

DOCKERFILE = ROOT / "images" / "api" / "Dockerfile"


def test_image_installs_the_locked_api_and_runs_its_entry_points(api_env: dict, tmp_path: Path) -> None:
    venv = build_image_venv(DOCKERFILE, tmp_path, extra="api")
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
