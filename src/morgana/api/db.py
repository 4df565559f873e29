"""The async engine and session factory, with pool gauges for /metrics."""

from typing import cast

from sqlalchemy import QueuePool, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from morgana.api import metrics
from morgana.api.config import ApiSettings


def create_engine(settings: ApiSettings) -> AsyncEngine:
    engine = create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        pool_pre_ping=True,
        # Errors name the statement, never its values: chat content and hashes stay out of logs.
        hide_parameters=True,
        # A dead Postgres must answer with a 503 in seconds, not hang a request.
        connect_args={"connect_timeout": 5},
    )
    _track_pool(engine)
    return engine


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
