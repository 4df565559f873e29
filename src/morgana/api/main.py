"""The FastAPI application factory."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics

from morgana import __version__
from morgana.api.config import ApiSettings, get_settings
from morgana.api.db import autocommit, create_engine, create_session_factory
from morgana.api.errors import install_error_handlers
from morgana.api.middleware import AccessLogMiddleware, BodySizeLimitMiddleware
from morgana.api.playground import mount_playground
from morgana.api.ratelimit import RateLimiter
from morgana.api.routes import auth, chatbot, health, livekit
from morgana.api.security import PasswordHasher
from morgana.api.services.agentless import AgentlessRoomsTask
from morgana.api.services.chat import ChatAgent
from morgana.api.services.livekit import VoiceRooms
from morgana.api.services.stream_log import create_stream_log
from morgana.api.telemetry import configure_tracing
from morgana.core.logging import configure_logging

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# Per-route latency buckets fine enough for the dashboards' p50-p99 of fast routes (the
# instrumentator's default is 0.1 / 0.5 / 1 s); the all-routes histogram keeps its finer set.
ROUTE_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MAX_BODY_BYTES = 1024 * 1024

DESCRIPTION = """
Morgana's API: register or log in for a **user token**, create a chat session for a
**session token**, then chat (streamed over Server-Sent Events), read or clear the
session's history, and get a LiveKit token to talk to the voice agent.
"""


def start_agentless_rooms(settings: ApiSettings) -> AgentlessRoomsTask | None:
    """Send the agent to callers left alone (morgana.api.services.agentless), unless voice or the
    check is off."""
    if not settings.livekit_configured or settings.livekit_redispatch_seconds <= 0:
        return None
    return AgentlessRoomsTask(settings)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format, request_id=correlation_id.get)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.engine = engine
        app.state.session_factory = create_session_factory(engine)
        app.state.autocommit_engine = autocommit(engine)
        app.state.rate_limiter = RateLimiter(settings)
        app.state.password_hasher = PasswordHasher(settings.password_hash_concurrency, settings.password_hash_queue)
        app.state.voice_rooms = VoiceRooms(settings)
        app.state.agent = ChatAgent(settings)
        app.state.stream_log = create_stream_log(settings)
        agentless = start_agentless_rooms(settings)
        if tracer_provider is not None:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)
        log.info(
            "api started",
            extra={
                "environment": settings.environment.value,
                "rate_limit_store": "redis" if settings.redis_url else "memory",
            },
        )
        yield
        if agentless is not None:
            await agentless.stop()
        await app.state.voice_rooms.aclose()
        await app.state.agent.aclose()
        if app.state.stream_log is not None:
            await app.state.stream_log.aclose()
        await engine.dispose()
        if tracer_provider is not None:
            tracer_provider.shutdown()

    docs = settings.docs_enabled
    app = FastAPI(
        title="Morgana API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    install_error_handlers(app)

    app.include_router(health.router)
    for router in (auth.router, chatbot.router, livekit.router):
        app.include_router(router, prefix=API_PREFIX)
    if settings.playground_enabled:
        mount_playground(app, settings)

    instrumentator = (
        Instrumentator(
            should_group_status_codes=False,
            excluded_handlers=["/metrics"],
            # Requests in flight, chat streams included (summed over gunicorn workers: livesum).
            should_instrument_requests_inprogress=True,
            inprogress_name="morgana_api_http_requests_inprogress",
            inprogress_labels=True,
        )
        .add(
            http_metrics.default(
                metric_namespace="morgana", metric_subsystem="api", latency_lowr_buckets=ROUTE_LATENCY_BUCKETS
            )
        )
        .instrument(app, metric_namespace="morgana", metric_subsystem="api")
    )
    if not settings.api_metrics_port:  # else served on API_METRICS_PORT only (cli.serve, gunicorn_conf)
        instrumentator.expose(app, endpoint="/metrics", include_in_schema=False)

    tracer_provider = configure_tracing(settings.otel_service_name, settings.otel_exporter_otlp_endpoint)
    if tracer_provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # Model calls are traced by the chat service's own `llm.chat` span.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="health,ready,metrics")

    # Added last = outermost: ids exist before anything logs, oversize bodies stop first.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID")
    return app
