"""POST /api/v1/livekit/token: a LiveKit token for the session's room, with the agent dispatched."""

import json
import time

import httpx
from livekit import api as livekit_api

from tests.conftest import LIVEKIT_KEY, LIVEKIT_SECRET, bearer


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
    assert json.loads(dispatches[0].metadata) == {
        "user_id": user["id"],
        "session_id": chat_session["session_id"],
    }


def test_token_lifetime_is_bounded(client: httpx.Client, chat_session: dict) -> None:
    token = client.post(
        "/api/v1/livekit/token", headers=bearer(chat_session["token"]["access_token"])
    ).json()["participantToken"]
    from jose import jwt

    payload = jwt.get_unverified_claims(token)
    lifetime = payload["exp"] - time.time()
    assert 50 * 60 < lifetime <= 60 * 60 + 5
