"""Pooled connections are tested before use only once they have been idle (DB_PING_AFTER_IDLE_SECONDS),
on the real Postgres: a connection the server dropped while it sat in the pool is replaced before a
request gets it; one handed back a moment ago is used without the round trip."""

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from morgana.api.config import ApiSettings
from morgana.api.db import create_engine


def engine_for(api_env: dict[str, str], ping_after_idle: float) -> AsyncEngine:
    env = {key.lower(): value for key, value in api_env.items()}
    settings = ApiSettings(_env_file=None, **{**env, "db_pool_size": "1", "db_max_overflow": "0"})
    return create_engine(settings.model_copy(update={"db_ping_after_idle_seconds": ping_after_idle}))


async def backend(engine: AsyncEngine) -> int:
    """The server process behind the pool's one connection."""
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


async def drop(api_env: dict[str, str], pid: int) -> None:
    """What a database restart does to a pooled connection (from a connection of its own)."""
    admin = engine_for(api_env, 0)
    try:
        async with admin.connect() as conn:
            assert await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await admin.dispose()


def test_a_connection_dropped_while_idle_is_replaced_before_a_request_gets_it(api_env: dict[str, str]) -> None:
    async def run() -> None:
        engine = engine_for(api_env, 0.2)
        try:
            dropped = await backend(engine)
            await drop(api_env, dropped)
            await asyncio.sleep(0.3)
            assert await backend(engine) != dropped  # no error: pinged, found dead, replaced
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_a_connection_handed_back_a_moment_ago_is_used_without_a_ping(api_env: dict[str, str]) -> None:
    """The trade made for the round trip: a connection dropped within the idle window fails its
    one request (which the caller sees as a 503 or an error event), and the pool replaces it."""

    async def run() -> None:
        engine = engine_for(api_env, 60)
        try:
            dropped = await backend(engine)
            await drop(api_env, dropped)
            with pytest.raises(DBAPIError) as failed:
                await backend(engine)
            assert failed.value.connection_invalidated
            assert await backend(engine) != dropped
        finally:
            await engine.dispose()

    asyncio.run(run())
