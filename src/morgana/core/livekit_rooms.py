"""Room load as LiveKit's RoomService reports it: who is in which room, and which rooms lack an agent.

Every listed room's participants are listed too (concurrently, a few at a time), to tell
callers from agents by `ParticipantInfo.kind`. `Room.num_participants` would save those calls
for empty rooms, but livekit-server refreshes it only every 5 s (roomUpdateInterval in
pkg/rtc/room.go, v1.13): a new room reads 0 for up to 5 s, which would cost a caller that much
of the reaction time. Empty rooms close after LiveKit's departure/empty timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from livekit import api

# Callers: people in a browser or app, and people on the phone through LiveKit SIP.
HUMAN_KINDS = frozenset({api.ParticipantInfo.Kind.STANDARD, api.ParticipantInfo.Kind.SIP})
AGENT_KIND = api.ParticipantInfo.Kind.AGENT
_GONE = api.ParticipantInfo.State.DISCONNECTED
_PARALLEL_LISTINGS = 16


class LiveKitUnreachable(Exception):
    """LiveKit did not answer (connection refused, timeout, 5xx)."""


class LiveKitRejected(Exception):
    """LiveKit answered but refused the request (bad credentials, missing grant)."""


@dataclass(frozen=True)
class RoomLoad:
    name: str
    humans: int
    agents: int

    @property
    def agentless(self) -> bool:
        return self.humans > 0 and self.agents == 0


@dataclass(frozen=True)
class Load:
    """The rooms that have anyone in them: callers, agents or both."""

    rooms: tuple[RoomLoad, ...]

    @property
    def calls(self) -> tuple[RoomLoad, ...]:
        """Rooms with a caller: the load the workers are scaled for."""
        return tuple(room for room in self.rooms if room.humans > 0)

    @property
    def room_count(self) -> int:
        return len(self.calls)

    @property
    def participants(self) -> int:
        return sum(room.humans for room in self.rooms)

    @property
    def agentless(self) -> tuple[RoomLoad, ...]:
        return tuple(room for room in self.rooms if room.agentless)

    @property
    def with_agent(self) -> int:
        """Worker slots taken, including an agent still winding down in a room its caller left."""
        return sum(1 for room in self.rooms if room.agents > 0)


def room_load(name: str, participants: Iterable[api.ParticipantInfo]) -> RoomLoad:
    present = [p for p in participants if p.state != _GONE]
    return RoomLoad(
        name=name,
        humans=sum(1 for p in present if p.kind in HUMAN_KINDS),
        agents=sum(1 for p in present if p.kind == AGENT_KIND),
    )


class LiveKitLoadReader:
    """A LiveKit API client for one server and key: `read()` takes one snapshot of the load,
    `dispatch()` sends an agent to a room, `send()` a data packet to its participants."""

    def __init__(self, url: str, api_key: str, api_secret: str, timeout: float) -> None:
        self.identity = (url, api_key, api_secret)
        # No failover: it only applies to LiveKit Cloud, and a retry would outlast the tick.
        self._api = api.LiveKitAPI(
            url, api_key, api_secret, timeout=aiohttp.ClientTimeout(total=timeout), failover=False
        )

    async def read(self, prefix: str = "") -> Load:
        """The rooms (those whose names start with `prefix`) and who is in them."""
        async with _translated_errors():
            listed = await self._api.room.list_rooms(api.ListRoomsRequest())
            names = [room.name for room in listed.rooms if room.name.startswith(prefix)]
            gate = asyncio.Semaphore(_PARALLEL_LISTINGS)

            async def load_of(name: str) -> RoomLoad:
                async with gate:
                    try:
                        response = await self._api.room.list_participants(api.ListParticipantsRequest(room=name))
                    except api.TwirpError as exc:
                        if exc.code == api.TwirpErrorCode.NOT_FOUND:  # closed since it was listed
                            return RoomLoad(name=name, humans=0, agents=0)
                        raise
                return room_load(name, response.participants)

            rooms = await asyncio.gather(*(load_of(name) for name in names))
        return Load(rooms=tuple(room for room in rooms if room.humans or room.agents))

    async def dispatch(self, agent_name: str, room: str, *, again_only: bool = False) -> str | None:
        """Ask LiveKit to send `agent_name` to `room`; returns the dispatch id.

        The room's earlier dispatch of that agent (the one in the caller's token) lends its
        metadata: for a Morgana call, the credential that continues the caller's conversation.
        With `again_only`, a room that agent was never dispatched to is left alone (None).
        """
        async with _translated_errors():
            earlier = [d for d in await self._api.agent_dispatch.list_dispatch(room) if d.agent_name == agent_name]
            if again_only and not earlier:
                return None
            metadata = next((d.metadata for d in earlier if d.metadata), "")
            dispatch = await self._api.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
            )
        return dispatch.id

    async def send(self, room: str, topic: str, data: bytes) -> None:
        """A reliable data packet to everyone in `room`, on `topic`."""
        async with _translated_errors():
            await self._api.room.send_data(
                api.SendDataRequest(room=room, data=data, kind=api.DataPacket.Kind.RELIABLE, topic=topic)
            )

    async def aclose(self) -> None:
        await self._api.aclose()


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    """aiohttp and Twirp errors as LiveKitUnreachable / LiveKitRejected."""
    try:
        yield
    except api.TwirpError as exc:
        if exc.status >= 500:
            raise LiveKitUnreachable(f"LiveKit answered {exc.status}: {exc.message}") from exc
        raise LiveKitRejected(f"LiveKit refused the request ({exc.code}): {exc.message}") from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise LiveKitUnreachable(f"{type(exc).__name__}: {exc or 'timed out'}") from exc
