"""Two API processes on one Postgres and one Redis agree; history survives a restart."""

import httpx
import pytest

from morgana.devtools.processes import ApiProcess
from tests.api.sse import stream_chat
from tests.conftest import bearer, new_session, register


@pytest.fixture(scope="module")
def replicas(api_env: dict, tmp_path_factory: pytest.TempPathFactory):
    env = {**api_env, "RATE_LIMIT_SESSION": "4/minute", "RATE_LIMIT_LOGIN": "3/minute"}
    logs = tmp_path_factory.mktemp("replicas")
    first, second = ApiProcess(env, logs / "a.log"), ApiProcess(env, logs / "b.log")
    with first, second:
        yield first, second


def test_history_written_through_one_replica_is_read_through_the_other(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        user = register(a)
        session = new_session(b, user["token"]["access_token"])  # token from A works on B
        token = session["token"]["access_token"]
        assert stream_chat(a, token, "written via A").status_code == 200
        assert stream_chat(b, token, "written via B").status_code == 200
        seen_by_a = a.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]
        seen_by_b = b.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]
        assert seen_by_a == seen_by_b
        assert [m["content"] for m in seen_by_a] == [
            "written via A", "You said: written via A", "written via B", "You said: written via B",
        ]


def test_rate_limits_are_shared_by_the_replicas(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        token = register(a)["token"]["access_token"]
        statuses = [
            (a if n % 2 == 0 else b).post("/api/v1/auth/session", headers=bearer(token)).status_code
            for n in range(4)
        ]
        assert statuses == [200, 200, 200, 200]
        refused = b.post("/api/v1/auth/session", headers=bearer(token))
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["detail"].startswith("Too many requests")
        assert a.post("/api/v1/auth/session", headers=bearer(token)).status_code == 429
        # Limits are per user: somebody else is unaffected.
        other = register(b)["token"]["access_token"]
        assert a.post("/api/v1/auth/session", headers=bearer(other)).status_code == 200


def test_login_attempts_are_limited_per_client(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        attempts = [
            (a if n % 2 else b).post("/api/v1/auth/login", data={"username": "x@example.com", "password": "nope"})
            for n in range(4)
        ]
        assert [r.status_code for r in attempts] == [401, 401, 401, 429]
        metrics = a.get("/metrics").text + b.get("/metrics").text
        assert 'morgana_api_rate_limited_total{limit="login"}' in metrics


def test_history_and_tokens_survive_an_api_restart(api_env: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    process = ApiProcess(api_env, tmp_path_factory.mktemp("restart") / "api.log").start()
    try:
        with httpx.Client(base_url=process.url, timeout=20) as http:
            user = register(http)
            token = new_session(http, user["token"]["access_token"])["token"]["access_token"]
            stream_chat(http, token, "remember me")
        process.stop()
        process.start()
        with httpx.Client(base_url=process.url, timeout=20) as http:
            stored = http.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]
            assert [m["content"] for m in stored] == ["remember me", "You said: remember me"]
    finally:
        process.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["uvicorn", "gunicorn"])
def test_behind_a_trusted_proxy_limits_count_per_forwarded_client(api_env: dict, tmp_path, workers: int) -> None:
    """The chart sets FORWARDED_ALLOW_IPS so that, behind an Ingress, each client has its own limit."""
    env = {**api_env, "RATE_LIMIT_LOGIN": "2/minute", "FORWARDED_ALLOW_IPS": "*"}
    with ApiProcess(env, tmp_path / "api.log", workers=workers) as api, \
            httpx.Client(base_url=api.url, timeout=20) as client:
        def login(ip: str) -> int:
            return client.post("/api/v1/auth/login", data={"username": "x@example.com", "password": "nope"},
                               headers={"X-Forwarded-For": ip}).status_code

        first, second = f"203.0.113.{workers}", f"198.51.100.{workers}"
        assert [login(first) for _ in range(3)] == [401, 401, 429]
        assert login(second) == 401, "another client behind the same proxy was limited too"


def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(api_env: dict, tmp_path) -> None:
    # Only some other address is a trusted proxy (uvicorn's default trusts loopback, i.e. us).
    env = {**api_env, "RATE_LIMIT_LOGIN": "2/minute", "FORWARDED_ALLOW_IPS": "10.255.255.1"}
    with ApiProcess(env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=20) as client:
        statuses = [client.post("/api/v1/auth/login", data={"username": "x@example.com", "password": "nope"},
                                headers={"X-Forwarded-For": f"192.0.2.{n}"}).status_code for n in range(3)]
        assert statuses == [401, 401, 429], "a client escaped its limit by forging X-Forwarded-For"
