"""Honest failure: readiness names the broken dependency, requests get a 503 JSON, not a hang."""

import httpx
import pytest

from morgana_devtools.processes import ApiProcess
from morgana_devtools.services import free_port
from tests.conftest import STRONG_PASSWORD, bearer, new_session, register, unique_email


@pytest.fixture(scope="module")
def api_with_dead_redis(api_env: dict, tmp_path_factory: pytest.TempPathFactory):
    env = {**api_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with ApiProcess(env, tmp_path_factory.mktemp("dead-redis") / "api.log") as process:
        yield process


@pytest.fixture(scope="module")
def api_with_dead_postgres(api_env: dict, tmp_path_factory: pytest.TempPathFactory):
    env = {**api_env, "DATABASE_URL": f"postgresql://morgana@127.0.0.1:{free_port()}/morgana"}
    with ApiProcess(env, tmp_path_factory.mktemp("dead-pg") / "api.log") as process:
        yield process


@pytest.fixture(scope="module")
def api_without_livekit(api_env: dict, tmp_path_factory: pytest.TempPathFactory):
    env = {k: v for k, v in api_env.items() if not k.startswith("LIVEKIT_API")}
    with ApiProcess(env, tmp_path_factory.mktemp("no-livekit") / "api.log") as process:
        yield process


def test_readiness_is_ok_when_everything_answers(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "components": {"postgres": "ok", "redis": "ok"}}


def test_dead_redis_fails_readiness_and_rate_limited_calls(api_with_dead_redis: ApiProcess) -> None:
    with httpx.Client(base_url=api_with_dead_redis.url, timeout=20) as http:
        assert http.get("/health").status_code == 200  # alive, just not ready
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "components": {"postgres": "ok", "redis": "unreachable"}}
        response = http.post("/api/v1/auth/register", json={"email": unique_email(), "password": STRONG_PASSWORD})
        assert response.status_code == 503
        assert response.json() == {"detail": "Rate limiting store (Redis) is unavailable"}
        assert response.headers["retry-after"] == "5"


def test_dead_postgres_fails_readiness_and_requests_with_503(api_with_dead_postgres: ApiProcess) -> None:
    with httpx.Client(base_url=api_with_dead_postgres.url, timeout=20) as http:
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["components"]["postgres"] in {"unreachable", "timeout"}
        response = http.post("/api/v1/auth/register", json={"email": unique_email(), "password": STRONG_PASSWORD})
        assert response.status_code == 503
        assert response.json() == {"detail": "Database unavailable", "component": "postgres"}
        login = http.post("/api/v1/auth/login", data={"username": unique_email(), "password": STRONG_PASSWORD})
        assert login.status_code == 503


def test_livekit_token_without_livekit_configured_is_503(api_without_livekit: ApiProcess) -> None:
    with httpx.Client(base_url=api_without_livekit.url, timeout=20) as http:
        user = register(http)
        session = new_session(http, user["token"]["access_token"])
        response = http.post("/api/v1/livekit/token", headers=bearer(session["token"]["access_token"]))
        assert response.status_code == 503
        assert "LIVEKIT_API_KEY" in response.json()["detail"]
