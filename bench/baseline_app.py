"""The benchmark's BASELINE: a raw Starlette app doing the same I/O as Morgana, no framework logic.

Run by ``bench/api_bench.py`` as
``python -m uvicorn bench.baseline_app:app --port P --log-level warning --no-access-log``
(uvicorn defaults: uvloop + httptools when installed, exactly like the API).

Environment:
  BASELINE_DATABASE_URL  async SQLAlchemy URL (postgresql+psycopg://...) of the shared database
  BASELINE_MODEL_URL     the model server's base URL, ending in /v1
  BASELINE_MODEL_KEY     its API key
  BASELINE_MODEL_NAME    the model name to request

Endpoints:
  POST /session       insert one row into ``baseline_sessions``; answer ``{"session_id", "name"}``
  POST /chat/stream   relay a streamed chat completion as SSE ``{"content", "done"}`` events
  GET  /health        200
"""

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DATABASE_URL = os.environ.get("BASELINE_DATABASE_URL", "")
MODEL_URL = os.environ.get("BASELINE_MODEL_URL", "http://127.0.0.1:9/v1").rstrip("/")
MODEL_KEY = os.environ.get("BASELINE_MODEL_KEY", "")
MODEL_NAME = os.environ.get("BASELINE_MODEL_NAME", "gpt-4o-mini")

CREATE_TABLE = text(
    "CREATE TABLE IF NOT EXISTS baseline_sessions "
    "(id uuid primary key, user_id bigint, name text, created_at timestamptz default now())"
)
INSERT = text("INSERT INTO baseline_sessions (id, user_id, name) VALUES (:id, :user_id, :name)")
SESSION_NAME = "baseline-session"
USER_ID = 1


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Same pool shape as Morgana's (10 + 10); no pre-ping: the minimum that does the I/O.
    engine = create_async_engine(DATABASE_URL, pool_size=10, max_overflow=10, pool_timeout=5)
    async with engine.begin() as conn:
        await conn.execute(CREATE_TABLE)
    # Same connection limits as the openai SDK's default client used by Morgana.
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
    )
    app.state.engine, app.state.client = engine, client
    try:
        yield
    finally:
        await client.aclose()
        await engine.dispose()


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def create_session(request: Request) -> Response:
    session_id = uuid.uuid4()
    async with request.app.state.engine.begin() as conn:
        await conn.execute(INSERT, {"id": session_id, "user_id": USER_ID, "name": SESSION_NAME})
    return JSONResponse({"session_id": str(session_id), "name": SESSION_NAME})


def _event(content: str, done: bool) -> bytes:
    return f"data: {json.dumps({'content': content, 'done': done})}\n\n".encode()


async def chat_stream(request: Request) -> Response:
    body = await request.json()
    payload = {
        "model": MODEL_NAME,
        "messages": body["messages"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    client: httpx.AsyncClient = request.app.state.client

    async def events() -> AsyncIterator[bytes]:
        async with client.stream(
            "POST",
            f"{MODEL_URL}/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {MODEL_KEY}"},
        ) as upstream:
            upstream.raise_for_status()
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        yield _event(content, False)
        yield _event("", True)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


app = Starlette(
    routes=[
        Route("/health", health, methods=["GET"]),
        Route("/session", create_session, methods=["POST"]),
        Route("/chat/stream", chat_stream, methods=["POST"]),
    ],
    lifespan=lifespan,
)
