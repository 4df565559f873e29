"""Failure paths that need a hand inside the API process: the app runs in-process (its real
lifespan, the real Postgres, Valkey and model stand-in) so that a test can hold its database pool
or make Postgres refuse one session's writes in the middle of a turn."""

import asyncio
import gc
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from morgana.api.config import ApiSettings
from morgana.api.main import create_app
from morgana.api.services.utterance import Utterance
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually_async
from tests.conftest import STRONG_PASSWORD, bearer, unique_email

Client = httpx.AsyncClient


@pytest.fixture(scope="module")
def app(api_env: dict[str, str]) -> Any:
    """One app for the module (its HTTP metrics are registered once per process), with a small
    pool that a test can exhaust; each test runs its lifespan."""
    env = {**api_env, "DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT_SECONDS": "0.5"}
    return create_app(ApiSettings(_env_file=None, **{key.lower(): value for key, value in env.items()}))


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[Client]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://morgana.test", timeout=30) as client:
            yield client


async def new_chat_session(client: Client) -> tuple[str, str]:
    """(session id, session token) of a new user's new chat session."""
    registered = await client.post("/api/v1/auth/register", json={"email": unique_email(), "password": STRONG_PASSWORD})
    assert registered.status_code == 200, registered.text
    created = await client.post("/api/v1/auth/session", headers=bearer(registered.json()["token"]["access_token"]))
    assert created.status_code == 200, created.text
    return created.json()["session_id"], created.json()["token"]["access_token"]


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\r\n\r\n" if "\r\n" in body else "\n\n"):
        lines = block.splitlines()
        data = [line[len("data:") :].strip() for line in lines if line.startswith("data:")]
        if not data:
            continue  # a ping comment
        kind = next((line[len("event:") :].strip() for line in lines if line.startswith("event:")), "message")
        events.append((kind, json.loads("\n".join(data))))
    return events


def chat_turns(outcome: str, transport: str) -> float:
    return (
        REGISTRY.get_sample_value("morgana_api_chat_turns_total", {"outcome": outcome, "transport": transport}) or 0.0
    )


@asynccontextmanager
async def writes_refused(app: Any, session_id: str) -> AsyncIterator[None]:
    """Postgres refuses to store messages of this one session (a trigger), as a database that
    fails between reading a turn's history and storing the turn would."""
    name = "refuse_" + uuid.UUID(session_id).hex
    async with app.state.session_factory() as db:
        await db.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.session_id = '{session_id}' THEN RAISE EXCEPTION 'writes refused for the test'; END IF; "
                f"RETURN NEW; END $$"
            )
        )
        await db.execute(
            text(f"CREATE TRIGGER {name} BEFORE INSERT ON chat_messages FOR EACH ROW EXECUTE FUNCTION {name}()")
        )
        await db.commit()
    try:
        yield
    finally:
        async with app.state.session_factory() as db:
            await db.execute(text(f"DROP TRIGGER {name} ON chat_messages"))
            await db.execute(text(f"DROP FUNCTION {name}()"))
            await db.commit()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for the module: the model client (langchain-openai's shared httpx client)
    is bound to the loop that first used it, as it is in a server process."""
    with asyncio.Runner() as runner:
        yield runner


def test_a_turn_whose_history_cannot_be_written_ends_with_an_error_event_and_stores_nothing(
    app: Any, loop: asyncio.Runner
) -> None:
    async def scenario() -> None:
        async with running(app) as client:
            session_id, token = await new_chat_session(client)
            errors_before = chat_turns("error", "stream")
            async with writes_refused(app, session_id):
                response = await client.post(
                    "/api/v1/chatbot/chat/stream",
                    headers=bearer(token),
                    json={"messages": [{"role": "user", "content": "remember this"}]},
                )
            assert response.status_code == 200
            events = sse_events(response.text)
            # The reply streamed (history was read), then storing the turn failed: said so, last.
            assert [kind for kind, _ in events[:-1]] == ["message"] * (len(events) - 1) and len(events) > 1
            kind, last = events[-1]
            assert kind == "error" and last["done"] is True
            assert last["error"]["code"] == "history_unavailable", last
            assert chat_turns("error", "stream") == errors_before + 1
            # Nothing half-stored: the user's message is not there without its reply.
            history = await client.get("/api/v1/chatbot/messages", headers=bearer(token))
            assert history.status_code == 200 and history.json()["messages"] == []

    loop.run(scenario())


def test_a_json_turn_whose_history_cannot_be_written_is_a_503_and_counted(app: Any, loop: asyncio.Runner) -> None:
    async def scenario() -> None:
        async with running(app) as client:
            session_id, token = await new_chat_session(client)
            errors_before = chat_turns("error", "json")
            completed_before = chat_turns("completed", "json")
            async with writes_refused(app, session_id):
                refused = await client.post(
                    "/api/v1/chatbot/chat",
                    headers=bearer(token),
                    json={"messages": [{"role": "user", "content": "remember this"}]},
                )
            assert refused.status_code == 503, refused.text
            assert refused.json()["component"] == "postgres" and refused.headers["Retry-After"]
            assert chat_turns("error", "json") == errors_before + 1
            assert chat_turns("completed", "json") == completed_before
            history = await client.get("/api/v1/chatbot/messages", headers=bearer(token))
            assert history.json()["messages"] == []
            # The same turn again, once the database takes writes: stored whole.
            ok = await client.post(
                "/api/v1/chatbot/chat",
                headers=bearer(token),
                json={"messages": [{"role": "user", "content": "remember this"}]},
            )
            assert ok.status_code == 200, ok.text
            stored = (await client.get("/api/v1/chatbot/messages", headers=bearer(token))).json()["messages"]
            assert [m["role"] for m in stored] == ["user", "assistant"]
            assert chat_turns("completed", "json") == completed_before + 1

    loop.run(scenario())


def test_an_exhausted_database_pool_is_a_503_that_says_busy_not_down(app: Any, loop: asyncio.Runner) -> None:
    async def scenario() -> None:
        async with running(app) as client:
            _, token = await new_chat_session(client)
            async with app.state.session_factory() as first, app.state.session_factory() as second:
                # Both of the pool's connections checked out, as a burst of slow requests would.
                await first.execute(text("SELECT 1"))
                await second.execute(text("SELECT 1"))
                busy = await client.get("/api/v1/chatbot/messages", headers=bearer(token))
            assert busy.status_code == 503, busy.text
            assert busy.json() == {
                "detail": "Server busy: no free database connection; retry shortly",
                "component": "postgres",
            }
            assert busy.headers["Retry-After"] == "2"
            # Released, the same request goes through.
            again = await client.get("/api/v1/chatbot/messages", headers=bearer(token))
            assert again.status_code == 200, again.text

    loop.run(scenario())


def test_closing_a_reply_at_its_yield_cancels_the_model_call_at_once(
    app: Any, loop: asyncio.Runner, fake_openai: FakeOpenAIProcess
) -> None:
    """What happens when a client goes away while its last event is being sent: the server closes
    the reply generators at their yield. The model call must end then, not when the garbage
    collector happens to finalise an abandoned generator (it is off here to prove it)."""
    said = f"close me {uuid.uuid4().hex[:6]}"
    fake_openai.queue_scenario(tokens=400, delay_ms=100)

    async def scenario() -> None:
        async with running(app):
            reply = app.state.agent.stream([Utterance("user", said)])
            assert await reply.__anext__()  # the first token: the model call is streaming
            gc.disable()
            try:
                await reply.aclose()

                def outcome() -> str:
                    (request,) = [r for r in fake_openai.requests() if r["messages"][-1]["content"] == said]
                    return str(request["outcome"])

                await eventually_async(lambda: outcome() == "client_disconnected", 5, what=lambda: outcome())
            finally:
                gc.enable()

    loop.run(scenario())
