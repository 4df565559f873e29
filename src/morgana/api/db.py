"""The async engine and session factory, with pool gauges for /metrics."""

import time
from typing import Any, cast

from sqlalchemy import QueuePool, event, exc
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from morgana.api import metrics
from morgana.api.config import ApiSettings


def create_engine(settings: ApiSettings) -> AsyncEngine:
    engine = create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # Errors name the statement, never its values: chat content and hashes stay out of logs.
        hide_parameters=True,
        # A dead Postgres must answer with a 503 in seconds, not hang a request.
        connect_args={"connect_timeout": 5},
    )
    _track_pool(engine)
    _ping_after_idle(engine, settings.db_ping_after_idle_seconds)
    return engine


def _ping_after_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """SQLAlchemy's pre-ping, for connections unused for `idle_seconds` only. Under load a
    connection comes back to the pool within milliseconds, and pinging it anyway was a round trip
    per request (about a tenth of a session creation's CPU). A connection found dead is replaced,
    with every connection opened before it, as pool_pre_ping does."""
    dialect = cast(DefaultDialect, engine.sync_engine.dialect)
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "connect")
    @event.listens_for(pool, "checkin")
    def _idle_from_now(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < idle_seconds:
            return
        # What pool_pre_ping calls: False for a connection the server dropped.
        if not dialect._do_ping_w_event(dbapi_connection):
            raise exc.InvalidatePoolError()


def _track_pool(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool
    # pool_size= gives an AsyncAdaptedQueuePool, a QueuePool (typed as a plain Pool, which has no size()).
    metrics.DB_POOL_SIZE.set(cast(QueuePool, pool).size())

    @event.listens_for(pool, "checkout")
    def _on_checkout(*_: object) -> None:
        metrics.DB_POOL_CHECKED_OUT.inc()

    @event.listens_for(pool, "checkin")
    def _on_checkin(*_: object) -> None:
        metrics.DB_POOL_CHECKED_OUT.dec()


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, each statement its own transaction: a request that needs one statement (a
    chat turn's session and history, a new session) skips the BEGIN and ROLLBACK round trips."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")
