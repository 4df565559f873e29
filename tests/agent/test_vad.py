"""The caller's voice activity (morgana.agent.vad): Silero on either runtime hears the same speech
in real (espeak-ng) audio, and the native one runs inline on the call's event loop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import inference
from livekit.agents.vad import VAD, VADEventType
from livekit.plugins import silero

from morgana.agent.config import AgentSettings
from morgana.agent.vad import InlineExecutor, load_vads
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.voice_client import SAMPLE_RATE, speech_pcm
from tests.agent.pauses import FINISHED, REST
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(120)

WINDOW = 0.032  # one Silero window at 16 kHz


def test_the_inline_executor_runs_a_task_in_the_awaiting_thread_and_hands_back_its_error() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(InlineExecutor(), threading.get_ident) == threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(InlineExecutor(), divmod, 1, 0)

    asyncio.run(run())


def test_native_silero_is_the_default_and_both_windows_share_one_model() -> None:
    settings = AgentSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.vad_runtime == "native"
    native = load_vads("native", 0.15, 0.05, 0.3)
    assert isinstance(native.turn, inference.VAD) and isinstance(native.stt, inference.VAD)
    assert (native.turn.min_silence_duration, native.stt.min_silence_duration) == (0.15, 0.05)
    assert native.turn._opts.deactivation_threshold == native.stt._opts.deactivation_threshold == 0.3
    # One executor, and it is the inline one: a window costs less than a thread hop.
    assert isinstance(native.turn._executor, InlineExecutor) and native.turn._executor is native.stt._executor

    onnx = load_vads("onnx", 0.6, 0.05)
    assert isinstance(onnx.turn, silero.VAD) and isinstance(onnx.stt, silero.VAD)
    assert (onnx.turn.min_silence_duration, onnx.stt.min_silence_duration) == (0.6, 0.05)
    assert onnx.stt._onnx_session is onnx.turn._onnx_session  # not the model loaded twice (9 MiB)


def utterances(vad: VAD, audio: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) of each stretch of speech the VAD hears, in seconds of the audio, pushed as a
    room delivers it (50 ms frames)."""

    async def run() -> list[tuple[float, float]]:
        stream = vad.stream()
        heard: list[tuple[float, float]] = []
        started = 0.0

        async def read() -> None:
            nonlocal started
            async for event in stream:
                if event.type == VADEventType.START_OF_SPEECH:
                    started = event.timestamp - event.speech_duration
                elif event.type == VADEventType.END_OF_SPEECH:
                    heard.append((started, event.timestamp - event.silence_duration))

        reader = asyncio.create_task(read())
        step = SAMPLE_RATE // 20
        for begin in range(0, len(audio) - step + 1, step):
            stream.push_frame(rtc.AudioFrame(audio[begin : begin + step].tobytes(), SAMPLE_RATE, 1, step))
            await asyncio.sleep(0)
        stream.end_input()
        await reader
        return heard

    return asyncio.run(run())


def test_both_runtimes_hear_the_same_speech_in_real_audio(fake_openai: FakeOpenAIProcess) -> None:
    def quiet(seconds: float) -> np.ndarray:
        return np.zeros(int(SAMPLE_RATE * seconds), dtype=np.int16)

    first = speech_pcm(fake_openai.root_url, OPENAI_KEY, FINISHED)
    second = speech_pcm(fake_openai.root_url, OPENAI_KEY, REST)
    audio = np.concatenate([quiet(1.0), first, quiet(1.5), second, quiet(1.5)])
    # Where the speech really is: its first and last loud samples.
    loud = [
        (offset + np.flatnonzero(np.abs(part) > 300)[[0, -1]] / SAMPLE_RATE)
        for offset, part in ((1.0, first), (1.0 + len(first) / SAMPLE_RATE + 1.5, second))
    ]

    native = utterances(load_vads("native", 0.15, 0.05).turn, audio)
    onnx = utterances(load_vads("onnx", 0.15, 0.05).turn, audio)
    assert len(native) == len(onnx) == 2, (native, onnx)
    for (n_start, n_end), (o_start, o_end), (start, end) in zip(native, onnx, loud, strict=True):
        # The same stretches, one window or so apart (the onnx runtime smooths its probabilities).
        assert abs(n_start - o_start) <= 2 * WINDOW and abs(n_end - o_end) <= 2 * WINDOW, (native, onnx)
        # And where the speech is, give or take the VAD's own windows and prefix.
        assert start - 0.6 <= n_start <= start + 0.2 and end - 0.2 <= n_end <= end + 0.3, (native, loud)
