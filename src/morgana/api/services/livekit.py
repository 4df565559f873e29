"""LiveKit for voice clients: participant tokens (the voice agent dispatched to the room), how many
voice rooms a user holds, and closing a deleted session's room."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import aiohttp
import redis.asyncio
from livekit import api

from morgana.api.config import ApiSettings
from morgana.api.security import issue_call_credential

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParticipantGrant:
    server_url: str
    token: str
    room_name: str
    identity: str


ROOM_PREFIX = "morgana-"


def room_for_session(session_id: uuid.UUID) -> str:
    return f"{ROOM_PREFIX}{session_id}"


def participant_token(settings: ApiSettings, user_id: int, session_id: uuid.UUID, version: int) -> ParticipantGrant:
    assert settings.livekit_api_key and settings.livekit_api_secret
    room = room_for_session(session_id)
    identity = f"user-{user_id}"
    # Explicit dispatch: the room gets the agent named here as soon as the client joins. The call
    # credential lets that agent (and only it: trading it needs the agent's own account) continue
    # this session's conversation. The client can read it, and can do nothing with it.
    call = issue_call_credential(settings, user_id, session_id, version, room)
    dispatch = api.RoomAgentDispatch(
        agent_name=settings.livekit_agent_name,
        metadata=json.dumps({"user_id": user_id, "session_id": str(session_id), "call": call.access_token}),
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
    return ParticipantGrant(server_url=settings.livekit_client_url, token=token, room_name=room, identity=identity)


def _client(settings: ApiSettings) -> api.LiveKitAPI:
    assert settings.livekit_api_key and settings.livekit_api_secret
    return api.LiveKitAPI(
        settings.livekit_url,
        settings.livekit_api_key,
        settings.livekit_api_secret.get_secret_value(),
        timeout=aiohttp.ClientTimeout(total=3),
    )


async def close_room(settings: ApiSettings, session_id: uuid.UUID) -> None:
    """Delete a deleted session's voice room, so its callers and agent leave now. Best effort: if
    LiveKit cannot be reached the room empties itself, and its tokens expire within minutes."""
    if not settings.livekit_configured:
        return
    room = room_for_session(session_id)
    try:
        async with _client(settings) as lk:
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
    except Exception as exc:  # a missing room included: nothing to close
        log.info("voice room not closed", extra={"room": room, "error": f"{type(exc).__name__}: {exc}"})


class VoiceRoomsUnavailable(Exception):
    """The shared store of voice grants (Redis) could not be reached."""


class VoiceRooms:
    """How many voice rooms a user holds, against LIVEKIT_MAX_ROOMS_PER_USER.

    A user holds a room from its token's grant until that token expires (LIVEKIT_TOKEN_TTL_MINUTES:
    the call may not have started yet), and after that for as long as LiveKit lists people in it.
    Counting grants, not only live rooms, closes the gap of asking several tokens before joining
    any. Grants are kept a day, in Redis when configured (shared by every replica), else here.
    """

    KEEP_SECONDS = 24 * 3600

    def __init__(self, settings: ApiSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.cap = settings.livekit_max_rooms_per_user
        self.ttl = settings.livekit_token_ttl_minutes * 60
        self._redis: redis.asyncio.Redis | None = None
        if settings.redis_url:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=8, timeout=2, socket_timeout=2, socket_connect_timeout=2
            )
            self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._memory: dict[int, dict[str, float]] = {}
        self._lock = asyncio.Lock()

    async def admit(self, user_id: int, room: str) -> bool:
        """Grant `room` to the user unless that would make more rooms than the cap; a room the
        user holds already is always granted again."""
        now = self.clock()
        async with self._lock:  # one process's grants one at a time; replicas may race by one
            grants = await self._grants(user_id, now)
            recent = {r for r, at in grants.items() if at > now - self.ttl}
            if room not in recent:
                older = [r for r in grants if r not in recent and r != room]
                held = recent | await self._occupied(older)
                if room not in held and len(held) >= self.cap:
                    return False
            await self._record(user_id, room, now)
            return True

    async def _grants(self, user_id: int, now: float) -> dict[str, float]:
        if self._redis is None:
            grants = self._memory.setdefault(user_id, {})
            for room in [r for r, at in grants.items() if at <= now - self.KEEP_SECONDS]:
                del grants[room]
            return dict(grants)
        key = f"morgana-voice:user:{user_id}"
        try:
            await self._redis.zremrangebyscore(key, "-inf", now - self.KEEP_SECONDS)
            # Without decode_responses, zrange(withscores=True) gives (bytes member, float score) pairs:
            # tuples over RESP2, lists over RESP3.
            scored = cast(
                list[tuple[bytes, float]] | list[list[Any]], await self._redis.zrange(key, 0, -1, withscores=True)
            )
            return {member.decode(): score for member, score in scored}
        except redis.RedisError as exc:
            raise VoiceRoomsUnavailable(str(exc)) from exc

    async def _record(self, user_id: int, room: str, now: float) -> None:
        if self._redis is None:
            self._memory.setdefault(user_id, {})[room] = now
            return
        key = f"morgana-voice:user:{user_id}"
        try:
            await self._redis.zadd(key, {room: now})
            await self._redis.expire(key, self.KEEP_SECONDS)
        except redis.RedisError as exc:
            raise VoiceRoomsUnavailable(str(exc)) from exc

    async def _occupied(self, rooms: list[str]) -> set[str]:
        """Those of `rooms` where LiveKit lists a participant other than an agent (if LiveKit cannot
        be reached: none, as nobody could join a room then either). ListRooms' num_participants
        is not it: it stays 0 for callers who publish nothing yet."""
        occupied: set[str] = set()
        if not rooms:
            return occupied
        try:
            async with _client(self.settings) as lk:
                listed = await lk.room.list_rooms(api.ListRoomsRequest(names=rooms))
                for room in listed.rooms:
                    people = await lk.room.list_participants(api.ListParticipantsRequest(room=room.name))
                    if any(p.kind != api.ParticipantInfo.Kind.AGENT for p in people.participants):
                        occupied.add(room.name)
        except Exception as exc:
            log.warning("cannot list voice rooms", extra={"error": f"{type(exc).__name__}: {exc}"})
        return occupied

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
