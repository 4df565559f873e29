"""The rate limiter's Redis pool under a burst, on the real Valkey: past REDIS_MAX_CONNECTIONS a
check waits for a free connection (up to REDIS_POOL_TIMEOUT_SECONDS) instead of failing."""

import asyncio
import time

import redis.asyncio

from morgana.api.config import ApiSettings
from morgana.api.ratelimit import Decision, RateLimitBackendDown, RateLimiter

PAUSE_MS = 1200  # under the pool's 2 s socket timeout: the held connection's reply is only late


def _limiter(api_env: dict[str, str], pool_timeout: float) -> RateLimiter:
    settings = ApiSettings(
        _env_file=None,
        **{key.lower(): value for key, value in api_env.items()},
        redis_max_connections=1,
        redis_pool_timeout_seconds=pool_timeout,
    )
    return RateLimiter(settings)


async def _burst_while_redis_is_slow(limiter: RateLimiter, redis_url: str) -> list[Decision | BaseException]:
    """Three checks at once on a one-connection pool while Valkey holds every reply for a while:
    the first holds the connection, the others wait for it."""
    await limiter.hit("chat", "warm-up")  # the pool's one connection is open
    admin = redis.asyncio.from_url(redis_url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
    finally:
        await admin.aclose()
    return await asyncio.gather(*(limiter.hit("chat", f"burst-{n}") for n in range(3)), return_exceptions=True)


def test_a_burst_past_the_redis_pool_waits_for_a_connection(api_env: dict[str, str]) -> None:
    limiter = _limiter(api_env, pool_timeout=30)
    started = time.monotonic()
    outcomes = asyncio.run(_burst_while_redis_is_slow(limiter, api_env["REDIS_URL"]))
    assert outcomes == [Decision(allowed=True)] * 3
    assert time.monotonic() - started >= PAUSE_MS / 1000  # they did wait for the slow reply


def test_a_check_that_waits_past_the_pool_timeout_is_refused_as_the_store_down(api_env: dict[str, str]) -> None:
    limiter = _limiter(api_env, pool_timeout=0.3)
    outcomes = asyncio.run(_burst_while_redis_is_slow(limiter, api_env["REDIS_URL"]))
    assert outcomes[0] == Decision(allowed=True)  # it held the connection through the pause
    assert all(isinstance(outcome, RateLimitBackendDown) for outcome in outcomes[1:]), outcomes
