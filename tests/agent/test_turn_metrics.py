"""The worker's turn latency: from the caller's last sound when Smart Turn heard it, plus the time
the audio waits in the jitter buffers on its way (measured from the caller's track on real LiveKit)."""

import asyncio

import numpy as np
import pytest
from livekit import api as livekit_api
from livekit import rtc
from livekit.agents.llm import ChatMessage
from livekit.agents.voice import ConversationItemAddedEvent
from livekit.rtc._proto import stats_pb2
from prometheus_client import REGISTRY

from morgana.agent import metrics
from morgana.agent.transport import JitterBuffer
from morgana.agent.turn import SAMPLE_RATE, LastSound, SmartTurnDetector, SmartTurnModel
from morgana.agent.worker import turn_metrics_recorder
from morgana_devtools.livekit_server import LiveKitServer

FRAME = SAMPLE_RATE // 100  # 10 ms


def test_the_stream_dates_the_callers_last_sound_from_the_audio() -> None:
    """1 s of sound then 0.15 s of quiet, frames arriving every 10 ms: the last sound arrived 1 s in."""
    detector = SmartTurnDetector(SmartTurnModel())
    t0 = 1_000_000.0

    async def run() -> None:
        stream = detector.stream()
        tone = (3000 * np.sin(np.arange(FRAME) * 2 * np.pi / 20)).astype(np.int16)  # 800 Hz, 16 samples a period
        frames = [tone] * 100 + [np.zeros(FRAME, dtype=np.int16)] * 15
        for i, samples in enumerate(frames):
            stream._clock = lambda i=i: t0 + (i + 1) / 100  # the frame's arrival
            stream.push_audio(rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, FRAME))
        await stream.predict()
        await stream.aclose()

    asyncio.run(run())
    assert detector.last_sound.at == pytest.approx(t0 + 1.0, abs=0.002)


def _latency_sum() -> float:
    metrics.TURN_LATENCY  # noqa: B018 (created on first use)
    return REGISTRY.get_sample_value("morgana_agent_turn_latency_seconds_sum") or 0.0


def _reply(e2e: float, started_speaking_at: float) -> ConversationItemAddedEvent:
    report = {
        "e2e_latency": e2e,
        "started_speaking_at": started_speaking_at,
        "stopped_speaking_at": started_speaking_at,
    }
    return ConversationItemAddedEvent(item=ChatMessage(role="assistant", content=["Hi"], metrics=report))


@pytest.mark.parametrize(
    ("sound_before_reply", "recorded"),
    [
        (0.55, 0.55),  # the VAD's end of speech came 0.15 s after the sound: the sound's time counts
        (None, 0.40),  # no prediction heard it: the framework's figure
        (0.40, 0.40),
        (1.40, 0.40),  # a second too early: an earlier turn's sound, not this one's
        (0.30, 0.40),  # later than the VAD's end of speech: not this turn's either
    ],
)
def test_turn_latency_counts_from_the_last_sound(sound_before_reply: float | None, recorded: float) -> None:
    started = 2_000_000.0
    last_sound = LastSound(None if sound_before_reply is None else started - sound_before_reply)
    record = turn_metrics_recorder(last_sound)
    before = _latency_sum()
    record(_reply(0.40, started))
    assert _latency_sum() - before == pytest.approx(recorded)
    assert last_sound.at is None  # used once: the next reply does not count from it again


def test_without_smart_turn_the_framework_figure_counts() -> None:
    record = turn_metrics_recorder(None)
    before = _latency_sum()
    record(_reply(0.40, 2_000_000.0))
    assert _latency_sum() - before == pytest.approx(0.40)


def test_the_jitter_buffers_on_the_way_are_added() -> None:
    started = 2_000_000.0
    record = turn_metrics_recorder(LastSound(started - 0.55), JitterBuffer(seconds=0.03))
    before = _latency_sum()
    record(_reply(0.40, started))
    assert _latency_sum() - before == pytest.approx(0.55 + 2 * 0.03)


def _inbound_audio(delay: float, emitted: int, kind: str = "audio") -> stats_pb2.RtcStats:
    entry = stats_pb2.RtcStats()
    entry.inbound_rtp.stream.kind = kind
    entry.inbound_rtp.inbound.jitter_buffer_delay = delay
    entry.inbound_rtp.inbound.jitter_buffer_emitted_count = emitted
    return entry


def test_the_jitter_buffer_is_the_mean_of_the_latest_window() -> None:
    jitter = JitterBuffer()
    other = stats_pb2.RtcStats()
    other.transport.SetInParent()
    jitter.update([other, _inbound_audio(400.0, 16_000, kind="video")])
    assert jitter.seconds == 0.0  # nothing of the caller's audio yet
    jitter.update([other, _inbound_audio(0.5 * 16_000, 16_000)])  # 0.5 s a sample so far
    assert jitter.seconds == pytest.approx(0.5)
    jitter.update([_inbound_audio(0.5 * 16_000 + 0.04 * 32_000, 48_000)])  # then 40 ms a sample
    assert jitter.seconds == pytest.approx(0.04)
    jitter.update([_inbound_audio(0.5 * 16_000 + 0.04 * 32_000, 48_000)])  # nothing new: kept
    assert jitter.seconds == pytest.approx(0.04)
    assert jitter.round_trip == pytest.approx(0.08)


def test_the_jitter_buffer_of_a_real_callers_track_is_measured(livekit: LiveKitServer) -> None:
    """Two participants on the real LiveKit server: the listener follows the talker's microphone."""

    def token(identity: str) -> str:
        grants = livekit_api.VideoGrants(room_join=True, room="jitter-buffer")
        return (
            livekit_api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity(identity)
            .with_grants(grants)
            .to_jwt()
        )

    async def run() -> float:
        talker, listener = rtc.Room(), rtc.Room()
        await talker.connect(livekit.url, token("talker"))
        await listener.connect(livekit.url, token("listener"))
        try:
            source = rtc.AudioSource(48_000, 1)
            track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            await talker.local_participant.publish_track(track, options)
            jitter = JitterBuffer()
            following = asyncio.create_task(jitter.follow(listener, "talker", interval=0.25))
            tone = (3000 * np.sin(np.arange(480) * 2 * np.pi * 300 / 48_000)).astype(np.int16)
            for _ in range(300):  # 3 s in real time
                await source.capture_frame(rtc.AudioFrame(tone.tobytes(), 48_000, 1, 480))
            following.cancel()
            return jitter.seconds
        finally:
            await talker.disconnect()
            await listener.disconnect()

    seconds = asyncio.run(run())
    assert 0.005 < seconds < 0.5
