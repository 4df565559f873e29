"""The media floor: what a LiveKit call costs the worker's core before any agent work.

A livekit-agents worker's job process holds, per call, a WebRTC connection that publishes the
agent's voice and receives the caller's. WebRTC runs that media pipeline whether anyone speaks or
not: it encodes the agent's track every 10 ms (silence included: capturing nothing, muting the
track or DTX left its encoder's CPU unchanged, 2026-12-01), decodes and plays out the caller's,
and sends and receives the packets. Whatever the agent does on top (VAD, turn detection, speech to
text, HTTP, text to speech) adds to that floor, so 100 / floor bounds the calls a core can carry on
this machine, for Morgana or any other livekit-agents worker.

Measured here with no agent code at all: N processes pinned to the worker's core (one per call,
as livekit-agents runs its jobs) each join a room as "agent": a 24 kHz mono track published as
room_io's audio output does, the caller's audio read at 16 kHz in 50 ms frames as Morgana's room
input does. N callers in the bench process (on the other core) publish microphone tracks. The
processes' CPU over a window, per call, is the floor; the issue's 10 calls per core leave the
agent's own work 10 % of the core per call less the floor.

    python -m bench.voice_floor   (one call's agent side, pinned: reads BENCH_FLOOR_URL and BENCH_FLOOR_TOKEN)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time

import psutil
from livekit import api, rtc

from bench.common import logger, rounded
from bench.voice_results import Results
from bench.voice_settings import WORKER_CORE
from morgana_devtools.livekit_server import LiveKitServer

log = logger("voice-bench")

FLOOR_CALLS = 4
TARGET_CALLS_PER_CORE = 10  # the issue's
AGENT_SAMPLE_RATE = 24_000  # livekit-agents' AudioOutputOptions default (the agent's voice)
INPUT_SAMPLE_RATE = 16_000  # morgana.agent.worker.INPUT_SAMPLE_RATE
INPUT_FRAME_MS = 50  # livekit-agents' AudioInputOptions default
CALLER_SAMPLE_RATE = 48_000  # the bench callers' microphones
READY_TIMEOUT_S = 30.0
SETTLE_S = 2.0


def _token(livekit: LiveKitServer, identity: str, room: str) -> str:
    grants = api.VideoGrants(room_join=True, room=room)
    return api.AccessToken(livekit.api_key, livekit.api_secret).with_identity(identity).with_grants(grants).to_jwt()


# --------------------------------------------------------------------------- the pinned side


async def _agent_side(url: str, token: str) -> None:
    """Join the room as the agent, publish its track, read the caller's audio; say `ready` once the
    caller's audio arrives, then run until stdin closes; print the frames read."""
    frames = 0
    heard = asyncio.Event()
    readers: set[asyncio.Task[None]] = set()

    async def read(track: rtc.Track) -> None:
        nonlocal frames
        stream = rtc.AudioStream.from_track(
            track=track, sample_rate=INPUT_SAMPLE_RATE, num_channels=1, frame_size_ms=INPUT_FRAME_MS
        )
        async for _ in stream:
            frames += 1
            heard.set()

    def subscribed(track: rtc.Track, *_: object) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            readers.add(asyncio.create_task(read(track)))

    room = rtc.Room()
    room.on("track_subscribed", subscribed)
    await room.connect(url, token)
    source = rtc.AudioSource(AGENT_SAMPLE_RATE, 1, queue_size_ms=200)
    track = rtc.LocalAudioTrack.create_audio_track("agent", source)
    await room.local_participant.publish_track(track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    await asyncio.wait_for(heard.wait(), READY_TIMEOUT_S)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps({"frames": frames}), flush=True)
    for task in readers:
        task.cancel()
    await source.aclose()
    await room.disconnect()


# --------------------------------------------------------------------------- the bench side


async def _agent_process(livekit: LiveKitServer, room: str) -> asyncio.subprocess.Process:
    """The agent side of one call: a process of its own on the worker's core, as livekit-agents
    runs a job."""
    env = {
        **os.environ,
        "BENCH_FLOOR_URL": livekit.url,
        "BENCH_FLOOR_TOKEN": _token(livekit, "agent", room),
    }
    return await asyncio.create_subprocess_exec(
        *("taskset", "-c", str(WORKER_CORE), sys.executable, "-m", "bench.voice_floor"),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


async def _ready(agent: asyncio.subprocess.Process) -> None:
    assert agent.stdout is not None
    line = (await asyncio.wait_for(agent.stdout.readline(), READY_TIMEOUT_S + 15)).decode()
    if line.strip() != "ready":
        raise RuntimeError(f"the floor's agent side did not get ready: {line!r}")


async def _frames_read(agent: asyncio.subprocess.Process) -> int:
    assert agent.stdin is not None and agent.stdout is not None
    agent.stdin.close()
    out = (await asyncio.wait_for(agent.stdout.read(), 15)).decode()
    return int(json.loads(out.strip().splitlines()[-1])["frames"])


def _cpu_seconds(agents: list[asyncio.subprocess.Process]) -> float:
    times = [psutil.Process(agent.pid).cpu_times() for agent in agents]
    return sum(t.user + t.system for t in times)


async def _floor(livekit: LiveKitServer, calls: int, seconds: float) -> dict:
    rooms = [f"floor-{secrets.token_hex(4)}-{i}" for i in range(calls)]
    agents: list[asyncio.subprocess.Process] = []
    callers: list[rtc.Room] = []
    sources: list[rtc.AudioSource] = []
    try:
        for room_name in rooms:
            agents.append(await _agent_process(livekit, room_name))
            room = rtc.Room()
            callers.append(room)
            # The agent's voice is not listened to: decoding it would be the caller's work, not the worker's.
            await room.connect(livekit.url, _token(livekit, "caller", room_name), rtc.RoomOptions(auto_subscribe=False))
            source = rtc.AudioSource(CALLER_SAMPLE_RATE, 1)
            sources.append(source)
            track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
            await room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
        await asyncio.gather(*(_ready(agent) for agent in agents))
        await asyncio.sleep(SETTLE_S)
        before, started = _cpu_seconds(agents), time.monotonic()
        await asyncio.sleep(seconds)
        used, elapsed = _cpu_seconds(agents) - before, time.monotonic() - started
        frames = await asyncio.gather(*(_frames_read(agent) for agent in agents))
        return {"cpu_pct": 100 * used / elapsed, "frames": list(frames)}
    finally:
        for source in sources:
            with contextlib.suppress(Exception):
                await source.aclose()
        for room in callers:
            with contextlib.suppress(Exception):
                await room.disconnect()
        for agent in agents:
            if agent.returncode is None:
                agent.kill()
            await agent.wait()


def measure_media_floor(res: Results, livekit: LiveKitServer, seconds: float, calls: int = FLOOR_CALLS) -> bool:
    """The `media_floor` lines and, when the capacity levels ran, Morgana's call beside the floor.
    False (and a `failed` line) if it could not be measured."""
    log(f"media floor: {calls} bare LiveKit calls on core {WORKER_CORE} for {seconds:.0f} s")
    try:
        floor = asyncio.run(_floor(livekit, calls, seconds))
    except Exception as exc:
        log(f"media floor: FAILED: {type(exc).__name__}: {exc}")
        res.add("media_floor", "failed", None, None, "error", note=f"{type(exc).__name__}: {exc}"[:200])
        return False
    per_call = floor["cpu_pct"] / calls
    res.add(
        "media_floor",
        "cpu_per_call",
        rounded(per_call, 2),
        None,
        "% of core",
        calls=calls,
        frames_read=floor["frames"],
        note="a bare LiveKit call, a process each (publishes 24 kHz, reads the caller at 16 kHz): no agent code",
    )
    res.add(
        "media_floor",
        "calls_per_core_ceiling",
        rounded(100 / per_call, 1) if per_call > 0 else None,
        None,
        "calls",
        note="100 / cpu_per_call: no livekit-agents worker carries more calls on this core",
    )
    morgana = res.value("default", "capacity", "worker_cpu_per_call")
    if morgana is not None and per_call > 0:
        res.add(
            "compare",
            "worker_cpu_per_call_vs_media_floor",
            morgana,
            rounded(per_call, 2),
            "% of core",
            agent_work_per_call=rounded(morgana - per_call, 2),
            agent_work_budget_for_target=rounded(100 / TARGET_CALLS_PER_CORE - per_call, 2),
            note=f"Morgana's call (capacity, largest passing N) / a bare LiveKit call, same core, same run; "
            f"{TARGET_CALLS_PER_CORE} calls per core leave the agent's own work "
            f"{100 / TARGET_CALLS_PER_CORE - per_call:.1f} % of the core per call, it takes {morgana - per_call:.1f}",
        )
    return True


def main() -> None:
    asyncio.run(_agent_side(os.environ["BENCH_FLOOR_URL"], os.environ["BENCH_FLOOR_TOKEN"]))


if __name__ == "__main__":
    main()
