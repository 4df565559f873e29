"""Fixtures that start the real things the API needs: Postgres, Valkey, a model server, the API.

Every dependency is started by the harness itself; if one cannot start, the tests error
(they never skip), so a green run always means the real components were exercised.
"""

import secrets
import uuid
from collections.abc import Iterator

import httpx
import pytest

from morgana.devtools.openai_server import FakeOpenAIProcess
from morgana.devtools.processes import ApiProcess, migrate
from morgana.devtools.services import EmbeddedPostgres, EmbeddedValkey

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
