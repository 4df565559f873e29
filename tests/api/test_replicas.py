"""Two API processes on one Postgres and one Redis agree; history survives a restart."""

import httpx
import pytest

from morgana_devtools.processes import ApiProcess
from tests.api.sse import stream_chat
from tests.conftest import STRONG_PASSWORD, bearer, new_session, register, unique_email


@pytest.fixture(scope="module")
def replicas(api_env: dict, tmp_path_factory: pytest.TempPathFactory):
    env = {**api_env, "RATE_LIMIT_SESSION": "4/minute", "RATE_LIMIT_LOGIN": "3/minute", "RATE_LIMIT_CHAT": "3/minute"}
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
            "written via A",
            "You said: written via A",
            "written via B",
            "You said: written via B",
        ]


def test_rate_limits_are_shared_by_the_replicas(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        token = register(a)["token"]["access_token"]
        statuses = [
            (a if n % 2 == 0 else b).post("/api/v1/auth/session", headers=bearer(token)).status_code for n in range(4)
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


def test_chat_turns_are_limited_per_session_by_the_replicas_together(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        user_token = register(a)["token"]["access_token"]
        limited, other = (new_session(a, user_token)["token"]["access_token"] for _ in range(2))
        statuses = [stream_chat(a if n % 2 == 0 else b, limited, f"turn {n}").status_code for n in range(3)]
        assert statuses == [200, 200, 200]
        refused = stream_chat(b, limited, "one too many")
        assert refused.status_code == 429
        assert refused.last["detail"].startswith("Too many requests")
        as_json = a.post(
            "/api/v1/chatbot/chat",
            json={"messages": [{"role": "user", "content": "one too many"}]},
            headers=bearer(limited),
        )
        assert as_json.status_code == 429
        assert 1 <= int(as_json.headers["retry-after"]) <= 60
        # Refused turns were not stored; the session's history is still readable, and the
        # user's other session is not limited.
        stored = a.get("/api/v1/chatbot/messages", headers=bearer(limited)).json()["messages"]
        assert [m["content"] for m in stored if m["role"] == "user"] == ["turn 0", "turn 1", "turn 2"]
        assert stream_chat(b, other, "elsewhere").status_code == 200


def test_login_attempts_are_limited_per_client(replicas) -> None:
    first, second = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        attempts = [
            (a if n % 2 else b).post("/api/v1/auth/login", data={"username": unique_email(), "password": "nope"})
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
    """FORWARDED_ALLOW_IPS names the proxy (here this test, on loopback): each client behind it has
    its own limit, and the client is the right-most hop the proxy did not vouch for, so what a
    client writes into X-Forwarded-For itself (to the left) changes nothing."""
    env = {**api_env, "RATE_LIMIT_LOGIN": "2/minute", "FORWARDED_ALLOW_IPS": "127.0.0.0/8"}
    with (
        ApiProcess(env, tmp_path / "api.log", workers=workers) as api,
        httpx.Client(base_url=api.url, timeout=20) as client,
    ):

        def login(forwarded_for: str) -> int:
            return client.post(
                "/api/v1/auth/login",
                data={"username": unique_email(), "password": "nope"},
                headers={"X-Forwarded-For": forwarded_for},
            ).status_code

        first, second = f"203.0.113.{workers}", f"198.51.100.{workers}"
        # A client rotating a forged first entry is still the address the proxy appended.
        assert [login(f"192.0.2.{n}, {first}") for n in range(3)] == [401, 401, 429]
        assert login(second) == 401, "another client behind the same proxy was limited too"


def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(api_env: dict, tmp_path) -> None:
    # Only some other address is a trusted proxy (uvicorn's default trusts loopback, i.e. us).
    env = {**api_env, "RATE_LIMIT_LOGIN": "2/minute", "FORWARDED_ALLOW_IPS": "10.255.255.1"}
    with ApiProcess(env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=20) as client:
        statuses = [
            client.post(
                "/api/v1/auth/login",
                data={"username": unique_email(), "password": "nope"},
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            ).status_code
            for n in range(3)
        ]
        assert statuses == [401, 401, 429], "a client escaped its limit by forging X-Forwarded-For"


def test_failed_logins_lock_the_account_from_every_address_and_tell_nothing(api_env: dict, tmp_path) -> None:
    """Guessing one account's password from many addresses: after RATE_LIMIT_LOGIN_ACCOUNT failures
    the account is refused, even with the right password, from any address; an address that does
    not exist is refused the same way, so the lockout tells no one which accounts exist."""
    env = {**api_env, "RATE_LIMIT_LOGIN_ACCOUNT": "3/minute", "FORWARDED_ALLOW_IPS": "127.0.0.0/8"}
    with ApiProcess(env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=20) as client:

        def login(email: str, password: str, n: int) -> httpx.Response:
            return client.post(
                "/api/v1/auth/login",
                data={"username": email, "password": password},
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )

        victim, nobody, bystander = unique_email(), unique_email(), unique_email()
        register(client, victim)
        register(client, bystander)
        # A success clears the count: two failures, a success, then three more failures to lock.
        assert [login(victim, "Wrong_Passw0rd!", n).status_code for n in range(2)] == [401, 401]
        assert login(victim, STRONG_PASSWORD, 2).status_code == 200
        results = {}
        for email in (victim, nobody):
            assert [login(email, "Wrong_Passw0rd!", n).status_code for n in range(3, 6)] == [401, 401, 401]
            results[email] = login(email, STRONG_PASSWORD, 99)
        locked, unknown = results[victim], results[nobody]
        assert locked.status_code == unknown.status_code == 429
        assert locked.json() == unknown.json()
        assert locked.json()["detail"].startswith("Too many failed logins for this account")
        assert 1 <= int(locked.headers["retry-after"]) <= 60
        assert login(bystander, STRONG_PASSWORD, 7).status_code == 200, "another account was locked too"


def test_a_login_flood_queues_then_sheds_and_keeps_memory_and_the_pool(api_env: dict, tmp_path) -> None:
    """200 logins at once on one worker: at most PASSWORD_HASH_CONCURRENCY argon2 checks run (64 MiB
    each), PASSWORD_HASH_QUEUE wait, the rest get a 503 with Retry-After at once; no check holds a
    database connection, so the (tiny) pool never runs dry, and the worker's memory stays bounded."""
    import asyncio
    import threading

    import psutil

    env = {
        **api_env,
        "PASSWORD_HASH_CONCURRENCY": "2",
        "PASSWORD_HASH_QUEUE": "8",
        "DB_POOL_SIZE": "2",
        "DB_MAX_OVERFLOW": "0",
    }
    with ApiProcess(env, tmp_path / "api.log") as api:
        email = unique_email()
        with httpx.Client(base_url=api.url, timeout=20) as client:
            register(client, email)
        process = psutil.Process(api.process.pid)  # type: ignore[union-attr]
        baseline = process.memory_info().rss
        peak = [baseline]
        flooding = threading.Event()

        def sample() -> None:
            while not flooding.wait(0.02):
                peak[0] = max(peak[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def flood() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as http:
                return await asyncio.gather(
                    *(
                        http.post("/api/v1/auth/login", data={"username": email, "password": "Wrong_Passw0rd!"})
                        for _ in range(200)
                    )
                )

        responses = asyncio.run(flood())
        flooding.set()
        sampler.join()
    statuses = [r.status_code for r in responses]
    busy = [r for r in responses if r.status_code == 503]
    assert set(statuses) <= {401, 503}, sorted(set(statuses))
    assert statuses.count(401) >= 10, statuses.count(401)  # 2 running + 8 waiting, at the least
    assert busy, "200 at once must overflow a queue of 8"
    from collections import Counter

    details = Counter(r.json()["detail"] for r in busy)
    assert set(details) == {"Server busy checking passwords; retry shortly"}, details
    for response in busy:
        assert response.headers["retry-after"] == "1"
    grown = (peak[0] - baseline) / 2**20
    print(
        f"\nlogin flood: {statuses.count(401)} checked (401), {len(busy)} shed (503 busy); "
        f"the worker grew by {grown:.0f} MiB at its peak"
    )
    assert grown < 2 * 64 + 96, f"the worker grew by {grown:.0f} MiB under the flood"
