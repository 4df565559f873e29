"""The worker's turn latency: from the caller's last sound when Smart Turn heard it."""

import asyncio

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.llm import ChatMessage
from livekit.agents.voice import ConversationItemAddedEvent
from prometheus_client import REGISTRY

from morgana.agent import metrics
from morgana.agent.turn import SAMPLE_RATE, LastSound, SmartTurnDetector, SmartTurnModel
from morgana.agent.worker import turn_metrics_recorder

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
