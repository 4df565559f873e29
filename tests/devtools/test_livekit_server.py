"""Tests for `LiveKitServer`: a real livekit-server, driven through the real `livekit-api` client.

Nothing is skipped: if the binary can't be found or built, the fixture errors.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from livekit import api

from morgana_devtools.livekit_server import (
    LIVEKIT_SERVER_VERSION,
    LiveKitServer,
    cached_binary,
    ensure_binary,
)

API_KEY = "APImorganatest"
API_SECRET = secrets.token_hex(32)  # 64 chars: what production-like keys look like


@pytest.fixture(scope="module")
def livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    log = tmp_path_factory.mktemp("livekit") / "livekit-server.log"
    with LiveKitServer(API_KEY, API_SECRET, log_path=log) as server:
        yield server


def run(coro_fn, server: LiveKitServer, secret: str | None = None):
    """Run `coro_fn(client)` against `server` with a fresh LiveKitAPI (it needs a running loop)."""

    async def main():
        client = api.LiveKitAPI(url=server.http_url, api_key=server.api_key, api_secret=secret or server.api_secret)
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_binary_is_the_pinned_build() -> None:
    path = ensure_binary()
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
    if "LIVEKIT_SERVER_BIN" not in os.environ:
        assert path == cached_binary()
        assert LIVEKIT_SERVER_VERSION.removeprefix("v") in version.stdout


def test_runs_on_free_loopback_ports(livekit: LiveKitServer) -> None:
    ports = {livekit.port, livekit.rtc_tcp_port, livekit.udp_port}
    assert len(ports) == 3
    assert livekit.url == f"ws://127.0.0.1:{livekit.port}"
    assert livekit.http_url == f"http://127.0.0.1:{livekit.port}"
    assert livekit.pid is not None
    assert (livekit.api_key, livekit.api_secret) == (API_KEY, API_SECRET)


def test_room_lifecycle(livekit: LiveKitServer) -> None:
    name = f"room-{uuid.uuid4().hex[:8]}"

    async def scenario(client: api.LiveKitAPI):
        created = await client.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=60))
        listed = await client.room.list_rooms(api.ListRoomsRequest())
        participants = await client.room.list_participants(api.ListParticipantsRequest(room=name))
        await client.room.delete_room(api.DeleteRoomRequest(room=name))
        after = await client.room.list_rooms(api.ListRoomsRequest(names=[name]))
        return created, listed, participants, after

    created, listed, participants, after = run(scenario, livekit)
    assert created.name == name and created.sid
    assert name in [room.name for room in listed.rooms]
    assert list(participants.participants) == []
    assert list(after.rooms) == []


def test_wrong_secret_is_rejected(livekit: LiveKitServer) -> None:
    async def scenario(client: api.LiveKitAPI):
        return await client.room.list_rooms(api.ListRoomsRequest())

    with pytest.raises(api.TwirpError) as error:
        run(scenario, livekit, secret=secrets.token_hex(32))
    assert error.value.status == 401


def test_restart_keeps_the_port(livekit: LiveKitServer) -> None:
    port, pid = livekit.port, livekit.pid
    livekit.restart()
    assert livekit.port == port
    assert livekit.pid is not None and livekit.pid != pid
    livekit.wait_ready(5)

    name = f"after-restart-{uuid.uuid4().hex[:8]}"

    async def scenario(client: api.LiveKitAPI):
        await client.room.create_room(api.CreateRoomRequest(name=name))
        listed = await client.room.list_rooms(api.ListRoomsRequest())
        await client.room.delete_room(api.DeleteRoomRequest(room=name))
        return listed

    assert name in [room.name for room in run(scenario, livekit).rooms]
