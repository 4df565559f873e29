"""The chat stream as a transport: its headers, keep-alive comments while the model is silent, and
a server told to stop letting an open reply finish."""

import asyncio
import json
import signal
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from morgana.api.routes.chatbot import EventStreamResponse
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from tests.conftest import bearer, new_session, register

CHAT = "/api/v1/chatbot/chat/stream"


@pytest.fixture(scope="module")
def api_with_short_keepalive(api_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    env = {**api_env, "CHAT_STREAM_KEEPALIVE_SECONDS": "0.2"}
    with ApiProcess(env, tmp_path_factory.mktemp("keepalive-api") / "api.log") as process:
        yield process


def session_token(http: httpx.Client) -> str:
    user_token = register(http)["token"]["access_token"]
    return str(new_session(http, user_token)["token"]["access_token"])


def data_events(lines: list[str]) -> list[dict]:
    return [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]


def test_a_silent_model_gets_ping_comments_and_the_reply_is_unchanged(
    api_with_short_keepalive: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    """A model silent for 1 s with a 0.2 s keep-alive: comment lines (which SSE clients ignore)
    keep proxies from closing the connection; the events are the same."""
    fake_openai.set_scenario(first_delay_ms=1000)
    with httpx.Client(base_url=api_with_short_keepalive.url, timeout=20) as http:
        token = session_token(http)
        with http.stream(
            "POST", CHAT, headers=bearer(token), json={"messages": [{"role": "user", "content": "hi"}]}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"  # nginx (and its ingress) must not buffer events
            lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if not line.startswith(":"))
    assert lines[:first_data] == [": ping"] * first_data
    assert first_data >= 3, lines[:6]
    events = data_events(lines)
    assert "".join(e["content"] for e in events) == "You said: hi"
    assert events[-1] == {"content": "", "done": True}


def test_keep_alives_between_events_give_sse_clients_no_events_of_their_own(
    api_with_short_keepalive: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    """A model that pauses mid-reply: the pings come after events that carry ids. A client that
    follows the standard (httpx-sse here) sees the reply's events and nothing else."""
    fake_openai.queue_scenario(tokens=6, stall_after=2, stall_seconds=1)
    with httpx.Client(base_url=api_with_short_keepalive.url, timeout=20) as http:
        token = session_token(http)
        body = {"messages": [{"role": "user", "content": "pause please"}]}
        with connect_sse(http, "POST", CHAT, headers=bearer(token), json=body) as source:
            raw = b"".join(source.response.iter_raw())
    assert raw.count(b": ping") >= 3
    with httpx.Client(base_url=api_with_short_keepalive.url, timeout=20) as http:
        fake_openai.queue_scenario(tokens=6, stall_after=2, stall_seconds=1)
        with connect_sse(http, "POST", CHAT, headers=bearer(token), json=body) as source:
            events = list(source.iter_sse())
    assert all(event.data for event in events), [event.data for event in events]
    assert [int(event.id.rsplit(":", 1)[1]) for event in events] == list(range(1, len(events) + 1))
    assert [json.loads(event.data)["done"] for event in events][-1] is True


def test_a_server_told_to_stop_lets_an_open_reply_finish(
    api_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """SIGTERM (a rolling update, a scale-down) while a reply streams: the server stops taking
    requests, the reply is sent to its end and stored, then the process exits."""
    with ApiProcess(api_env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=20) as http:
        token = session_token(http)
        fake_openai.queue_scenario(tokens=30, delay_ms=50)
        body = {"messages": [{"role": "user", "content": "a long answer"}]}
        with http.stream("POST", CHAT, headers=bearer(token), json=body) as r:
            lines = r.iter_lines()
            received = [next(line for line in lines if line.startswith("data:"))]
            assert api.process is not None
            api.process.send_signal(signal.SIGTERM)
            received += [line for line in lines if line]
        events = data_events(received)
        assert events[-1] == {"content": "", "done": True}  # stored before this event
        assert len("".join(e["content"] for e in events).split()) == 30
        # uvicorn exits by the signal it was sent, re-raised once it has shut down.
        assert api.process.wait(timeout=20) in (0, -signal.SIGTERM)


class _Connection:
    """The ASGI side of one HTTP connection: what the response sent, and a client that can leave."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self.request_read = False
        self.body_sent = asyncio.Event()

    async def receive(self) -> dict:
        if not self.request_read:
            self.request_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message.get("body"):
            self.body_sent.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.gone.set()  # as uvicorn does: a complete response ends `receive` too

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "headers": []}


def test_a_client_leaving_mid_stream_closes_its_events_and_ends_the_response_quietly() -> None:
    """The stream runs in the request's task, and the watcher cancels it when the client leaves:
    the events' generator is closed at once (which cancels the model call), and the response
    returns normally rather than raising into the server."""
    closed = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(3600)  # a model gone quiet
            yield b"data: 2\n\n"
        finally:
            closed.set()

    async def run() -> _Connection:
        connection = _Connection()
        response = EventStreamResponse(events())
        call = asyncio.ensure_future(response(SCOPE, connection.receive, connection.send))
        await asyncio.wait_for(connection.body_sent.wait(), 5)
        connection.gone.set()
        await asyncio.wait_for(call, 5)  # returns (a CancelledError would raise here)
        assert closed.is_set()
        return connection

    connection = asyncio.run(run())
    assert connection.body == b"data: 1\n\n"
    assert [m.get("more_body") for m in connection.sent[1:]] == [True]  # cut, never completed


def test_a_finished_stream_leaves_no_cancellation_behind_and_outer_ones_still_propagate() -> None:
    """A complete response also ends `receive`: that must not cancel the request's task after
    the stream. A cancellation from outside (a server shutting down) still propagates, even when
    the client left at the same moment."""

    async def two() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def forever() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        await asyncio.sleep(3600)
        yield b"data: 2\n\n"

    async def run() -> None:
        connection = _Connection()
        await EventStreamResponse(two())(SCOPE, connection.receive, connection.send)
        assert connection.body == b"data: 1\n\ndata: 2\n\n"
        await asyncio.sleep(0.05)  # a stray cancellation would land on this await

        connection = _Connection()
        call = asyncio.ensure_future(EventStreamResponse(forever())(SCOPE, connection.receive, connection.send))
        await asyncio.wait_for(connection.body_sent.wait(), 5)
        connection.gone.set()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(run())
