"""The API image, built from images/api/Dockerfile and run as the chart runs it: the migration
Job's container, then the API Deployment's with one gunicorn worker and with two, each with the
environment `helm template` renders, as user 10001, on a read-only root with an empty /tmp."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from morgana_devtools.services import eventually, free_port
from tests.api.sse import stream_chat
from tests.conftest import STRONG_PASSWORD, new_session, register, unique_email
from tests.images.conftest import Release
from tests.images.containers import BuiltImages, image_config, run_in_image

AGENT_EMAIL = "voice-agent@morgana.local"  # the chart's default agentUser.email


def test_the_image_holds_the_api_and_runs_it_as_a_non_root_user(images: BuiltImages) -> None:
    config = image_config(images.refs["api"])
    assert config["User"] == "10001:10001"
    assert (config["Entrypoint"], config["Cmd"]) == (["morgana-api"], ["serve"])
    assert "8000/tcp" in config["ExposedPorts"]
    assert run_in_image(images.refs["api"], "python", "-c", "import morgana.api.main").returncode == 0
    for module, why in (
        ("pytest", "test dependencies"),
        ("livekit.agents", "the voice worker's framework"),
        ("kopf", "the controller's framework"),
    ):
        leaked = run_in_image(images.refs["api"], "python", "-c", f"import {module}")
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the API image"


def test_the_migration_job_migrates_and_creates_the_agents_account(migrated: str) -> None:
    assert "database schema is up to date" in migrated
    assert "Traceback" not in migrated, migrated[-6000:]


def json_lines(logs: str) -> list[dict]:
    """Every line the container wrote, each of which must be one JSON object."""
    lines = [line for line in logs.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return parsed


@pytest.mark.parametrize("workers", [1, 2])
def test_the_api_serves_as_the_chart_runs_it(
    workers: int, migrated: str, images: BuiltImages, release: Release, tmp_path: Path
) -> None:
    rendered = release.rendered(f"api.workers={workers}")
    # The chart's 8000 and 9101, moved: every container here shares the host's network.
    port, metrics_port = free_port(), free_port()
    api = rendered.container("Deployment", "-api", images, tmp_path, PORT=str(port), API_METRICS_PORT=str(metrics_port))
    with api:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert api.running, api.logs()[-6000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(healthy, 60, what="the API container's /health")
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/ready").json() == {"status": "ready", "components": {"postgres": "ok", "redis": "ok"}}
            # The account the migration Job made, with the password from the operator's Secret.
            password = release.secrets["morgana-secrets"]["agent-password"]
            login = http.post("/api/v1/auth/login", data={"username": AGENT_EMAIL, "password": password})
            assert login.status_code == 200, login.text
            # A user's whole path, the model included (the stand-in echoes).
            email = unique_email()
            register(http, email)
            token = http.post("/api/v1/auth/login", data={"username": email, "password": STRONG_PASSWORD})
            session = new_session(http, token.json()["access_token"])["token"]["access_token"]
            reply = stream_chat(http, session, "hello from a container")
            assert reply.text == "You said: hello from a container", reply.events
            # /metrics on its own port only, and no docs: nothing an Ingress in front should show.
            for hidden in ("/metrics", "/docs", "/openapi.json"):
                assert http.get(hidden).status_code == 404, hidden
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'morgana_api_http_requests_total{handler="/api/v1/auth/login",method="POST",status="200"}' in metrics
        assert api.running, api.logs()[-6000:]
        code = api.stop(grace=60)  # the Deployment's terminationGracePeriodSeconds
        logs = api.logs()
    assert code == 0, logs[-6000:]
    records = json_lines(logs)
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], logs[-6000:]
    assert "Traceback" not in logs
    messages = [r["message"] for r in records]
    if workers > 1:
        # gunicorn's own lines, once each and in JSON like every other line.
        assert sum(m.startswith("Listening at:") for m in messages) == 1, messages
        assert sum(m.startswith("Booting worker") for m in messages) == workers, messages
