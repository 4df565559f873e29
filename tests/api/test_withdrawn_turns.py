"""Turns sent with a client's turn_id: stored at most once, and taken back whether stored or still
running (what the voice agent does with a reply it prepared while the caller was still speaking)."""

import asyncio
import json
import uuid

import httpx

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually
from tests.api.sse import stream_chat
from tests.conftest import bearer, new_session

CHAT = "/api/v1/chatbot/chat/stream"


def stored(client: httpx.Client, token: str) -> list[tuple[str, str, str | None]]:
    response = client.get("/api/v1/chatbot/messages", headers=bearer(token))
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["turn_id"]) for m in response.json()["messages"]]


def withdraw(client: httpx.Client, token: str, turn_id: str) -> httpx.Response:
    return client.delete(f"/api/v1/chatbot/turns/{turn_id}", headers=bearer(token))


def test_a_stored_turn_is_taken_back_and_only_that_turn(client: httpx.Client, chat_session: dict) -> None:
    token = chat_session["token"]["access_token"]
    kept, taken_back = str(uuid.uuid4()), str(uuid.uuid4())
    stream_chat(client, token, "keep this", turn_id=kept)
    stream_chat(client, token, "take this back", turn_id=taken_back)
    stream_chat(client, token, "no id")
    assert [turn_id for _, _, turn_id in stored(client, token)] == [kept, kept, taken_back, taken_back, None, None]

    response = withdraw(client, token, taken_back)
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted": 2}
    assert stored(client, token) == [
        ("user", "keep this", kept),
        ("assistant", "You said: keep this", kept),
        ("user", "no id", None),
        ("assistant", "You said: no id", None),
    ]
    # Taking it back again, or a turn never sent, is not an error.
    assert withdraw(client, token, taken_back).json() == {"deleted": 0}
    assert withdraw(client, token, str(uuid.uuid4())).json() == {"deleted": 0}


def test_a_turn_taken_back_while_its_reply_runs_is_never_stored(
    api, chat_session: dict, fake_openai: FakeOpenAIProcess
) -> None:
    token = chat_session["token"]["access_token"]
    turn_id = str(uuid.uuid4())
    fake_openai.queue_scenario(tokens=20, delay_ms=50)

    async def turn() -> list[tuple[str | None, dict]]:
        events: list[tuple[str | None, dict]] = []
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=30) as http,
            http.stream(
                "POST",
                CHAT,
                headers=bearer(token),
                json={"messages": [{"role": "user", "content": "a reply I will not want"}], "turn_id": turn_id},
            ) as response,
        ):
            event: str | None = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:])))
                    event = None
                    if len(events) == 1:  # the reply is running: take the turn back now
                        gone = await http.delete(f"/api/v1/chatbot/turns/{turn_id}", headers=bearer(token))
                        assert gone.json() == {"deleted": 0}, gone.text
        return events

    events = asyncio.run(turn())
    # The client that is still listening is told; the model's reply was whole, but not stored.
    assert events[-1] == (
        "error",
        {
            "content": "",
            "done": True,
            "error": {
                "code": "turn_withdrawn",
                "message": "This turn was withdrawn by its client before its reply was complete; it was not stored.",
            },
        },
    )
    # Taking the turn back did not cut the reply short: it streamed on to its end.
    assert len([data for _, data in events if data["content"]]) > 10
    eventually(lambda: fake_openai.requests()[-1]["outcome"] != "pending", 5, what="the model call ended")
    assert fake_openai.requests()[-1]["outcome"] == "completed"
    with httpx.Client(base_url=api.url) as http:
        assert stored(http, token) == []


def test_a_turn_id_is_stored_at_most_once(client: httpx.Client, chat_session: dict) -> None:
    token = chat_session["token"]["access_token"]
    turn_id = str(uuid.uuid4())
    first = stream_chat(client, token, "sent twice", turn_id=turn_id)
    again = stream_chat(client, token, "sent twice", turn_id=turn_id)
    assert first.last == again.last == {"content": "", "done": True}
    assert stored(client, token) == [("user", "sent twice", turn_id), ("assistant", "You said: sent twice", turn_id)]


def test_json_chat_on_a_withdrawn_turn_is_a_409_and_stores_nothing(client: httpx.Client, chat_session: dict) -> None:
    token = chat_session["token"]["access_token"]
    turn_id = str(uuid.uuid4())
    assert withdraw(client, token, turn_id).json() == {"deleted": 0}
    response = client.post(
        "/api/v1/chatbot/chat",
        headers=bearer(token),
        json={"messages": [{"role": "user", "content": "too late"}], "turn_id": turn_id},
    )
    assert response.status_code == 409, response.text
    assert response.json()["detail"].startswith("This turn was withdrawn")
    assert stored(client, token) == []


def test_a_turn_is_taken_back_only_from_its_own_session(client: httpx.Client, user: dict) -> None:
    mine = new_session(client, user["token"]["access_token"])["token"]["access_token"]
    other = new_session(client, user["token"]["access_token"])["token"]["access_token"]
    turn_id = str(uuid.uuid4())
    stream_chat(client, mine, "mine", turn_id=turn_id)
    assert withdraw(client, other, turn_id).json() == {"deleted": 0}
    assert len(stored(client, mine)) == 2
    # Nor does another session's withdrawal keep this session's turn from being stored.
    later = str(uuid.uuid4())
    assert withdraw(client, other, later).json() == {"deleted": 0}
    assert stream_chat(client, mine, "mine again", turn_id=later).last == {"content": "", "done": True}
    assert len(stored(client, mine)) == 4
    # A user token is not a session token.
    assert withdraw(client, user["token"]["access_token"], turn_id).status_code == 403


def test_a_malformed_turn_id_is_a_422(client: httpx.Client, chat_session: dict) -> None:
    token = chat_session["token"]["access_token"]
    assert withdraw(client, token, "not-a-uuid").status_code == 422
    response = client.post(
        CHAT, headers=bearer(token), json={"messages": [{"role": "user", "content": "x"}], "turn_id": "nope"}
    )
    assert response.status_code == 422
    assert stored(client, token) == []
