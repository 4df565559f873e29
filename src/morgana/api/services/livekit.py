"""LiveKit participant tokens for voice clients, with the voice agent dispatched to the room."""

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

from livekit import api

from morgana.api.config import ApiSettings


@dataclass(frozen=True)
class ParticipantGrant:
    server_url: str
    token: str
    room_name: str
    identity: str


def room_for_session(session_id: uuid.UUID) -> str:
    return f"morgana-{session_id}"


def participant_token(settings: ApiSettings, user_id: int, session_id: uuid.UUID) -> ParticipantGrant:
    assert settings.livekit_api_key and settings.livekit_api_secret
    room = room_for_session(session_id)
    identity = f"user-{user_id}"
    # Explicit dispatch: the room gets the agent named here as soon as the client joins.
    dispatch = api.RoomAgentDispatch(
        agent_name=settings.livekit_agent_name,
        metadata=json.dumps({"user_id": user_id, "session_id": str(session_id)}),
    )
    token = (
        api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
        .with_identity(identity)
        .with_name(identity)
        .with_ttl(timedelta(minutes=settings.livekit_token_ttl_minutes))
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=room,
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
            )
        )
        .with_room_config(api.RoomConfiguration(agents=[dispatch]))
        .to_jwt()
    )
    return ParticipantGrant(
        server_url=settings.livekit_client_url, token=token, room_name=room, identity=identity
    )
