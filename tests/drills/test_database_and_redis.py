"""Postgres restarted under ten open chat streams; Redis stopped and started under load."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess, migrate
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey, eventually
from tests.conftest import base_env, bearer, new_session, register
from tests.drills.conftest import Streams, outcome, ready


def test_postgres_restarted_mid_stream_loses_no_acknowledged_turn_and_recovers_by_itself(
    own_postgres: EmbeddedPostgres, valkey: EmbeddedValkey, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    env = base_env(own_postgres.url(), valkey.url, fake_openai.base_url)
    migrate(env)
    # Five replies end while Postgres is down (1.5 s), five after it is back (5 s).
    for tokens in (30,) * 5 + (100,) * 5:
        fake_openai.queue_scenario(tokens=tokens, delay_ms=50)
    try:
        with ApiProcess(env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=30) as http:
            streams = Streams(api.url)
            streams.prepare(10)
            streams.start()
            eventually(
                lambda: fake_openai.stats()["open_streams"] == 10,
                10,
                interval=0.05,
                what="every stream open and streaming",
            )
            own_postgres.restart(downtime=2.0)
            back = time.monotonic()
            streams.join()
            joined = time.monotonic()
            eventually(lambda: ready(http), 5, what="/ready 200 again")
            recovered = time.monotonic() - joined
            assert time.monotonic() - back < 60

            outcomes = [outcome(turn) for turn in streams.turns]
            assert set(outcomes) == {"completed", "error:history_unavailable"}, outcomes
            for turn in streams.turns:
                stored = streams.history(http, turn)
                if turn.acknowledged:  # done: true was sent: the turn is stored, as it was streamed
                    assert turn.result is not None
                    assert stored == [("user", turn.words), ("assistant", turn.result.text)], stored
                else:  # an error event: nothing of it is stored, so it can simply be sent again
                    assert stored == [], stored
            # And the API serves new turns without a restart.
            user = register(http)
            session = new_session(http, user["token"]["access_token"])
            from tests.api.sse import stream_chat

            assert (
                stream_chat(http, session["token"]["access_token"], "after the outage").text
                == "You said: after the outage"
            )
        print(
            f"\npostgres drill: {outcomes.count('completed')} completed, "
            f"{len(outcomes) - outcomes.count('completed')} ended with an error event; /ready 200 "
            f"{recovered:.1f} s after Postgres returned"
        )
    finally:
        fake_openai.reset()


def test_redis_stopped_and_started_gives_only_the_documented_503_and_limits_resume(
    api_env: dict, tmp_path: Path
) -> None:
    """Rate limits live in Redis: while it is down, limited endpoints answer 503 (no other 5xx),
    the rest serve; once it is back, limits count again, with no restart."""
    redis = EmbeddedValkey().start()
    env = {**api_env, "REDIS_URL": redis.url, "RATE_LIMIT_SESSION": "5/minute"}
    try:
        with ApiProcess(env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=30) as http:
            user_token = register(http)["token"]["access_token"]
            assert http.post("/api/v1/auth/session", headers=bearer(user_token)).status_code == 200
            port = redis.port
            redis.stop()
            during = [http.post("/api/v1/auth/session", headers=bearer(user_token)) for _ in range(5)]
            during += [http.get("/api/v1/auth/sessions", headers=bearer(user_token)), http.get("/health")]
            statuses = [r.status_code for r in during]
            assert set(statuses) <= {200, 503}, statuses
            assert statuses[:5] == [503] * 5 and statuses[5:] == [200, 200], statuses
            assert during[0].json()["detail"] == "Rate limiting store (Redis) is unavailable"
            assert during[0].headers["retry-after"] == "5"
            assert http.get("/ready").status_code == 503

            redis = EmbeddedValkey(port=port).start()  # back, empty, on the same address
            eventually(lambda: ready(http), 10, what="/ready 200 once Redis is back")
            after = [http.post("/api/v1/auth/session", headers=bearer(user_token)).status_code for _ in range(6)]
            assert after == [200] * 5 + [429], after
    finally:
        redis.stop()
