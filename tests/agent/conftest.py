"""A real LiveKit server, the API wired to it, and the real agent worker."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from morgana.devtools.livekit_server import LiveKitServer
from morgana.devtools.openai_server import FakeOpenAIProcess
from morgana.devtools.processes import ApiProcess, migrate
from morgana.devtools.services import free_port

AGENT_EMAIL = "voice-agent@example.com"
AGENT_PASSWORD = "Voice_Agent_Passw0rd!"
LIVEKIT_SECRET = "lk-test-secret-" + "9" * 32


@pytest.fixture(scope="session")
def livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    with LiveKitServer("APIvoicetest", LIVEKIT_SECRET,
                       log_path=tmp_path_factory.mktemp("livekit") / "livekit.log") as server:
        yield server


@pytest.fixture(scope="session")
def voice_env(api_env: dict, livekit: LiveKitServer) -> dict[str, str]:
    env = {**api_env, "LIVEKIT_URL": livekit.url, "LIVEKIT_API_KEY": livekit.api_key,
           "LIVEKIT_API_SECRET": livekit.api_secret, "API_USER_EMAIL": AGENT_EMAIL,
           "API_USER_PASSWORD": AGENT_PASSWORD}
    migrate(env)  # creates the agent's service account
    return env


@pytest.fixture(scope="session")
def voice_api(voice_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with ApiProcess(voice_env, tmp_path_factory.mktemp("voice-api") / "api.log") as process:
        yield process


class AgentWorker:
    """`morgana-agent start` as a child process, with its health port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        self.env = {**os.environ, **env, "HEALTH_PORT": str(self.health_port),
                    "METRICS_PORT": str(self.metrics_port)}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "AgentWorker":
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "morgana.agent.worker", "start"],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent worker exited:\n{self.log_tail()}")
            try:
                worker = httpx.get(f"http://127.0.0.1:{self.health_port}/worker", timeout=1).json()
                if worker.get("worker_id") or worker.get("agent_name"):
                    if self._registered():
                        return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"agent worker did not register in {timeout} s:\n{self.log_tail()}")

    def _registered(self) -> bool:
        return "registered worker" in self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def agent_env(voice_env: dict, voice_api: ApiProcess, fake_openai: FakeOpenAIProcess) -> dict[str, str]:
    return {
        "LIVEKIT_URL": voice_env["LIVEKIT_URL"],
        "LIVEKIT_API_KEY": voice_env["LIVEKIT_API_KEY"],
        "LIVEKIT_API_SECRET": voice_env["LIVEKIT_API_SECRET"],
        "LIVEKIT_AGENT_NAME": "morgana-agent",
        "MORGANA_BACKEND_URL": voice_api.url,
        "API_USER_EMAIL": AGENT_EMAIL,
        "API_USER_PASSWORD": AGENT_PASSWORD,
        "OPENAI_API_KEY": voice_env["OPENAI_API_KEY"],
        "OPENAI_BASE_URL": fake_openai.base_url,
        "TTS_RESPONSE_FORMAT": "pcm",
        "MAX_CONCURRENT_CALLS": "4",
        "API_RETRIES": "1",
        "API_RETRY_BACKOFF_SECONDS": "0.2",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture(scope="session")
def agent_worker(agent_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentWorker]:
    worker = AgentWorker(agent_env, tmp_path_factory.mktemp("agent") / "agent.log").start()
    yield worker
    worker.stop()
