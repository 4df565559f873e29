"""Fixtures that start the real things the API needs: Postgres, Valkey, a model server, the API.

Every dependency is started by the harness itself; if one cannot start, the tests error
(they never skip), so a green run always means the real components were exercised.
"""

import secrets
import uuid
from collections.abc import Iterator

import httpx
import pytest

from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess, migrate
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey

STRONG_PASSWORD = "A_Strong_Password123!"
JWT_SECRET = secrets.token_hex(32)
OPENAI_KEY = "sk-test-" + secrets.token_hex(8)
LIVEKIT_KEY = "APItestkey"
LIVEKIT_SECRET = secrets.token_hex(32)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", delete_on_stop=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(api_key=OPENAI_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_model_scenarios(request: pytest.FixtureRequest) -> None:
    if "fake_openai" in request.fixturenames:
        request.getfixturevalue("fake_openai").reset()


def base_env(database_url: str, redis_url: str | None, model_url: str) -> dict[str, str]:
    env = {
        "ENVIRONMENT": "test",
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": database_url,
        "JWT_SECRET_KEY": JWT_SECRET,
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": model_url,
        "LLM_MODEL": "morgana-test-model",
        "LLM_TIMEOUT_SECONDS": "3",
        "LLM_MAX_RETRIES": "0",
        "LIVEKIT_URL": "ws://127.0.0.1:7880",
        "LIVEKIT_API_KEY": LIVEKIT_KEY,
        "LIVEKIT_API_SECRET": LIVEKIT_SECRET,
        "LIVEKIT_AGENT_NAME": "morgana-agent",
        # Generous limits: the rate-limit tests start their own API with tight ones.
        "RATE_LIMIT_REGISTER": "100000/minute",
        "RATE_LIMIT_LOGIN": "100000/minute",
        "RATE_LIMIT_LOGIN_ACCOUNT": "100000/minute",
        "RATE_LIMIT_SESSION": "100000/minute",
        "RATE_LIMIT_CHAT": "100000/minute",
        "RATE_LIMIT_MESSAGES": "100000/minute",
        "RATE_LIMIT_LIVEKIT": "100000/minute",
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


@pytest.fixture(scope="session")
def api_env(postgres: EmbeddedPostgres, valkey: EmbeddedValkey, fake_openai: FakeOpenAIProcess) -> dict[str, str]:
    env = base_env(postgres.url(), valkey.url, fake_openai.base_url)
    migrate(env)
    return env


@pytest.fixture(scope="session")
def api(api_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with ApiProcess(api_env, tmp_path_factory.mktemp("api") / "api.log") as process:
        yield process


@pytest.fixture
def client(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        yield http


def unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


def register(http: httpx.Client, email: str | None = None, password: str = STRONG_PASSWORD) -> dict:
    response = http.post("/api/v1/auth/register", json={"email": email or unique_email(), "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_session(http: httpx.Client, user_token: str) -> dict:
    response = http.post("/api/v1/auth/session", headers=bearer(user_token))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def user(client: httpx.Client) -> dict:
    return register(client)


@pytest.fixture
def chat_session(client: httpx.Client, user: dict) -> dict:
    return new_session(client, user["token"]["access_token"])


# The voice stack (tests/agent, tests/chart): a real LiveKit server, the API wired to it, and
# the real agent worker. Session-wide, so every directory shares one of each.
AGENT_EMAIL = "voice-agent@example.com"
AGENT_PASSWORD = "Voice_Agent_Passw0rd!"
VOICE_LIVEKIT_SECRET = "lk-test-secret-" + "9" * 32


@pytest.fixture(scope="session")
def livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    with LiveKitServer(
        "APIvoicetest", VOICE_LIVEKIT_SECRET, log_path=tmp_path_factory.mktemp("livekit") / "livekit.log"
    ) as server:
        yield server


@pytest.fixture(scope="session")
def voice_env(api_env: dict, livekit: LiveKitServer) -> dict[str, str]:
    env = {
        **api_env,
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "API_USER_EMAIL": AGENT_EMAIL,
        "API_USER_PASSWORD": AGENT_PASSWORD,
    }
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
