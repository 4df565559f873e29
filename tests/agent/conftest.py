"""A real LiveKit server, the API wired to it, and the real agent worker."""

from collections.abc import Iterator

import pytest

from morgana.devtools.livekit_server import LiveKitServer
from morgana.devtools.openai_server import FakeOpenAIProcess
from morgana.devtools.processes import AgentWorker, ApiProcess, migrate

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
