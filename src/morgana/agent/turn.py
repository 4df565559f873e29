"""Offline semantic end-of-turn detection with Smart Turn v3.2, as a livekit-agents turn detector.

Silence alone cannot tell "I want to book a flight to..." from "What time is it?": a short
endpointing delay cuts the first caller off, a long one makes every answer slow. Smart Turn
(pipecat-ai, BSD-2-Clause) is an 8.7 MB ONNX model that hears whether the last 8 s of speech
sound finished, from the audio itself (intonation, not words), in about 10-100 ms of one core.
It ships in the pinned `pipecat-ai` wheel, so nothing is fetched at run time: self-hosted and
air-gapped clusters work as they are. LiveKit's own turn detector downloads its weights.

livekit-agents drives it through its streaming turn-detector protocol (`voice.turn`): the
caller's audio is pushed in as it arrives; after a short VAD silence the framework asks for a
prediction (and drops it if the caller speaks again); when the turn would end, a probability below
the threshold makes it wait up to the maximum endpointing delay instead of the minimum one, unless
the caller goes on speaking.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime
from livekit import rtc
from livekit.agents import APIConnectOptions
from livekit.agents.language import LanguageCode
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.agents.voice import audio_recognition
from livekit.agents.voice.turn import TurnDetectionEvent

MODEL_NAME = "smart-turn-v3.2"
SAMPLE_RATE = 16_000  # what the model was trained on
WINDOW_SAMPLES = 8 * SAMPLE_RATE  # it hears the last 8 s, zero-padded in front when shorter

# Samples quieter than this (of 32767) count as the quiet after the caller's last sound.
_QUIET = 100

_Audio = npt.NDArray[np.float32]

log = logging.getLogger("morgana.agent.turn")


def predict_after_silence(seconds: float) -> None:
    """Make livekit-agents ask for a prediction after `seconds` of VAD silence, in this process.

    The framework waits 200 ms, what its own audio models need. The prediction (~90 ms of a core)
    was then the last thing a turn waited for: asked at 100 ms, it is ready before the transcript
    and the turn ends about 60 ms sooner (`bench.voice_bench`); the stream pads the quiet the model
    hears (`SmartTurnDetector.heard_silence`), so the verdict does not change. There is no option
    for it: the framework reads this module constant on every VAD result (and to check the VAD's
    window, which must stay 50 ms longer).
    """
    framework = vars(audio_recognition)  # the constant is not exported
    if not isinstance(framework.get("MIN_SILENCE_DURATION_MS"), int):
        raise RuntimeError(
            "livekit-agents no longer reads voice.audio_recognition.MIN_SILENCE_DURATION_MS: "
            "see morgana.agent.turn.predict_after_silence"
        )
    framework["MIN_SILENCE_DURATION_MS"] = round(seconds * 1000)


class _FeatureModule(Protocol):
    def compute_whisper_log_mel_features(self, audio: _Audio, *, do_normalize: bool = True) -> _Audio: ...


def _pipecat_dir() -> Path:
    # Found, not imported: `import pipecat` needs loguru and prints a banner, and the two files
    # used here need neither.
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pipecat-ai wheel (Smart Turn's model) is not installed")
    return Path(spec.submodule_search_locations[0]) / "audio" / "turn" / "smart_turn"


def bundled_model_path() -> Path:
    return _pipecat_dir() / "data" / "smart-turn-v3.2-cpu.onnx"


def _load_features() -> _FeatureModule:
    """pipecat's numpy-only Whisper log-mel extractor: exactly the features the model was trained on."""
    path = _pipecat_dir() / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("morgana_smart_turn_features", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SmartTurnModel:
    """The ONNX session, loaded once per process (in prewarm) and shared by its calls."""

    def __init__(self, path: Path | None = None, *, threads: int = 1) -> None:
        options = onnxruntime.SessionOptions()
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # One thread: a worker serves several calls per core, and their predictions interleave.
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(
            str(path or bundled_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._features = _load_features()
        # Inference runs off the event loop, one at a time per process (the session is single-threaded).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")

    def probability(self, audio: _Audio, options: onnxruntime.RunOptions | None = None) -> float:
        """How likely the speech in `audio` (16 kHz mono, -1..1) is a finished turn."""
        window = audio[-WINDOW_SAMPLES:]
        if len(window) < WINDOW_SAMPLES:
            window = np.pad(window, (WINDOW_SAMPLES - len(window), 0))
        features = self._features.compute_whisper_log_mel_features(window, do_normalize=True)
        (output,) = self._session.run(None, {"input_features": features[np.newaxis]}, options)
        return float(np.asarray(output).reshape(-1)[0])

    def predict(self, audio: _Audio) -> Inference:
        options = onnxruntime.RunOptions()
        job = self._executor.submit(self.probability, audio, options)
        return Inference(asyncio.wrap_future(job), job, options)


@dataclass(frozen=True)
class Inference:
    """One prediction on the process's inference thread."""

    result: asyncio.Future[float]
    job: Future[float]
    _options: onnxruntime.RunOptions

    def stop(self) -> None:
        """Drop it. Not begun, it never runs; running, ONNX Runtime stops between kernels. A stale
        run would otherwise take its ~90 ms of the core and delay the next prediction by as much:
        with the prediction asked after 0.1 s of silence, every short pause mid-sentence starts one."""
        self.result.cancel()
        self._options.terminate = True


class _Named:
    """What the framework's metrics and traces call the detector and its streams."""

    @property
    def model(self) -> str:
        return MODEL_NAME

    @property
    def provider(self) -> str:
        return "pipecat"


@dataclass
class LastSound:
    """When the caller's last sound before the latest prediction reached this worker (time.time()).

    livekit-agents dates the end of speech from its VAD, which counts silence 0.1-0.2 s after the
    sound has stopped; the audio itself says when it did.
    """

    at: float | None = None

    def take(self) -> float | None:
        """The time, once: a later reply without a prediction before it must not reuse it."""
        at, self.at = self.at, None
        return at


@dataclass(frozen=True)
class SmartTurnDetector(_Named):
    """A livekit-agents streaming turn detector (`turn_handling={"turn_detection": ...}`)."""

    smart_turn: SmartTurnModel
    threshold: float = 0.5
    prediction_timeout: float = 1.0
    # The quiet the model hears after the caller's last sound: less is padded with silence, which
    # is what it will hear if the caller stays quiet (if they speak, the framework drops the
    # prediction). Padded to 0.5 s, "What time is it?" over real calls (Opus, gain control) scored
    # 0.29-0.94: 3 of 13 turns of one benchmark run sounded unfinished and waited
    # MAX_ENDPOINTING_DELAY. The audio of 14 such turns, padded to 0.8 s, scored 0.89-0.99.
    # Hesitations ("Book me a flight to, um,") stay at 0.01 with any padding up to 1 s.
    heard_silence: float = 0.8
    last_sound: LastSound = field(default_factory=LastSound)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SmartTurnStream:
        return SmartTurnStream(self)


class SmartTurnStream(_Named):
    """One caller's audio since their turn began (at most the model's window), and its predictions."""

    def __init__(self, detector: SmartTurnDetector) -> None:
        self._detector = detector
        self._chunks: deque[npt.NDArray[np.int16]] = deque()
        self._arrivals: deque[float] = deque()  # when each chunk's last sample arrived (time.time())
        self._samples = 0
        self._clock = time.time
        self._resampler: rtc.AudioResampler | None = None
        self._input_rate: int | None = None
        self._pending: asyncio.Future[TurnDetectionEvent] | None = None
        self._inference: Inference | None = None
        self._closed = False

    @property
    def is_fallback(self) -> bool:
        return False

    @property
    def prediction_timeout(self) -> float:
        return self._detector.prediction_timeout

    async def unlikely_threshold(self, language: LanguageCode | None) -> float | None:
        return self._detector.threshold

    async def backchannel_threshold(self, language: LanguageCode | None) -> float | None:
        return None  # the model gives no backchannel signal

    async def supports_language(self, language: LanguageCode | None) -> bool:
        # It hears intonation, not words; trained on 23 languages.
        return True

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        if self._closed:
            return
        if frame.sample_rate != self._input_rate:
            self._input_rate = frame.sample_rate
            self._resampler = (
                None if frame.sample_rate == SAMPLE_RATE else rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE)
            )
        frames = self._resampler.push(frame) if self._resampler is not None else [frame]
        arrived = self._clock()
        for piece in frames:
            samples = np.frombuffer(piece.data, dtype=np.int16)
            if piece.num_channels > 1:
                samples = samples.reshape(-1, piece.num_channels).mean(axis=1).astype(np.int16)
            self._append(samples, arrived)

    def _append(self, samples: npt.NDArray[np.int16], arrived: float) -> None:
        self._chunks.append(samples)
        self._arrivals.append(arrived)
        self._samples += len(samples)
        while self._chunks and self._samples - len(self._chunks[0]) >= WINDOW_SAMPLES:
            self._samples -= len(self._chunks.popleft())
            self._arrivals.popleft()

    def trailing_silence(self) -> tuple[float, float | None]:
        """Seconds of quiet at the end of the buffered audio, and when the last sound before it
        arrived (None if all of it is quiet)."""
        quiet = 0
        for chunk, arrived in zip(reversed(self._chunks), reversed(self._arrivals), strict=True):
            loud = np.flatnonzero(np.abs(chunk.astype(np.int32)) >= _QUIET)
            if len(loud):
                after = len(chunk) - 1 - int(loud[-1])
                return (quiet + after) / SAMPLE_RATE, arrived - after / SAMPLE_RATE
            quiet += len(chunk)
        return quiet / SAMPLE_RATE, None

    def audio(self) -> _Audio:
        """The buffered audio as the model takes it (16 kHz, float32)."""
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0

    def predict(self) -> asyncio.Future[TurnDetectionEvent]:
        self.cancel_inference()
        asked_at = time.time()
        started = time.perf_counter()
        silence, self._detector.last_sound.at = self.trailing_silence()
        audio = self.audio()
        if (missing := round((self._detector.heard_silence - silence) * SAMPLE_RATE)) > 0:
            audio = np.concatenate([audio, np.zeros(missing, dtype=np.float32)])
        inference = self._detector.smart_turn.predict(audio)
        result: asyncio.Future[TurnDetectionEvent] = asyncio.get_running_loop().create_future()

        def done(finished: asyncio.Future[float]) -> None:
            if result.done():
                return
            if finished.cancelled():
                result.cancel()
            elif (error := finished.exception()) is not None:
                result.set_exception(error)
            else:
                elapsed = time.perf_counter() - started
                log.info(
                    "turn prediction",
                    extra={
                        "probability": round(finished.result(), 3),
                        "silence_ms": round(silence * 1000),
                        "inference_ms": round(elapsed * 1000),
                    },
                )
                result.set_result(
                    TurnDetectionEvent(
                        type="eot_prediction",
                        end_of_turn_probability=finished.result(),
                        last_speaking_time=asked_at,
                        detection_delay=elapsed,
                        inference_duration=elapsed,
                    )
                )

        inference.result.add_done_callback(done)
        self._pending, self._inference = result, inference
        return result

    def cancel_inference(self, *, timed_out: bool = False) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        # And the model run itself: a stale one on the process's one inference thread would delay
        # the next prediction by a whole run.
        if self._inference is not None and not self._inference.result.done():
            self._inference.stop()
        self._pending = self._inference = None

    def flush(self, reason: str | None = None) -> None:
        """The turn was committed or cleared: the next prediction hears only what follows."""
        self.cancel_inference()
        self._chunks.clear()
        self._arrivals.clear()
        self._samples = 0

    def end_input(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.end_input()
        self.flush()
