"""POST /api/v1/livekit/token: a LiveKit token for the session's room, with the agent dispatched."""

import json
import time

import httpx
import pytest
from livekit import api as livekit_api
from pydantic import ValidationError

from morgana.api.config import ApiSettings
from tests.conftest import LIVEKIT_KEY, LIVEKIT_SECRET, bearer, new_session, register


def test_token_grants_the_sessions_room_and_dispatches_the_agent(
    client: httpx.Client, user: dict, chat_session: dict
) -> None:
    response = client.post("/api/v1/livekit/token", headers=bearer(chat_session["token"]["access_token"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["serverUrl"] == "ws://127.0.0.1:7880"
    room = f"morgana-{chat_session['session_id']}"
    assert body["roomName"] == room

    # Verified with LiveKit's own verifier and the server's key pair, as the LiveKit server would.
    claims = livekit_api.TokenVerifier(LIVEKIT_KEY, LIVEKIT_SECRET).verify(body["participantToken"])
    assert claims.identity == f"user-{user['id']}" == body["participantIdentity"]
    grants = claims.video
    assert grants.room == room
    assert grants.room_join and grants.can_publish and grants.can_subscribe and grants.can_publish_data
    assert not grants.room_admin and not grants.room_create
    dispatches = claims.room_config.agents
    assert [d.agent_name for d in dispatches] == ["morgana-agent"]
    metadata = json.loads(dispatches[0].metadata)
    assert metadata.keys() == {"user_id", "session_id", "call"}
    assert (metadata["user_id"], metadata["session_id"]) == (user["id"], chat_session["session_id"])
    # The call credential (tests/api/test_call_session.py): bound to this session and room, for
    # LIVEKIT_CALL_MAX_MINUTES (240).
    from jose import jwt

    call = jwt.get_unverified_claims(metadata["call"])
    assert (call["typ"], call["sub"], call["uid"], call["room"]) == (
        "call",
        chat_session["session_id"],
        user["id"],
        room,
    )
    assert 239 * 60 < call["exp"] - time.time() <= 240 * 60 + 5


def test_token_lifetime_is_bounded(client: httpx.Client, chat_session: dict) -> None:
    """A participant token only has to be valid when its holder joins: 10 minutes by default, and
    at most 15 whatever is configured (it outlives a deleted session or a logout by that much)."""
    token = client.post("/api/v1/livekit/token", headers=bearer(chat_session["token"]["access_token"])).json()[
        "participantToken"
    ]
    from jose import jwt

    payload = jwt.get_unverified_claims(token)
    lifetime = payload["exp"] - time.time()
    assert 9 * 60 < lifetime <= 10 * 60 + 5
    with pytest.raises(ValidationError, match="livekit_token_ttl_minutes"):
        ApiSettings(_env_file=None, livekit_token_ttl_minutes=60)


def test_a_user_holds_at_most_the_configured_voice_rooms(client: httpx.Client, user: dict) -> None:
    """LIVEKIT_MAX_ROOMS_PER_USER (2): tokens for a third room are refused, even before any room
    is joined (asking for several tokens first does not get round it); the rooms held are granted
    again; other users are not affected."""
    token = user["token"]["access_token"]
    sessions = [new_session(client, token) for _ in range(3)]

    def grant(session: dict) -> httpx.Response:
        return client.post("/api/v1/livekit/token", headers=bearer(session["token"]["access_token"]))

    assert [grant(s).status_code for s in sessions[:2]] == [200, 200]
    third = grant(sessions[2])
    assert third.status_code == 429, third.text
    assert third.json()["detail"] == "At most 2 voice calls at once per user: end one first"
    assert third.headers["retry-after"] == "60"
    assert grant(sessions[0]).status_code == 200  # a room already held
    other = new_session(client, register(client)["token"]["access_token"])
    assert grant(other).status_code == 200
