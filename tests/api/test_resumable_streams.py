"""Chat streams that survive a dropped connection: every event has an id, and a client that
reconnects with Last-Event-ID, to any replica, gets what it missed and then the rest, once.

Two API processes on one Postgres and one Redis (valkey), and the OpenAI stand-in counting the
model calls."""

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from morgana_devtools.services import eventually
from tests.conftest import bearer, new_session, register

CHAT = "/api/v1/chatbot/chat/stream"


@pytest.fixture(scope="module")
def replicas(api_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiProcess, ApiProcess]]:
    logs = tmp_path_factory.mktemp("resumable")
    first, second = ApiProcess(api_env, logs / "a.log"), ApiProcess(api_env, logs / "b.log")
    with first, second:
        yield first, second


@pytest.fixture
def token(replicas: tuple[ApiProcess, ApiProcess]) -> str:
    with httpx.Client(base_url=replicas[0].url, timeout=20) as http:
        return str(new_session(http, register(http)["token"]["access_token"])["token"]["access_token"])


@dataclass
class Event:
    id: str
    kind: str
    data: dict

    @classmethod
    def of(cls, sse: ServerSentEvent) -> "Event":
        return cls(sse.id, sse.event, json.loads(sse.data))


def seq(event: Event) -> int:
    return int(event.id.rsplit(":", 1)[1])


def text(events: list[Event]) -> str:
    return "".join(event.data["content"] for event in events)


def ask(content: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


def read_some(http: httpx.Client, token: str, body: dict, count: int) -> list[Event]:
    """Start a stream, read `count` events and drop the connection."""
    events: list[Event] = []
    with connect_sse(http, "POST", CHAT, json=body, headers=bearer(token)) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            events.append(Event.of(sse))
            if len(events) == count:
                break
    return events


def read_all(http: httpx.Client, method: str, token: str, last_event_id: str | None, **kwargs: object) -> list[Event]:
    headers = bearer(token) | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    with connect_sse(http, method, CHAT, headers=headers, **kwargs) as source:  # type: ignore[arg-type]
        assert source.response.status_code == 200, source.response.read()
        return [Event.of(sse) for sse in source.iter_sse()]


def calls_for(fake_openai: FakeOpenAIProcess, content: str) -> list[dict]:
    return [r for r in fake_openai.requests() if r["messages"][-1]["content"] == content]


def assert_whole(before: list[Event], after: list[Event]) -> None:
    """One stream's events, each exactly once and in order, ending with its last."""
    events = before + after
    assert [seq(e) for e in events] == list(range(1, len(events) + 1))
    assert len({e.id.rsplit(":", 1)[0] for e in events}) == 1
    assert [e.data["done"] for e in events] == [False] * (len(events) - 1) + [True]


def test_a_stream_dropped_on_one_replica_is_picked_up_on_the_other_with_every_event_once(
    replicas: tuple[ApiProcess, ApiProcess], token: str, fake_openai: FakeOpenAIProcess
) -> None:
    first, second = replicas
    said = f"resume me {uuid.uuid4().hex[:6]}"
    # The same reply twice: once read whole, once dropped after 3 events and resumed elsewhere.
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        fake_openai.queue_scenario(tokens=60, delay_ms=20)
        uninterrupted = read_all(a, "POST", token, None, json=ask(said + " whole"))
        fake_openai.queue_scenario(tokens=60, delay_ms=20)
        before = read_some(a, token, ask(said), 3)
        assert not before[-1].data["done"]
        after = read_all(b, "GET", token, before[-1].id)
        history = b.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]

    assert_whole(before, after)
    assert text(before + after) == text(uninterrupted)
    assert after[-1].kind == "message" and after[-1].data == {"content": "", "done": True}
    assert len(calls_for(fake_openai, said)) == 1  # the reply was generated once
    assert [(m["role"], m["content"]) for m in history[-2:]] == [("user", said), ("assistant", text(uninterrupted))]


def test_sending_the_request_again_with_last_event_id_resumes_instead_of_starting_a_turn(
    replicas: tuple[ApiProcess, ApiProcess], token: str, fake_openai: FakeOpenAIProcess
) -> None:
    """As fetch-based SSE clients reconnect: the same POST, with a Last-Event-ID header."""
    first, second = replicas
    said = f"post again {uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        fake_openai.queue_scenario(tokens=40, delay_ms=20)
        before = read_some(a, token, ask(said), 2)
        after = read_all(b, "POST", token, before[-1].id, json=ask(said))
        # The query parameter, from the very start, once the stream has ended: all of it again.
        replay = read_all(a, "GET", token, None, params={"last_event_id": before[0].id.rsplit(":", 1)[0] + ":0"})
        turns = a.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]
    assert_whole(before, after)
    assert [e.id for e in replay] == [e.id for e in before + after]
    assert len(calls_for(fake_openai, said)) == 1
    assert [m["content"] for m in turns if m["role"] == "user"] == [said]


def test_the_reply_goes_on_and_is_stored_when_its_client_leaves_by_default(
    replicas: tuple[ApiProcess, ApiProcess], token: str, fake_openai: FakeOpenAIProcess
) -> None:
    first, _ = replicas
    said = f"keep going {uuid.uuid4().hex[:6]}"
    fake_openai.queue_scenario(tokens=30, delay_ms=20)
    with httpx.Client(base_url=first.url, timeout=20) as a:
        read_some(a, token, ask(said), 1)
        eventually(lambda: calls_for(fake_openai, said)[0]["outcome"] != "pending", 10, what="the model call ended")
        assert calls_for(fake_openai, said)[0]["outcome"] == "completed"

        def stored() -> list[str]:
            messages = a.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]
            return [m["content"] for m in messages]

        assert eventually(lambda: len(stored()) == 2, 5, what="the turn stored") and stored()[0] == said


def test_a_stream_cancelled_with_its_client_ends_for_whoever_resumes_it(
    replicas: tuple[ApiProcess, ApiProcess], token: str, fake_openai: FakeOpenAIProcess
) -> None:
    first, second = replicas
    said = f"cancel me {uuid.uuid4().hex[:6]}"
    fake_openai.queue_scenario(tokens=400, delay_ms=50)
    with httpx.Client(base_url=first.url, timeout=20) as a, httpx.Client(base_url=second.url, timeout=20) as b:
        before = read_some(a, token, ask(said, on_disconnect="cancel"), 2)
        eventually(lambda: calls_for(fake_openai, said)[0]["outcome"] != "pending", 5, what="the model call ended")
        assert calls_for(fake_openai, said)[0]["outcome"] == "client_disconnected"
        after = read_all(b, "GET", token, before[0].id)
        assert b.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"] == []
    assert_whole(before[:1], after)
    assert after[0] == before[1]
    assert after[-1].kind == "error" and after[-1].data["error"]["code"] == "reply_cancelled"


def test_a_stream_that_is_not_kept_is_gone_with_where_to_look(
    replicas: tuple[ApiProcess, ApiProcess], token: str, fake_openai: FakeOpenAIProcess
) -> None:
    first, _ = replicas
    with httpx.Client(base_url=first.url, timeout=20) as a:
        fake_openai.queue_scenario(tokens=3)
        stream_id = read_all(a, "POST", token, None, json=ask("mine"))[0].id.rsplit(":", 1)[0]
        never = a.get(CHAT, headers=bearer(token) | {"Last-Event-ID": f"{uuid.uuid4().hex}:2"})
        # Another session's token cannot read this session's stream.
        other = new_session(a, register(a)["token"]["access_token"])["token"]["access_token"]
        elsewhere = a.get(CHAT, params={"last_event_id": f"{stream_id}:1"}, headers=bearer(other))
        malformed = a.get(CHAT, headers=bearer(token) | {"Last-Event-ID": "42"})
        missing = a.get(CHAT, headers=bearer(token))
        anonymous = a.get(CHAT, params={"last_event_id": f"{stream_id}:1"})
    for gone in (never, elsewhere):
        assert gone.status_code == 410, gone.text
        assert gone.json()["history"] == "/api/v1/chatbot/messages"
        assert "no longer kept" in gone.json()["detail"]
    assert malformed.status_code == 400 and "Last-Event-ID" in malformed.json()["detail"]
    assert missing.status_code == 400 and "last_event_id" in missing.json()["detail"]
    assert anonymous.status_code == 401
