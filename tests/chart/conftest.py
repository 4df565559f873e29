"""The Prometheus expositions the dashboards are checked against, from the real processes.

- `api_metrics_text`: the session's API (`api`) after traffic that gives every series a sample
  (a streamed chat, a failed model call, a JSON chat, history, a 401 and a 404).
- `api_gunicorn_metrics_text`: an API run as the image runs it (gunicorn, two workers,
  PROMETHEUS_MULTIPROC_DIR) after the same traffic and a few 429s.
- `agent_metrics_text`: the real voice worker (the session fixtures of tests/conftest.py) on a
  real LiveKit server, scraped on its METRICS_PORT during and after a call with a failed turn
  (apology) and an answered one.
- `controller_metrics_text`: the controller's registry (morgana_controller.metrics), every
  labelled metric touched once.
"""

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client.metrics import MetricWrapperBase

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.services import eventually, eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.api.sse import stream_chat
from tests.conftest import (
    OPENAI_KEY,
    STRONG_PASSWORD,
    bearer,
    new_session,
    register,
    unique_email,
)


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.text


def _settled_api_metrics(http: httpx.Client) -> str:
    """/metrics once the last request's metrics are recorded (just after its response)."""

    def recorded() -> str:
        text = http.get("/metrics").text
        return text if 'handler="/api/v1/chatbot/messages",method="GET",status="200"' in text else ""

    return eventually(recorded, 5, interval=0.05, what="the last request's metrics")


def _api_traffic(http: httpx.Client, fake_openai: FakeOpenAIProcess) -> None:
    """Requests that give the API's series samples: auth, a streamed chat, a model failure, ..."""
    email = unique_email()
    register(http, email)
    login = http.post("/api/v1/auth/login", data={"username": email, "password": STRONG_PASSWORD})
    assert login.status_code == 200, login.text
    token = new_session(http, login.json()["access_token"])["token"]["access_token"]
    assert stream_chat(http, token, "fill the dashboards").status_code == 200
    fake_openai.queue_scenario(status=503)
    failed = stream_chat(http, token, "this one fails upstream")
    assert failed.last.get("error"), failed.events
    reply = http.post(
        "/api/v1/chatbot/chat", headers=bearer(token), json={"messages": [{"role": "user", "content": "and as JSON"}]}
    )
    assert reply.status_code == 200, reply.text
    assert http.get("/api/v1/chatbot/messages").status_code == 401
    assert http.get("/api/v1/no-such-route").status_code == 404
    assert http.get("/ready").status_code == 200
    assert http.get("/api/v1/chatbot/messages", headers=bearer(token)).status_code == 200


@pytest.fixture(scope="session")
def api_metrics_text(api: ApiProcess, fake_openai: FakeOpenAIProcess) -> str:
    """The session's API (one uvicorn process, as the tests and `make run` serve it)."""
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            _api_traffic(http, fake_openai)
            return _settled_api_metrics(http)
    finally:
        fake_openai.reset()


@pytest.fixture(scope="session")
def api_gunicorn_metrics_text(
    api_env: dict, fake_openai: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The API as the image runs it: gunicorn, two workers summed through PROMETHEUS_MULTIPROC_DIR.

    Only series with a sample appear there, so the same traffic plus 429s from a tight login
    limit (in process memory, no REDIS_URL: it cannot touch other tests' shared counters).
    """
    logs = tmp_path_factory.mktemp("dashboards-api")
    env = {key: value for key, value in api_env.items() if key != "REDIS_URL"}
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(logs / "prom"),
        RATE_LIMIT_LOGIN="1/minute",
        # gunicorn is a console script of this environment (on PATH under `uv run`).
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    try:
        with (
            ApiProcess(env, logs / "api.log", workers=2) as process,
            httpx.Client(base_url=process.url, timeout=30) as http,
        ):
            _api_traffic(http, fake_openai)
            # One login per worker is allowed a minute: at least 4 of these 6 are refused.
            statuses = [
                http.post(
                    "/api/v1/auth/login", data={"username": unique_email(), "password": "Wrong_Passw0rd!"}
                ).status_code
                for _ in range(6)
            ]
            assert statuses.count(429) >= 4, statuses
            return _settled_api_metrics(http)
    finally:
        fake_openai.reset()


@pytest.fixture(scope="session")
def agent_metrics_text(voice_api: ApiProcess, agent_worker: AgentWorker, fake_openai: FakeOpenAIProcess) -> str:
    """The worker's /metrics during a call (live gauges) and after it (histograms, counters).

    The first turn fails upstream twice (the try and its one retry: an apology and
    `api_errors_total`), the second is answered (time to first token, TTS, turn latency).
    """
    fake_openai.reset()
    fake_openai.queue_scenario(status=503)
    fake_openai.queue_scenario(status=503)
    fake_openai.queue_transcripts("First try", "Second try")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Can you hear me?")
    metrics_url = f"http://127.0.0.1:{agent_worker.metrics_port}/metrics"
    scrapes: list[str] = []

    async def call() -> Caller:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            await eventually_async(
                lambda: len(caller.room.remote_participants) > 0,
                30,
                what=lambda: f"an agent in the room\n{agent_worker.log_tail()}",
            )
            await caller.silence(1.0)
            await caller.say(utterance)
            await eventually_async(
                lambda: len(caller.agent_texts()) >= 1, 30, what=lambda: f"the first reply\n{agent_worker.log_tail()}"
            )
            await caller.say(utterance)
            await eventually_async(
                lambda: len(caller.agent_texts()) >= 2, 30, what=lambda: f"the second reply\n{agent_worker.log_tail()}"
            )
            await caller.silence(1.0)
            scrapes.append(await asyncio.to_thread(_scrape, metrics_url))
        finally:
            await caller.leave()
        return caller

    try:
        caller = asyncio.run(call())
    finally:
        fake_openai.reset()
    assert caller.agent_texts()[-1] == "You said: Second try", caller.agent_texts()
    # And once the call has ended (its process has recorded its last turn by then).
    scrapes.append(
        eventually(
            lambda: "morgana_agent_active_calls 0.0" in (text := _scrape(metrics_url)) and text,
            10,
            interval=0.2,
            what="the call's end in the worker's /metrics",
        )
    )
    return "\n".join(scrapes)


def _controller_metrics() -> list[MetricWrapperBase]:
    from morgana_controller import metrics as module

    found = [value for value in vars(module).values() if isinstance(value, MetricWrapperBase)]
    assert found, "morgana_controller.metrics defines no prometheus_client metrics"
    return found


@pytest.fixture(scope="session")
def controller_metrics_text() -> Iterator[str]:
    """`generate_latest()` of the controller's registry with every labelled metric touched once.

    The controller serves the default registry (prometheus_client.start_http_server); the
    series added here are removed again so that no other test sees them.
    """
    touched = []
    for metric in _controller_metrics():
        names = getattr(metric, "_labelnames", ())
        if names:
            values = ["dashboard-test"] * len(names)
            metric.labels(*values)
            touched.append((metric, values))
    try:
        text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    finally:
        for metric, values in touched:
            metric.remove(*values)
    yield text
