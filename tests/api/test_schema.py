"""The database schema from migrations matches the models; the OpenAPI document is complete."""

import asyncio

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from morgana.api.config import ApiSettings
from morgana.api.models import Base


def test_migrations_produce_exactly_the_models_schema(api_env: dict) -> None:
    url = ApiSettings(
        _env_file=None,
        database_url=api_env["DATABASE_URL"],
        environment="development",
        jwt_secret_key="x",
        openai_api_key="x",
    ).sqlalchemy_url

    async def diff() -> list:
        engine = create_async_engine(url)
        async with engine.connect() as connection:
            changes = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
        await engine.dispose()
        return changes

    assert asyncio.run(diff()) == []


def test_openapi_documents_every_endpoint_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/health", "get"),
        ("/ready", "get"),
        ("/api/v1/auth/register", "post"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/password", "post"),
        ("/api/v1/auth/session", "post"),
        ("/api/v1/auth/sessions", "get"),
        ("/api/v1/auth/sessions/{session_id}", "patch"),
        ("/api/v1/auth/sessions/{session_id}", "delete"),
        ("/api/v1/auth/sessions/{session_id}/token", "post"),
        ("/api/v1/chatbot/chat/stream", "post"),
        ("/api/v1/chatbot/chat/stream", "get"),
        ("/api/v1/chatbot/chat", "post"),
        ("/api/v1/chatbot/messages", "get"),
        ("/api/v1/chatbot/messages", "delete"),
        ("/api/v1/chatbot/turns/{turn_id}", "delete"),
        ("/api/v1/livekit/token", "post"),
        ("/api/v1/livekit/call-session", "post"),
    }
    assert {(p, m) for p, ops in paths.items() for m in ops} == expected
    stream = paths["/api/v1/chatbot/chat/stream"]["post"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert {"401", "403", "422", "429", "503"} <= set(stream["responses"])
    resume = paths["/api/v1/chatbot/chat/stream"]["get"]
    assert {"400", "401", "410", "503"} <= set(resume["responses"])
    assert {p["name"] for p in resume["parameters"]} >= {"Last-Event-ID", "last_event_id"}
    schemas = spec["components"]["schemas"]
    for name in (
        "RegisterRequest",
        "PasswordChange",
        "UserResponse",
        "SessionResponse",
        "ChatRequest",
        "LiveKitTokenResponse",
        "CallSessionRequest",
    ):
        assert schemas[name].get("examples"), name
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
