"""No caller left alone in silence: a voice room that got no agent gets one, or its caller is told.

LiveKit neither queues nor retries a dispatch that found no registered worker, so a caller who
joins while none is up (the first seconds of `make run`, a rollout, every worker full) would wait
in silence for good. In Kubernetes the controller sends the agent to such rooms again; wherever it
does not run (`make run`, a cluster without it) the API does, with the same planner: every
LIVEKIT_REDISPATCH_SECONDS it reads LiveKit's rooms and sends the agent to each of its own rooms
(`morgana-<session>`) whose caller has been alone for LIVEKIT_REDISPATCH_GRACE_SECONDS, with the
metadata of the room's first dispatch (the call credential). A caller still alone after
LIVEKIT_NO_AGENT_NOTICE_SECONDS is told so once, on the room's `morgana.status` data topic.

With several API processes one of them looks (a Redis key it renews; another takes over if it
stops), and each room is dispatched (and its caller told) by one at a time (a key per room, SET
NX). Without Redis there is one process to ask.
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import redis.asyncio

from morgana.api.config import ApiSettings
from morgana.api.services.livekit import ROOM_PREFIX
from morgana.core.livekit_rooms import LiveKitLoadReader, LiveKitRejected, LiveKitUnreachable
from morgana.core.redispatch import DispatchPlanner

log = logging.getLogger(__name__)

STATUS_TOPIC = "morgana.status"
NO_AGENT = {
    "status": "no_agent",
    "message": "No voice agent is available right now. Please try again in a moment.",
}


class AgentlessRooms:
    def __init__(
        self,
        settings: ApiSettings,
        redis_client: redis.asyncio.Redis | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.livekit_api_key and settings.livekit_api_secret
        self._rooms = LiveKitLoadReader(
            settings.livekit_url, settings.livekit_api_key, settings.livekit_api_secret.get_secret_value(), timeout=5
        )
        self._agent_name = settings.livekit_agent_name
        self._interval = settings.livekit_redispatch_seconds
        self._grace = settings.livekit_redispatch_grace_seconds
        self._notice_after = settings.livekit_no_agent_notice_seconds
        self._redis = redis_client
        self._clock = clock
        self._planner = DispatchPlanner(min_retry=settings.livekit_redispatch_retry_seconds)
        self._sent: set[str] = set()  # rooms this process sent the agent to, still agentless
        self._told: set[str] = set()
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Per agent name: releases that share a Redis and a LiveKit server keep to their own.
        self._keys = f"morgana-agentless:{self._agent_name}"
        self._leader_key = f"{self._keys}:leader"

    async def run(self) -> None:
        """Check every interval until cancelled; LiveKit being away is logged, not fatal."""
        failing = False
        while True:
            try:
                await self.check()
            except (LiveKitUnreachable, LiveKitRejected, redis.RedisError) as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("cannot look for agentless voice rooms", extra={"error": str(exc)})
                failing = True
            else:
                if failing:
                    log.info("looking for agentless voice rooms again")
                failing = False
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        if not await self._lead():
            return
        load = await self._rooms.read(ROOM_PREFIX)
        now = self._clock()
        self._planner.observe(load, now)
        self._told &= set(self._planner.agentless_since)
        self._sent &= set(self._planner.agentless_since)
        for room in self._planner.due(load, now, self._grace):
            retry = self._planner.retry_after(self._planner.attempts_at(room) + 1, self._grace)
            # Only rooms whose token dispatched this API's agent: another release's rooms on a
            # shared LiveKit server are theirs to serve.
            claimed = await self._claim(f"{self._keys}:dispatch:{room}", retry)
            if claimed and await self._rooms.dispatch(self._agent_name, room, again_only=True):
                self._sent.add(room)
                log.info("sent the agent to a room whose caller was alone", extra={"room": room})
            self._planner.dispatched(room, now)
        for room, since in self._planner.agentless_since.items():
            if room in self._told or room not in self._sent or now - since < self._notice_after:
                continue
            self._told.add(room)
            if await self._claim(f"{self._keys}:told:{room}", 24 * 3600):
                await self._rooms.send(room, STATUS_TOPIC, json.dumps(NO_AGENT).encode())
                log.warning("no agent came to a caller's room: told the caller", extra={"room": room})

    async def _lead(self) -> bool:
        """One API process looks at the rooms at a time (each listing costs LiveKit a request
        per room); another takes over within a few intervals if it stops."""
        if self._redis is None:
            return True
        ttl = max(int(self._interval * 3000), 1000)
        if await self._redis.set(self._leader_key, self._owner, nx=True, px=ttl):
            return True
        if await self._redis.get(self._leader_key) == self._owner.encode():
            await self._redis.pexpire(self._leader_key, ttl)
            return True
        return False

    async def _claim(self, key: str, seconds: float) -> bool:
        if self._redis is None:
            return True
        return bool(await self._redis.set(key, self._owner, nx=True, px=max(int(seconds * 1000), 1)))

    async def aclose(self) -> None:
        await self._rooms.aclose()


class AgentlessRoomsTask:
    """AgentlessRooms running in the background of an API process, with a Redis client of its own."""

    def __init__(self, settings: ApiSettings) -> None:
        self._redis = (
            redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
            if settings.redis_url
            else None
        )
        self._rooms = AgentlessRooms(settings, self._redis)
        self._task = asyncio.create_task(self._rooms.run(), name="agentless-rooms")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._rooms.aclose()
        if self._redis is not None:
            await self._redis.aclose()
