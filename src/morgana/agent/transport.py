"""How long a caller's audio waits on the network path, so the worker's turn latency is what the
caller hears rather than what the worker sees.

The worker sees the caller's last sound only after it has waited in this worker's WebRTC jitter
buffer, and its first reply audio leaves well before the caller's client plays it out of its own.
Both buffers are libwebrtc's adaptive NetEq on either side of the same SFU, 25-45 ms each over
loopback and more on a lossy mobile network: left out, the worker's figure read about 0.1 s below
the caller's (bench/voice_bench.py). This worker's buffer is measured from the caller's track
(WebRTC `jitterBufferDelay` over `jitterBufferEmittedCount`); the caller's is not reported to
other participants, so it is taken to be the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from livekit import rtc
from livekit.rtc._proto import stats_pb2

log = logging.getLogger("morgana.agent.transport")


@dataclass
class JitterBuffer:
    """The mean time the caller's audio spent in this worker's jitter buffer over the latest
    sampling window (seconds; 0 until measured)."""

    seconds: float = 0.0
    _delay: float = field(default=0.0, init=False, repr=False)  # the counters at the last sample
    _emitted: int = field(default=0, init=False, repr=False)

    def update(self, stats: Iterable[stats_pb2.RtcStats]) -> None:
        for entry in stats:
            if entry.WhichOneof("stats") != "inbound_rtp" or entry.inbound_rtp.stream.kind != "audio":
                continue
            inbound = entry.inbound_rtp.inbound
            emitted = inbound.jitter_buffer_emitted_count - self._emitted
            if emitted > 0:
                self.seconds = (inbound.jitter_buffer_delay - self._delay) / emitted
            self._delay, self._emitted = inbound.jitter_buffer_delay, inbound.jitter_buffer_emitted_count
            return

    @property
    def round_trip(self) -> float:
        """Both buffers a turn's audio passes: the caller's speech through this worker's, the
        reply through the caller's (taken to be the same)."""
        return 2 * self.seconds

    async def follow(self, room: rtc.Room, identity: str, interval: float = 2.0) -> None:
        """Sample the caller's microphone track every `interval` seconds, until cancelled."""
        while True:
            track = _microphone(room, identity)
            if track is not None:
                try:
                    self.update(await track.get_stats())
                except Exception as exc:  # a track going away mid-request; the next sample retries
                    log.debug("could not read the caller's track stats", extra={"error": str(exc)})
            await asyncio.sleep(interval)


def _microphone(room: rtc.Room, identity: str) -> rtc.RemoteAudioTrack | None:
    participant = room.remote_participants.get(identity)
    if participant is None:
        return None
    for publication in participant.track_publications.values():
        track = publication.track
        if isinstance(track, rtc.RemoteAudioTrack) and publication.source == rtc.TrackSource.SOURCE_MICROPHONE:
            return track
    return None
