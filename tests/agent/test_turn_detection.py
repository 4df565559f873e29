"""End of turn with the offline Smart Turn model: on real (espeak-ng) speech, alone and in a call.

A caller who pauses mid-sentence keeps the turn; with silence alone deciding (TURN_DETECTOR=vad,
the same short windows) the same speech is cut in two. The stand-in speech-to-text answers queued
transcripts, one per stretch of speech the VAD sends it.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from livekit import rtc
from livekit.agents.voice import audio_recognition
from livekit.agents.voice.turn import _StreamingTurnDetector, _StreamingTurnDetectorStream
from livekit.plugins import silero
from pydantic import ValidationError

from morgana.agent.config import AgentSettings
from morgana.agent.turn import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    SmartTurnDetector,
    SmartTurnModel,
    predict_after_silence,
)
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker
from morgana_devtools.services import eventually_async
from morgana_devtools.voice_client import SAMPLE_RATE as CALLER_RATE
from morgana_devtools.voice_client import Caller, direct_token, speech_pcm
from tests.agent.history import agent_sessions
from tests.agent.pauses import FINISHED, UNFINISHED, pause_mid_sentence
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurnModel:
    return SmartTurnModel()


def probability(model: SmartTurnModel, samples: np.ndarray, *, silence_s: float = 0.2) -> float:
    """What the detector says after the caller's 48 kHz speech and `silence_s` of quiet, pushed as
    the 10 ms frames a room delivers."""

    async def run() -> float:
        stream = SmartTurnDetector(model).stream()
        audio = np.concatenate([samples, np.zeros(int(CALLER_RATE * silence_s), dtype=np.int16)])
        step = CALLER_RATE // 100
        for start in range(0, len(audio) - step + 1, step):
            stream.push_audio(rtc.AudioFrame(audio[start : start + step].tobytes(), CALLER_RATE, 1, step))
        event = await stream.predict()
        await stream.aclose()
        return event.end_of_turn_probability

    return asyncio.run(run())


def test_smart_turn_tells_a_finished_question_from_an_unfinished_phrase(
    smart_turn: SmartTurnModel, fake_openai: FakeOpenAIProcess
) -> None:
    finished = probability(smart_turn, speech_pcm(fake_openai.root_url, OPENAI_KEY, FINISHED))
    unfinished = probability(smart_turn, speech_pcm(fake_openai.root_url, OPENAI_KEY, UNFINISHED))
    assert finished > 0.5 > unfinished, (finished, unfinished)
    # With a margin (0.97 here): heard with only 0.5 s of quiet the question scored 0.85, and in
    # calls (Opus, gain control) it fell below 0.5 on some turns, which then waited 3 s.
    assert finished > 0.9, finished


def test_the_stream_keeps_the_models_window_and_forgets_a_committed_turn(smart_turn: SmartTurnModel) -> None:
    async def run() -> None:
        detector = SmartTurnDetector(smart_turn)
        stream = detector.stream()
        # What livekit-agents checks to drive it as an audio turn detector (its protocols are
        # structural: an upgrade that changes them fails here, not silently in calls).
        assert isinstance(detector, _StreamingTurnDetector)
        assert isinstance(stream, _StreamingTurnDetectorStream)
        step = CALLER_RATE // 100
        tone = (3000 * np.sin(np.arange(step) / 7)).astype(np.int16).tobytes()
        for _ in range(1000):  # 10 s at 48 kHz, resampled to 16 kHz
            stream.push_audio(rtc.AudioFrame(tone, CALLER_RATE, 1, step))
        heard = len(stream.audio())
        assert WINDOW_SAMPLES <= heard < WINDOW_SAMPLES + SAMPLE_RATE // 10
        stream.flush(reason="turn committed")
        assert len(stream.audio()) == 0
        # A prediction asked for and then cancelled (the caller spoke again) never resolves.
        pending = stream.predict()
        stream.cancel_inference()
        assert pending.cancelled()
        await stream.aclose()

    asyncio.run(run())


class _Recording(SmartTurnModel):
    """The real model, keeping what it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[np.ndarray] = []
        self.began = threading.Event()

    def probability(self, audio: np.ndarray, options: onnxruntime.RunOptions | None = None) -> float:
        self.heard.append(audio)
        self.began.set()
        return super().probability(audio, options)


def test_the_model_hears_the_set_quiet_however_early_it_is_asked() -> None:
    """Asked 0.1 s into a pause, the model hears the quiet it would hear if the caller stays quiet
    (`heard_silence`, 0.8 s)."""
    model = _Recording()

    def quiet_heard(speech_s: float, quiet_s: float) -> float:
        async def run() -> float:
            stream = SmartTurnDetector(model).stream()
            tone = (3000 * np.sin(np.arange(int(SAMPLE_RATE * speech_s)) / 7)).astype(np.int16)
            audio = np.concatenate([tone, np.zeros(int(SAMPLE_RATE * quiet_s), dtype=np.int16)])
            stream.push_audio(rtc.AudioFrame(audio.tobytes(), SAMPLE_RATE, 1, len(audio)))
            await stream.predict()
            await stream.aclose()
            heard = model.heard[-1]
            return (len(heard) - 1 - int(np.flatnonzero(np.abs(heard) > 0.01)[-1])) / SAMPLE_RATE

        return asyncio.run(run())

    assert quiet_heard(1.0, 0.1) == pytest.approx(0.8, abs=0.002)
    assert quiet_heard(1.0, 0.0) == pytest.approx(0.8, abs=0.002)
    assert quiet_heard(1.0, 1.2) == pytest.approx(1.2, abs=0.002)  # more is not cut


def test_livekit_agents_asks_for_predictions_after_the_silence_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """`predict_after_silence` moves the framework's own threshold, read where it decides (the VAD
    window check reads it as the prediction trigger does): an upgrade that stops reading it fails here."""
    framework = vars(audio_recognition)  # the constant is not exported
    monkeypatch.setitem(framework, "MIN_SILENCE_DURATION_MS", framework["MIN_SILENCE_DURATION_MS"])
    detector = SmartTurnDetector(SimpleNamespace())  # type: ignore[arg-type]

    def vad_window_allowed(seconds: float) -> bool:
        vad = silero.VAD.load(min_silence_duration=seconds)
        recognition = SimpleNamespace(_turn_detector=detector, _vad=vad)
        try:
            audio_recognition.AudioRecognition._check_vad_silence_requirement(recognition)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    assert not vad_window_allowed(0.2)  # the framework's own 200 ms + 50
    predict_after_silence(0.1)
    assert framework["MIN_SILENCE_DURATION_MS"] == 100
    assert vad_window_allowed(0.15) and not vad_window_allowed(0.14)


def test_settings_refuse_a_vad_window_that_ends_before_the_prediction() -> None:
    assert AgentSettings(smart_turn_after_silence_seconds=0.1, vad_min_silence_seconds=0.15)
    with pytest.raises(ValidationError, match=r"VAD_MIN_SILENCE_SECONDS must be at least 0\.25"):
        AgentSettings(smart_turn_after_silence_seconds=0.2, vad_min_silence_seconds=0.2)
    # Silence alone ends turns: no prediction to wait for.
    assert AgentSettings(turn_detector="vad", smart_turn_after_silence_seconds=0.2, vad_min_silence_seconds=0.1)


def test_a_dropped_prediction_stops_the_model_run() -> None:
    """A prediction the caller talked over frees the inference thread instead of running to its end."""
    model = _Recording()

    async def run() -> None:
        audio = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        inference = model.predict(audio)
        assert await asyncio.to_thread(model.began.wait, 30)
        inference.stop()
        assert inference.result.cancelled()
        with pytest.raises(Exception, match="terminate"):
            inference.job.result(timeout=30)  # stopped: no probability was computed
        assert 0 <= await model.predict(audio).result <= 1  # the next one runs

    asyncio.run(run())


@pytest.fixture(scope="module")
def silence_only_worker(agent_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentWorker]:
    """A worker with the same short windows as the default, but silence alone ending turns."""
    env = {**agent_env, "LIVEKIT_AGENT_NAME": "morgana-agent-vad", "TURN_DETECTOR": "vad"}
    worker = AgentWorker(env, tmp_path_factory.mktemp("agent-vad") / "agent.log").start()
    yield worker
    worker.stop()


def test_a_pause_mid_sentence_keeps_the_turn(voice_api, agent_worker, fake_openai: FakeOpenAIProcess) -> None:
    fake_openai.queue_transcripts("Book me a flight to um", "Paris next Monday")

    async def join() -> Caller:
        caller = Caller(voice_api.url)
        await caller.join()
        return caller

    caller, paused_at, ended_at = pause_mid_sentence(join, fake_openai)

    # Nothing was said into the pause, and the one reply answers the whole sentence.
    assert [t for t, level in caller.heard if paused_at <= t < ended_at and level > 300] == []
    whole = "Book me a flight to um Paris next Monday"
    assert caller.agent_texts() == [f"You said: {whole}"]
    assert asyncio.run(caller.history()) == [("user", whole, "voice"), ("assistant", f"You said: {whole}", "voice")]


def test_silence_alone_cuts_the_same_caller_off(
    livekit, silence_only_worker: AgentWorker, fake_openai: FakeOpenAIProcess, voice_env: dict
) -> None:
    agents_own = len(agent_sessions(voice_env))
    fake_openai.queue_transcripts("Book me a flight to um", "Paris next Monday")

    async def join() -> Caller:
        caller = Caller("")
        await caller.connect(livekit.url, direct_token(livekit, "caller-vad", "morgana-agent-vad"))
        return caller

    caller, paused_at, ended_at = pause_mid_sentence(join, fake_openai)

    assert caller.first_audio_after(paused_at) is not None
    assert caller.first_audio_after(paused_at) < ended_at  # answered into the pause
    assert caller.agent_texts()[0] == "You said: Book me a flight to um"
    # A room opened with a token minted elsewhere carries no call credential: its turns go to a
    # session of the agent's own account.
    assert len(agent_sessions(voice_env)) == agents_own + 1


@pytest.fixture(scope="module")
def long_turn_worker(agent_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentWorker]:
    """A worker whose turns end only after 0.8 s of VAD silence, speech-to-text's window at its
    default (STT_VAD_MIN_SILENCE_SECONDS), and no reply before the turn ends."""
    env = {
        **agent_env,
        "LIVEKIT_AGENT_NAME": "morgana-agent-long-turn",
        "VAD_MIN_SILENCE_SECONDS": "0.8",
        "PREEMPTIVE_GENERATION": "false",
    }
    worker = AgentWorker(env, tmp_path_factory.mktemp("agent-long-turn") / "agent.log").start()
    yield worker
    worker.stop()


def test_the_speech_goes_to_speech_to_text_before_the_turn_ends(
    livekit, long_turn_worker: AgentWorker, fake_openai: FakeOpenAIProcess
) -> None:
    """The transcript is asked for after the short STT window, not the turn's: a reply started on
    it (preemptive generation) can be ready when the turn ends."""
    fake_openai.set_transcript(FINISHED)
    question = speech_pcm(fake_openai.root_url, OPENAI_KEY, FINISHED)

    async def talk() -> None:
        caller = Caller("")
        await caller.connect(livekit.url, direct_token(livekit, "caller-long-turn", "morgana-agent-long-turn"))
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            ended_at = await caller.say(question, trailing_silence_s=2.0)
            await eventually_async(lambda: caller.first_audio_after(ended_at) is not None, 30, what="a reply heard")
        finally:
            await caller.leave()

    began = time.time()  # after the caller's own speech was made by the stand-in's TTS
    asyncio.run(talk())
    transcribed = [r["started_at"] for r in fake_openai.audio_requests("transcriptions")]
    spoken = [r["started_at"] for r in fake_openai.audio_requests("speech") if r["started_at"] > began]
    assert len(transcribed) == 1 and len(spoken) == 1, (transcribed, spoken)
    # The reply's speech is asked for once the 0.8 s turn window has ended; the transcript long
    # before. On the turn's own window, both come within a few tens of milliseconds.
    assert spoken[0] - transcribed[0] > 0.4, spoken[0] - transcribed[0]
