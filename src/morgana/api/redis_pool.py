"""Connections to Redis, for the rate limits and the chat streams' event log."""

import redis.asyncio

from morgana.api.config import ApiSettings


def blocking_pool(
    settings: ApiSettings, url: str, socket_timeout: float | None = 2
) -> redis.asyncio.BlockingConnectionPool:
    # A blocking pool: past REDIS_MAX_CONNECTIONS a request waits (REDIS_POOL_TIMEOUT_SECONDS)
    # for a free connection. redis-py's default pool refuses with "Too many connections"
    # instead, which turned a burst of 200 logins into 100 false "Redis unavailable" 503s;
    # a 2 s wait still refused some of 500 chat streams opened at once.
    return redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_seconds,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
    )
