"""A voice call continues the caller's own conversation (POST /api/v1/livekit/call-session).

The caller's LiveKit token carries a call credential in its agent dispatch; the voice agent's
account trades it for a voice token of the caller's session. Neither the credential alone nor
the agent's account alone reaches the caller's conversation, and the voice token adds turns only.
"""

import json
import uuid

import httpx
import pytest
from livekit import api as livekit_api

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import migrate
from tests.api.sse import StreamResult, stream_chat
from tests.conftest import AGENT_EMAIL, AGENT_PASSWORD, LIVEKIT_KEY, LIVEKIT_SECRET, bearer, new_session, register


@pytest.fixture(scope="module")
def agent_token(api_env: dict, api) -> str:
    """The voice agent's service account, as `morgana-api migrate` creates it, logged in."""
    migrate({**api_env, "API_USER_EMAIL": AGENT_EMAIL, "API_USER_PASSWORD": AGENT_PASSWORD})
    response = httpx.post(
        f"{api.url}/api/v1/auth/login", data={"username": AGENT_EMAIL, "password": AGENT_PASSWORD}, timeout=30
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def call_of(client: httpx.Client, session: dict) -> tuple[str, str]:
    """What the agent dispatched to the session's room gets: the credential and the room."""
    grant = client.post("/api/v1/livekit/token", headers=bearer(session["token"]["access_token"]))
    assert grant.status_code == 200, grant.text
    claims = livekit_api.TokenVerifier(LIVEKIT_KEY, LIVEKIT_SECRET).verify(grant.json()["participantToken"])
    metadata = json.loads(claims.room_config.agents[0].metadata)
    return metadata["call"], grant.json()["roomName"]


def join(client: httpx.Client, token: str, credential: str, room: str) -> httpx.Response:
    return client.post(
        "/api/v1/livekit/call-session", json={"credential": credential, "room": room}, headers=bearer(token)
    )


def say(client: httpx.Client, session_token: str, text: str) -> StreamResult:
    result = stream_chat(client, session_token, text)
    assert result.status_code == 200 and result.last == {"content": "", "done": True}, result.events
    return result


def history(client: httpx.Client, session_token: str) -> list[tuple[str, str, str]]:
    response = client.get("/api/v1/chatbot/messages", headers=bearer(session_token))
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["channel"]) for m in response.json()["messages"]]


def test_a_call_continues_the_callers_conversation_marked_as_voice(
    client: httpx.Client, chat_session: dict, agent_token: str
) -> None:
    caller_token = chat_session["token"]["access_token"]
    say(client, caller_token, "Typed before the call")
    credential, room = call_of(client, chat_session)

    joined = join(client, agent_token, credential, room)
    assert joined.status_code == 200, joined.text
    assert joined.json()["session_id"] == chat_session["session_id"]
    say(client, joined.json()["token"]["access_token"], "Spoken in the call")
    say(client, caller_token, "Typed after the call")

    assert history(client, caller_token) == [
        ("user", "Typed before the call", "chat"),
        ("assistant", "You said: Typed before the call", "chat"),
        ("user", "Spoken in the call", "voice"),
        ("assistant", "You said: Spoken in the call", "voice"),
        ("user", "Typed after the call", "chat"),
        ("assistant", "You said: Typed after the call", "chat"),
    ]


def test_the_voice_token_adds_turns_and_nothing_else(
    client: httpx.Client, chat_session: dict, agent_token: str
) -> None:
    credential, room = call_of(client, chat_session)
    voice = join(client, agent_token, credential, room).json()["token"]["access_token"]
    refused = {
        "read the history": client.get("/api/v1/chatbot/messages", headers=bearer(voice)),
        "delete the history": client.delete("/api/v1/chatbot/messages", headers=bearer(voice)),
        "open another call": client.post("/api/v1/livekit/token", headers=bearer(voice)),
    }
    for what, response in refused.items():
        assert response.status_code == 403, (what, response.text)
        assert response.json()["detail"] == "A voice call's session token can only add turns to its conversation"


def test_the_voice_token_takes_back_the_calls_turns_and_no_other(
    client: httpx.Client, chat_session: dict, agent_token: str
) -> None:
    caller_token = chat_session["token"]["access_token"]
    typed, spoken = str(uuid.uuid4()), str(uuid.uuid4())
    stream_chat(client, caller_token, "Typed by the caller", turn_id=typed)
    credential, room = call_of(client, chat_session)
    voice = join(client, agent_token, credential, room).json()["token"]["access_token"]
    stream_chat(client, voice, "A reply prepared too early", turn_id=spoken)

    not_its_own = client.delete(f"/api/v1/chatbot/turns/{typed}", headers=bearer(voice))
    assert not_its_own.status_code == 200 and not_its_own.json() == {"deleted": 0}
    its_own = client.delete(f"/api/v1/chatbot/turns/{spoken}", headers=bearer(voice))
    assert its_own.status_code == 200 and its_own.json() == {"deleted": 2}
    assert history(client, caller_token) == [
        ("user", "Typed by the caller", "chat"),
        ("assistant", "You said: Typed by the caller", "chat"),
    ]


def test_only_the_agent_account_can_trade_a_credential_and_only_for_its_room(
    client: httpx.Client, user: dict, chat_session: dict, agent_token: str
) -> None:
    credential, room = call_of(client, chat_session)
    caller = join(client, user["token"]["access_token"], credential, room)
    assert caller.status_code == 403, caller.text
    assert caller.json()["detail"] == "Only the voice agent's account may join a call's conversation"

    other_room = join(client, agent_token, credential, "morgana-another-room")
    assert other_room.status_code == 403, other_room.text
    assert other_room.json()["detail"] == "This call credential is for another room"

    # A session token is no call credential, nor is anything forged.
    for not_a_credential in (chat_session["token"]["access_token"], credential[:-4] + "AAAA"):
        refused = join(client, agent_token, not_a_credential, room)
        assert refused.status_code == 401, refused.text
        assert refused.json()["detail"] == "Invalid or expired call credential"

    # A call credential is no bearer token.
    assert client.get("/api/v1/chatbot/messages", headers=bearer(credential)).status_code == 403


def test_a_deleted_session_or_a_logout_ends_what_the_credential_can_do(client: httpx.Client, agent_token: str) -> None:
    owner = register(client)
    owner_token = owner["token"]["access_token"]
    deleted, kept = new_session(client, owner_token), new_session(client, owner_token)
    deleted_call, kept_call = call_of(client, deleted), call_of(client, kept)

    assert (
        client.delete(f"/api/v1/auth/sessions/{deleted['session_id']}", headers=bearer(owner_token)).status_code == 204
    )
    gone = join(client, agent_token, *deleted_call)
    assert gone.status_code == 404, gone.text
    assert gone.json()["detail"] == "The caller's session no longer exists"

    voice = join(client, agent_token, *kept_call).json()["token"]["access_token"]
    assert client.post("/api/v1/auth/logout", headers=bearer(owner_token)).status_code == 204
    revoked = join(client, agent_token, *kept_call)
    assert revoked.status_code == 401, revoked.text
    # The voice token already traded is revoked with the rest of the caller's tokens.
    refused = client.post(
        "/api/v1/chatbot/chat/stream", json={"messages": [{"role": "user", "content": "hi"}]}, headers=bearer(voice)
    )
    assert refused.status_code == 401, refused.text


def test_a_typed_reply_comes_coalesced_a_spoken_one_piece_by_piece(
    client: httpx.Client, chat_session: dict, agent_token: str, fake_openai: FakeOpenAIProcess
) -> None:
    """Tokens one read at a time, 10 ms apart: a typed turn's reply comes in fewer events
    (CHAT_STREAM_COALESCE_SECONDS, 0.03 s); a call's, and one in the agent's own session (a room
    the API did not open), each piece as it comes, since its speech waits for each sentence."""
    credential, room = call_of(client, chat_session)
    joined = join(client, agent_token, credential, room)
    assert joined.status_code == 200, joined.text
    fake_openai.set_scenario(tokens=30, delay_ms=10)

    typed = say(client, chat_session["token"]["access_token"], "Typed")
    spoken = say(client, joined.json()["token"]["access_token"], "Spoken")
    in_own_room = say(client, new_session(client, agent_token)["token"]["access_token"], "Spoken elsewhere")

    def content_events(result: StreamResult) -> int:
        assert len(result.text.split()) == 30
        return sum(1 for _, data in result.events if not data["done"])

    assert content_events(spoken) >= 25
    assert content_events(in_own_room) >= 25
    assert content_events(typed) <= 20
