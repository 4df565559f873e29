"""A stand-in for the OpenAI API used by tests, ``make run`` and benchmarks.

It speaks the real Chat Completions wire protocol (JSON bodies, server-sent events,
OpenAI error bodies), so the official ``openai`` SDK and ``langchain_openai.ChatOpenAI``
run against it unchanged. By default it answers ``"You said: <last user message>"``.

It also serves the audio endpoints, so the SDK and ``livekit-plugins-openai``'s ``STT`` and
``TTS`` run against it unchanged:

- ``POST /v1/audio/speech`` answers with *real* speech of ``input``, synthesised by
  ``espeak-ng`` (a system package: ``scripts/install-test-deps.sh``) and resampled to OpenAI's
  24 kHz mono 16-bit. ``response_format``: ``wav``, ``pcm`` (raw s16le), and ``mp3``, ``opus``
  (Ogg), ``aac`` (ADTS), ``flac`` encoded with PyAV when it is importable (else a 400 saying
  so). ``stream_format="sse"`` wraps the same bytes, base64, in ``speech.audio.delta`` events
  followed by ``speech.audio.done`` (rejected for ``tts-1``/``tts-1-hd``, as OpenAI does).
  The audio is synthesised in one go (espeak-ng is ~100x real time) and streamed in ~100 ms
  chunks. Without espeak-ng the endpoint fails loudly: a 500 whose message names espeak-ng.
- ``POST /v1/audio/transcriptions`` (multipart) cannot recognise speech, so the transcript it
  returns is, per request, the first of: the head of the transcript queue
  (``POST /_control/transcripts {"texts": [...]}``, one consumed per successful request),
  the sticky transcript (``POST /_control/transcript {"text": ...}``; ``null`` clears it),
  the ``--transcript`` default (``"Hello Morgana"``). The upload must be real audio: WAV is
  parsed with the stdlib, other containers (mp3, ogg, flac, webm, ...) with PyAV when present;
  anything else is a 400 like OpenAI's. Its duration, sample rate, channels and RMS/peak level
  (0..1 of full scale) are recorded so tests can check that real speech was sent.
  ``response_format``: ``json`` (``{"text", "usage"}``; token usage for ``gpt-*`` models and
  duration usage for ``whisper-*``, as OpenAI bills them), ``text`` and ``verbose_json``
  (``whisper-*`` models only, as with OpenAI); ``srt``/``vtt`` get a 400.

*Scenarios* make it behave differently on demand: a fixed reply or reply length,
delays, HTTP errors, streams that break or stall. Each endpoint has its own sticky scenario
and one-shot queue, chosen with an ``"endpoint"`` key in the control body: ``"chat"`` (the
default), ``"transcriptions"`` or ``"speech"``. Per chat request the first of these wins:

1. a directive in the last user message, e.g. ``"hi [[fake tokens=5 delay_ms=20]]"``
   (stripped from the echoed text);
2. the head of the one-shot queue (``POST /_control/queue``);
3. the sticky scenario (``POST /_control/scenario``; ``{}`` clears it);
4. the server defaults given on the command line.

Audio requests use 2 and 3 of their endpoint (no directives, no CLI defaults), and accept
only the fields that mean something there:

- ``transcriptions``: ``status`` (answer with that HTTP error and an OpenAI error body) and
  ``first_delay_ms`` (wait before answering). A scenario is taken from the queue only by a
  request whose upload is valid; a failed request does not consume a transcript.
- ``speech``: ``status``; ``first_delay_ms`` (headers go out at once, the first audio chunk
  after the delay, as with chat streams); ``delay_ms`` between chunks; ``fail_after`` N chunks
  (drop the connection; ``fail_mode`` may only be ``"abort"``); ``stall_after`` N chunks for
  ``stall_seconds``.

Test-control endpoints (unauthenticated): ``POST /_control/scenario`` and
``POST /_control/queue`` (a JSON ``Scenario``, plus optional ``"endpoint"``),
``GET /_control/scenario`` (all endpoints), ``POST /_control/reset`` (everything),
``GET /_control/requests`` (last 1000 chat requests with their outcome),
``GET /_control/audio_requests[?endpoint=transcriptions|speech]`` (last 1000 audio requests,
see ``TranscriptionRecord`` and ``SpeechRecord``), ``POST /_control/transcripts``,
``POST /_control/transcript``, ``GET /_control/transcripts`` (queue, sticky, default) and
``GET /_control/stats`` (chat counters and open streams, plus ``transcriptions_*`` and
``speech_*`` counters and ``open_speech_streams``).

Run it with ``python -m morgana.devtools.openai_server --port 0`` (prints
``LISTENING http://127.0.0.1:<port>``), or from Python::

    with FakeOpenAIProcess(transcript="Hello Morgana") as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="anything")
        fake.queue_transcripts("first", "second")   # then the default
        fake.queue_scenario(endpoint="speech", status=429)
        ...
        fake.audio_requests("transcriptions")[-1]["rms"]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import wave
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from queue import Empty, Queue
from types import TracebackType
from typing import IO, Any, Final, Self, TypeVar

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "AudioInfo",
    "FakeOpenAIConfig",
    "FakeOpenAIProcess",
    "FakeOpenAIState",
    "Scenario",
    "analyze_audio",
    "create_app",
    "espeak_available",
    "main",
    "serve",
    "synthesize_pcm",
]

DEFAULT_MODEL: Final = "gpt-4o-mini"
SYSTEM_FINGERPRINT: Final = "fp_morgana"
OWNER: Final = "morgana-dev"
MAX_RECORDS: Final = 1000
FAIL_MODES: Final = frozenset({"abort", "error_event"})
LISTENING_PREFIX: Final = "LISTENING "
DEFAULT_TRANSCRIPT: Final = "Hello Morgana"
ENDPOINTS: Final = ("chat", "transcriptions", "speech")

_FILLER_WORDS: Final = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)  # fmt: skip
_TOKEN_RE: Final = re.compile(r"\s*\S+")
_DIRECTIVE_RE: Final = re.compile(r"\[\[fake\b(?P<args>[^\]]*)\]\]")
_DONE: Final = b"data: [DONE]\n\n"
_STREAM_ERROR_EVENT: Final = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":null}}\n\n'
)


# --------------------------------------------------------------------------- scenarios


class ScenarioError(ValueError):
    """A scenario (from the control API or a directive) is malformed."""


def _as_text(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ScenarioError(f"{name} must be a string")
    return str(value)


def _as_count(name: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScenarioError(f"{name} must be a non-negative integer")
    return value


def _as_amount(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ScenarioError(f"{name} must be a non-negative number")
    return float(value)


def _as_status(name: str, value: object) -> int:
    status = _as_count(name, value)
    if not 400 <= status <= 599:
        raise ScenarioError(f"{name} must be an HTTP error status (400-599)")
    return status


def _as_fail_mode(name: str, value: object) -> str:
    if value not in FAIL_MODES:
        raise ScenarioError(f"{name} must be one of {sorted(FAIL_MODES)}")
    return str(value)


_FIELD_PARSERS: Final[Mapping[str, Callable[[str, object], object]]] = {
    "reply": _as_text,
    "tokens": _as_count,
    "first_delay_ms": _as_amount,
    "delay_ms": _as_amount,
    "status": _as_status,
    "fail_after": _as_count,
    "fail_mode": _as_fail_mode,
    "stall_after": _as_count,
    "stall_seconds": _as_amount,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """How the server answers a chat request; ``None`` means "not set, use the defaults".

    - ``reply``: exact reply text (wins over ``tokens``); ``tokens``: reply of exactly N tokens.
    - ``first_delay_ms``: pause before the first token; ``delay_ms``: pause between tokens.
    - ``status``: answer at once with this HTTP error status and an OpenAI error body.
    - ``fail_after`` + ``fail_mode``: after N tokens either drop the connection (``"abort"``)
      or send an in-stream error event and end the stream (``"error_event"``).
    - ``stall_after`` + ``stall_seconds``: after N tokens go silent (default 3600 s).
    """

    reply: str | None = None
    tokens: int | None = None
    first_delay_ms: float | None = None
    delay_ms: float | None = None
    status: int | None = None
    fail_after: int | None = None
    fail_mode: str | None = None
    stall_after: int | None = None
    stall_seconds: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Scenario:
        """Validate and build a scenario from JSON-ish data; ``None`` values are ignored."""
        unknown = sorted(set(data) - set(_FIELD_PARSERS))
        if unknown:
            raise ScenarioError(f"unknown scenario field(s): {', '.join(unknown)}")
        parsed = {k: _FIELD_PARSERS[k](k, v) for k, v in data.items() if v is not None}
        return cls(**parsed)  # type: ignore[arg-type]

    def over(self, base: Scenario) -> Scenario:
        """Return ``base`` with every field that is set here overriding it."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, object]:
        """The set fields as a JSON object."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_ENDPOINT_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "chat": frozenset(_FIELD_PARSERS),
    "transcriptions": frozenset({"status", "first_delay_ms"}),
    "speech": frozenset(
        {"status", "first_delay_ms", "delay_ms", "fail_after", "fail_mode", "stall_after", "stall_seconds"}
    ),
}


def scenario_for_endpoint(data: Mapping[str, object]) -> tuple[str, Scenario]:
    """Split the optional ``"endpoint"`` key off a control body and validate the rest for it."""
    fields_ = dict(data)
    endpoint = fields_.pop("endpoint", None)
    endpoint = "chat" if endpoint is None else endpoint
    if endpoint not in ENDPOINTS:
        raise ScenarioError(f"endpoint must be one of {list(ENDPOINTS)}")
    assert isinstance(endpoint, str)
    scenario = Scenario.from_mapping(fields_)
    unsupported = sorted(set(scenario.to_json()) - _ENDPOINT_FIELDS[endpoint])
    if unsupported:
        allowed = ", ".join(sorted(_ENDPOINT_FIELDS[endpoint]))
        raise ScenarioError(f"{endpoint} scenarios do not support {', '.join(unsupported)} (only {allowed})")
    if endpoint == "speech" and scenario.fail_mode not in (None, "abort"):
        raise ScenarioError('speech scenarios only support fail_mode "abort"')
    return endpoint, scenario


def _parse_scalar(raw: str) -> str | int | float:
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def parse_directive(text: str) -> tuple[Scenario | None, str]:
    """Split ``[[fake key=value ...]]`` out of a message: ``(scenario or None, remaining text)``."""
    match = _DIRECTIVE_RE.search(text)
    if match is None:
        return None, text
    params: dict[str, object] = {}
    for item in match.group("args").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ScenarioError(f"directive arguments must look like key=value, got {item!r}")
        params[key] = _parse_scalar(value)
    remaining = _DIRECTIVE_RE.sub("", text).strip()
    return Scenario.from_mapping(params), remaining


# --------------------------------------------------------------------------- text helpers


def tokenize(text: str) -> list[str]:
    """Split text into word tokens that keep their leading whitespace (join == text)."""
    tokens = _TOKEN_RE.findall(text)
    trailing = text[sum(map(len, tokens)) :]
    if trailing:
        if tokens:
            tokens[-1] += trailing
        else:
            tokens.append(trailing)
    return tokens


def filler_tokens(count: int) -> list[str]:
    """Exactly ``count`` tokens of filler text."""
    words = _FILLER_WORDS
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def content_text(content: object) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def count_words(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt "tokens": whitespace-separated words over all messages' content."""
    return sum(len(content_text(m.get("content")).split()) for m in messages)


# --------------------------------------------------------------------------- audio helpers

AUDIO_SAMPLE_RATE: Final = 24000  # what OpenAI's TTS produces (and its PCM format means)
MAX_UPLOAD_BYTES: Final = 25 * 1024 * 1024
MIN_AUDIO_SECONDS: Final = 0.1
MAX_SPEECH_INPUT: Final = 4096
UPLOAD_EXTENSIONS: Final = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
TRANSCRIPTION_FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt")
SPEECH_CONTENT_TYPES: Final[Mapping[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# response_format -> (PyAV container, encoder): Ogg Opus and ADTS AAC, as OpenAI sends them
_AV_ENCODINGS: Final[Mapping[str, tuple[str, str]]] = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}
SPEECH_VOICES: Final[Mapping[str, str]] = {  # OpenAI voice -> espeak-ng voice+variant
    "alloy": "en-us+f2",
    "ash": "en-us+m3",
    "ballad": "en-gb+m2",
    "coral": "en-us+f3",
    "echo": "en-us+m1",
    "fable": "en-gb+m4",
    "nova": "en-us+f4",
    "onyx": "en-us+m7",
    "sage": "en-us+f1",
    "shimmer": "en-us+f5",
    "verse": "en-us+m2",
    "marin": "en-us+f3",
    "cedar": "en-us+m6",
}
ESPEAK_WPM: Final = 175  # espeak-ng's default speaking rate; OpenAI's speed scales it
ESPEAK_TIMEOUT: Final = 30.0
ESPEAK_MISSING: Final = (
    "espeak-ng is not installed, so the fake OpenAI server cannot synthesise speech; "
    "run scripts/install-test-deps.sh (or apt-get install espeak-ng)"
)
SPEECH_CHUNK_BYTES: Final = AUDIO_SAMPLE_RATE * 2 // 10  # 100 ms of 24 kHz s16 mono
_LANGUAGE_NAMES: Final[Mapping[str, str]] = {
    "en": "english", "de": "german", "es": "spanish", "fr": "french", "it": "italian",
    "nl": "dutch", "pt": "portuguese", "ja": "japanese", "zh": "chinese", "ru": "russian",
}  # fmt: skip


class AudioDecodeError(ValueError):
    """An upload is not audio we can decode."""


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What an audio file contains: container/codec, length, rate and level (0..1 of full scale)."""

    format: str
    duration: float
    sample_rate: int
    channels: int
    rms: float
    peak: float

    @property
    def rms_dbfs(self) -> float:
        return -120.0 if self.rms <= 1e-6 else round(20 * math.log10(self.rms), 2)


def espeak_available() -> bool:
    """True if the ``espeak-ng`` binary that ``/v1/audio/speech`` needs is on ``PATH``."""
    return shutil.which("espeak-ng") is not None


def _level(samples: Any) -> tuple[float, float]:
    """(rms, peak) of float samples in [-1, 1]."""
    import numpy as np

    if samples.size == 0:
        return 0.0, 0.0
    values = samples.astype(np.float64)
    return float(np.sqrt(np.mean(values * values))), float(np.max(np.abs(values)))


def _pcm_to_float(raw: bytes, width: int) -> Any:
    import numpy as np

    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    if width == 3:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        values = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        values = np.where(values & 0x800000, values - 0x1000000, values)
        return values.astype(np.float32) / 8388608
    if width == 4:
        return np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    raise AudioDecodeError(f"unsupported sample width {width}")


def _analyze_wav(data: bytes) -> AudioInfo:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            # read to the end: streamed WAVs (espeak-ng, OpenAI) announce a bogus huge length
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, ValueError) as exc:
        raise AudioDecodeError(f"not a readable PCM WAV file: {exc}") from exc
    if rate <= 0 or channels <= 0:
        raise AudioDecodeError("WAV header has no sample rate or channels")
    frame = width * channels
    raw = raw[: len(raw) // frame * frame]
    rms, peak = _level(_pcm_to_float(raw, width))
    return AudioInfo("wav", len(raw) / frame / rate, rate, channels, rms, peak)


def _analyze_with_av(data: bytes) -> AudioInfo:
    try:
        import av
        import numpy as np
    except ImportError as exc:
        raise AudioDecodeError("only WAV can be decoded here (PyAV is not installed)") from exc
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            stream = container.streams.audio[0]
            channels = stream.codec_context.channels or 1
            resampler = av.AudioResampler(format="flt", layout="mono")
            chunks, rate = [], 0
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray().reshape(-1))
            fmt = container.format.name.split(",")[0]
    except AudioDecodeError:
        raise
    except Exception as exc:  # av.error.* for corrupt or unknown data
        raise AudioDecodeError(f"cannot decode audio: {exc}") from exc
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if not rate or samples.size == 0:
        raise AudioDecodeError("no audio samples decoded")
    rms, peak = _level(np.clip(samples, -1.0, 1.0))
    return AudioInfo(fmt, samples.size / rate, rate, channels, rms, peak)


def analyze_audio(data: bytes) -> AudioInfo:
    """Decode an audio file (WAV with the stdlib, anything else with PyAV) and measure it.

    Raises ``AudioDecodeError`` for data that is not decodable audio.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            return _analyze_wav(data)
        except AudioDecodeError:  # e.g. float or WAVE_FORMAT_EXTENSIBLE: let FFmpeg try
            return _analyze_with_av(data)
    return _analyze_with_av(data)


def resample_linear(samples: Any, src_rate: int, dst_rate: int) -> Any:
    """Linearly resample mono int16 samples (a numpy array) from ``src_rate`` to ``dst_rate``."""
    import numpy as np

    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.int16)
    count = max(1, round(samples.size * dst_rate / src_rate))
    positions = np.arange(count, dtype=np.float64) * (src_rate / dst_rate)
    out = np.interp(positions, np.arange(samples.size, dtype=np.float64), samples.astype(np.float64))
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def _espeak_voice(voice: object) -> str:
    return SPEECH_VOICES.get(voice, "en-us") if isinstance(voice, str) else "en-us"


def _espeak_command(voice: object, speed: float) -> list[str]:
    wpm = min(450, max(80, round(ESPEAK_WPM * speed)))
    return ["espeak-ng", "--stdout", "-v", _espeak_voice(voice), "-s", str(wpm)]


def _espeak_wav_to_pcm(wav_bytes: bytes) -> bytes:
    """espeak-ng's WAV (22050 Hz, mono, s16) -> raw s16le mono at 24 kHz."""
    import numpy as np

    try:
        with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SpeechSynthesisError(f"espeak-ng produced unreadable audio: {exc}") from exc
    if width != 2:
        raise SpeechSynthesisError(f"espeak-ng produced {8 * width}-bit audio, expected 16-bit")
    samples = np.frombuffer(raw[: len(raw) // (2 * channels) * 2 * channels], "<i2")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return bytes(resample_linear(samples, rate, AUDIO_SAMPLE_RATE).astype("<i2").tobytes())


async def synthesize_pcm_async(text: str, voice: object = "alloy", speed: float = 1.0) -> bytes:
    """Speak ``text`` with espeak-ng: raw s16le mono PCM at 24 kHz (``SpeechSynthesisError`` if not)."""
    if not espeak_available():
        raise SpeechSynthesisError(ESPEAK_MISSING)
    try:
        process = await asyncio.create_subprocess_exec(
            *_espeak_command(voice, speed),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise SpeechSynthesisError(f"cannot run espeak-ng: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(text.encode()), ESPEAK_TIMEOUT)
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise SpeechSynthesisError(f"espeak-ng took longer than {ESPEAK_TIMEOUT:.0f}s") from exc
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip()
        raise SpeechSynthesisError(f"espeak-ng failed with exit code {process.returncode}: {detail}")
    return await anyio.to_thread.run_sync(_espeak_wav_to_pcm, out)


def synthesize_pcm(text: str, voice: object = "alloy", speed: float = 1.0) -> bytes:
    """Blocking ``synthesize_pcm_async``: espeak-ng speech as s16le mono 24 kHz PCM."""
    if not espeak_available():
        raise SpeechSynthesisError(ESPEAK_MISSING)
    result = subprocess.run(
        _espeak_command(voice, speed), input=text.encode(), capture_output=True, timeout=ESPEAK_TIMEOUT
    )
    if result.returncode != 0:
        raise SpeechSynthesisError(f"espeak-ng failed: {result.stderr.decode(errors='replace').strip()}")
    return _espeak_wav_to_pcm(result.stdout)


def pcm_to_wav(pcm: bytes, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """Wrap s16le mono PCM in a RIFF/WAVE header."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def av_speech_formats() -> frozenset[str]:
    """The compressed ``response_format`` values PyAV can encode here (empty without PyAV)."""
    try:
        import av
    except ImportError:
        return frozenset()
    return frozenset(f for f, (_, codec) in _AV_ENCODINGS.items() if codec in av.codecs_available)


def encode_pcm(pcm: bytes, response_format: str, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """s16le mono PCM -> the bytes of an OpenAI speech ``response_format``."""
    if response_format == "pcm":
        return pcm
    if response_format == "wav":
        return pcm_to_wav(pcm, sample_rate)
    import av
    import numpy as np

    container_format, codec = _AV_ENCODINGS[response_format]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# --------------------------------------------------------------------------- configuration & state


@dataclass(frozen=True, slots=True)
class FakeOpenAIConfig:
    """Server-wide settings (the CLI flags)."""

    model: str = DEFAULT_MODEL
    api_key: str | None = None
    default_tokens: int | None = None
    first_delay_ms: float = 0.0
    delay_ms: float = 0.0
    transcript: str = DEFAULT_TRANSCRIPT

    def base_scenario(self) -> Scenario:
        """The defaults every selected scenario is layered over."""
        return Scenario(
            tokens=self.default_tokens,
            first_delay_ms=self.first_delay_ms,
            delay_ms=self.delay_ms,
            fail_mode="abort",
            stall_seconds=3600.0,
        )


@dataclass(slots=True)
class ChatRecord:
    """One recorded ``POST /v1/chat/completions`` (as returned by ``/_control/requests``)."""

    model: object
    messages: object
    stream: object
    stream_options: object
    headers_authorization_present: bool
    outcome: str = "pending"
    tokens_sent: int = 0
    scenario: dict[str, object] = field(default_factory=dict)
    generation: int = 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["generation"]
        return data


@dataclass(slots=True, kw_only=True)
class AudioRecord:
    """Common part of a recorded audio request (``/_control/audio_requests``).

    ``outcome``: pending, completed, client_disconnected (``status`` 499 if it left before
    the answer), failed (connection dropped on purpose) or error_status (answered with an
    error; ``status`` and ``error`` say which).
    """

    endpoint: str
    model: object = None
    headers_authorization_present: bool = False
    outcome: str = "pending"
    status: int | None = None
    error: str | None = None
    scenario: dict[str, object] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    generation: int = 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["generation"]
        return data


@dataclass(slots=True, kw_only=True)
class TranscriptionRecord(AudioRecord):
    """One ``POST /v1/audio/transcriptions``: the form fields, what the upload contained
    (``audio_format``, ``duration`` s, ``sample_rate``, ``channels``, ``rms``/``peak`` as a
    fraction of full scale, ``rms_dbfs``) and the ``transcript`` answered."""

    endpoint: str = "transcriptions"
    filename: str | None = None
    file_content_type: str | None = None
    file_bytes: int = 0
    language: object = None
    languages: list[str] = field(default_factory=list)
    prompt: object = None
    response_format: object = None
    temperature: object = None
    audio_format: str | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    rms: float | None = None
    rms_dbfs: float | None = None
    peak: float | None = None
    transcript: str | None = None


@dataclass(slots=True, kw_only=True)
class SpeechRecord(AudioRecord):
    """One ``POST /v1/audio/speech``: the request fields, the synthesised ``audio_seconds``
    and what was sent (``bytes_sent`` of audio in ``response_format``, before any base64;
    ``chunks_sent``)."""

    endpoint: str = "speech"
    input: object = None
    voice: object = None
    response_format: object = None
    stream_format: object = None
    speed: object = None
    instructions: object = None
    audio_seconds: float | None = None
    bytes_total: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0


AudioRecordT = TypeVar("AudioRecordT", bound=AudioRecord)


class FakeOpenAIState:
    """Mutable server state: scenarios, transcripts, recorded requests and counters."""

    def __init__(self, config: FakeOpenAIConfig) -> None:
        self.config = config
        self.base = config.base_scenario()
        self.stickies: dict[str, Scenario | None] = dict.fromkeys(ENDPOINTS)
        self.queues: dict[str, deque[Scenario]] = {e: deque() for e in ENDPOINTS}
        self.records: deque[ChatRecord] = deque(maxlen=MAX_RECORDS)
        self.audio_records: deque[AudioRecord] = deque(maxlen=MAX_RECORDS)
        self.transcripts: deque[str] = deque()
        self.transcript: str | None = None
        self.counters: Counter[str] = Counter()
        self.open_streams = 0
        self.open_speech_streams = 0
        self.generation = 0

    @property
    def sticky(self) -> Scenario | None:
        """The chat endpoint's sticky scenario."""
        return self.stickies["chat"]

    @sticky.setter
    def sticky(self, scenario: Scenario | None) -> None:
        self.stickies["chat"] = scenario

    @property
    def queue(self) -> deque[Scenario]:
        """The chat endpoint's one-shot queue."""
        return self.queues["chat"]

    def reset(self) -> None:
        """Forget scenarios, transcripts, records and counters (open streams stay counted)."""
        for endpoint in ENDPOINTS:
            self.stickies[endpoint] = None
            self.queues[endpoint].clear()
        self.transcripts.clear()
        self.transcript = None
        self.records.clear()
        self.audio_records.clear()
        self.counters.clear()
        self.generation += 1

    def select(self, directive: Scenario | None) -> Scenario:
        """Pick the scenario for a chat request (directive > queue > sticky), over the defaults."""
        chosen = directive
        if chosen is None and self.queue:
            chosen = self.queue.popleft()
        if chosen is None:
            chosen = self.sticky
        return self.base if chosen is None else chosen.over(self.base)

    def select_audio(self, endpoint: str) -> Scenario:
        """Pick the scenario for an audio request: its endpoint's queue, else its sticky one."""
        queue = self.queues[endpoint]
        chosen = queue.popleft() if queue else self.stickies[endpoint]
        return chosen or Scenario()

    def next_transcript(self) -> str:
        """The transcript for a transcription: queued, else sticky, else the configured default."""
        if self.transcripts:
            return self.transcripts.popleft()
        return self.transcript if self.transcript is not None else self.config.transcript

    def begin(self, record: ChatRecord) -> ChatRecord:
        record.generation = self.generation
        self.records.append(record)
        self.counters["requests"] += 1
        return record

    def finish(self, record: ChatRecord, outcome: str) -> None:
        record.outcome = outcome
        if record.generation == self.generation:
            self.counters[outcome] += 1

    def begin_audio(self, record: AudioRecordT) -> AudioRecordT:
        record.generation = self.generation
        self.audio_records.append(record)
        self.counters[f"{record.endpoint}_requests"] += 1
        return record

    def finish_audio(self, record: AudioRecord, outcome: str, status: int = 200, error: str | None = None) -> None:
        record.outcome, record.status, record.error = outcome, status, error
        if record.generation == self.generation:
            self.counters[f"{record.endpoint}_{outcome}"] += 1
            if isinstance(record, SpeechRecord):
                self.counters["speech_bytes_sent"] += record.bytes_sent

    def stats(self) -> dict[str, int]:
        names = ("requests", "completed", "client_disconnected", "failed", "error_status")
        audio = [
            f"{endpoint}_{name}"
            for endpoint in ("transcriptions", "speech")
            for name in ("requests", "completed", "client_disconnected", "failed", "error_status")
        ]
        return {
            **{n: self.counters[n] for n in (*names, *audio, "speech_bytes_sent")},
            "open_streams": self.open_streams,
            "open_speech_streams": self.open_speech_streams,
        }


# --------------------------------------------------------------------------- OpenAI errors


class OpenAIError(Exception):
    """An error answered with an OpenAI-style ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def _auth_error(presented: str) -> OpenAIError:
    message = (
        f"Incorrect API key provided: {_mask_key(presented)}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    if not presented:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    return OpenAIError(401, message, code="invalid_api_key")


def _status_error(status: int, presented_key: str = "") -> OpenAIError:
    """The error a real OpenAI endpoint gives for ``status`` (used by ``status`` scenarios)."""
    if status == 401:
        return _auth_error(presented_key)
    if status == 429:
        message = "Rate limit reached for requests. Please try again in 1s."
        return OpenAIError(
            429, message, "rate_limit_exceeded", code="rate_limit_exceeded", headers={"retry-after": "1"}
        )
    if status == 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return OpenAIError(500, message, "server_error")
    if status == 503:
        return OpenAIError(503, "The server is overloaded or not ready yet.", "service_unavailable")
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return OpenAIError(status, f"Simulated HTTP {status} error.", type_)


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _authorize(request: Request, config: FakeOpenAIConfig) -> None:
    if config.api_key is not None and _bearer_token(request) != config.api_key:
        raise _auth_error(_bearer_token(request) or "")


# --------------------------------------------------------------------------- chat requests & plans


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the fake cares about."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""


def _invalid(message: str, param: str | None = "messages") -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _validate_messages(messages: object) -> list[dict[str, Any]]:
    if messages is None:
        raise _invalid("Missing required parameter: 'messages'.")
    if not isinstance(messages, list):
        raise _invalid("Invalid type for 'messages': expected an array of objects.")
    if not messages:
        raise _invalid("Invalid 'messages': empty array. Expected an array with minimum length 1.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise _invalid(f"Missing required parameter: 'messages[{i}].role'.", f"messages[{i}].role")
    return messages


def parse_chat_request(body: object, default_model: str) -> ChatRequest:
    """Validate a decoded request body the way OpenAI does (for the fields we use)."""
    if not isinstance(body, dict):
        raise _invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            None,
        )
    messages = _validate_messages(body.get("messages"))
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    model = body.get("model")
    return ChatRequest(
        model=model if isinstance(model, str) and model else default_model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
    )


@dataclass(frozen=True, slots=True)
class ReplyPlan:
    """Everything needed to produce one reply: tokens, pauses and the failure to inject."""

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    first_delay: float
    delay: float
    status: int | None
    fail_at: int | None
    fail_mode: str
    stall_at: int | None
    stall_seconds: float

    def pause_before(self, index: int) -> float:
        """Seconds to wait before emitting token ``index`` (``len(tokens)`` = the final chunks)."""
        if index == self.stall_at:
            return self.stall_seconds
        if index == 0:
            return self.first_delay
        return self.delay if index < len(self.tokens) else 0.0

    def end(self) -> int:
        """Index at which the reply stops: the failure point or the end of the tokens."""
        return len(self.tokens) if self.fail_at is None else self.fail_at

    def usage(self) -> dict[str, object]:
        completion = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


def _reply_tokens(scenario: Scenario, echo: str) -> list[str]:
    if scenario.reply is not None:
        return tokenize(scenario.reply)
    if scenario.tokens is not None:
        return filler_tokens(scenario.tokens)
    return tokenize("You said: " + echo)


def _clamp(index: int | None, limit: int) -> int | None:
    return None if index is None else min(index, limit)


def plan_reply(chat: ChatRequest, scenario: Scenario, echo: str) -> ReplyPlan:
    """Turn a request and its (fully layered) scenario into a concrete reply plan."""
    tokens = _reply_tokens(scenario, echo)
    finish_reason = "stop"
    if chat.max_tokens is not None and len(tokens) > chat.max_tokens:
        tokens, finish_reason = tokens[: chat.max_tokens], "length"
    return ReplyPlan(
        tokens=tokens,
        finish_reason=finish_reason,
        prompt_tokens=count_words(chat.messages),
        first_delay=(scenario.first_delay_ms or 0.0) / 1000,
        delay=(scenario.delay_ms or 0.0) / 1000,
        status=scenario.status,
        fail_at=_clamp(scenario.fail_after, len(tokens)),
        fail_mode=scenario.fail_mode or "abort",
        stall_at=_clamp(scenario.stall_after, len(tokens)),
        stall_seconds=3600.0 if scenario.stall_seconds is None else scenario.stall_seconds,
    )


# --------------------------------------------------------------------------- wire encoding


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ChunkEncoder:
    """Pre-serialises the constant parts of ``chat.completion.chunk`` events for one stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = _dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )[:-1]
        self._head = head
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self._delta_open = f'data: {head},"choices":[{{"index":0,"delta":'.encode()
        self._content_open = self._delta_open + b'{"content":'
        self._choice_close = b',"logprobs":null,"finish_reason":null}]' + self._tail.encode()
        self._content_close = b"}" + self._choice_close

    def role(self) -> bytes:
        delta = b'{"role":"assistant","content":"","refusal":null}'
        return self._delta_open + delta + self._choice_close

    def content(self, token: str) -> bytes:
        return self._content_open + _dumps(token).encode() + self._content_close

    def finish(self, reason: str) -> bytes:
        close = f',"logprobs":null,"finish_reason":{_dumps(reason)}}}]{self._tail}'
        return self._delta_open + b"{}" + close.encode()

    def usage(self, usage: Mapping[str, object]) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{_dumps(usage)}}}\n\n'.encode()


def completion_body(completion_id: str, created: int, model: str, plan: ReplyPlan) -> dict[str, object]:
    """A non-streaming ``chat.completion`` object."""
    message = {"role": "assistant", "content": "".join(plan.tokens), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": plan.usage(),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


# --------------------------------------------------------------------------- responses


class SimulatedAbort(Exception):
    """Raised to make the ASGI server drop the connection mid-response (``fail_mode=abort``)."""


class _QuietSimulatedAborts(logging.Filter):
    """Keeps uvicorn from logging a traceback for aborts we cause on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedAbort))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietSimulatedAborts) for f in logger.filters):
        logger.addFilter(_QuietSimulatedAborts())


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(produce: Callable[[], Awaitable[None]], receive: Receive) -> bool:
    """Run ``produce``; cancel it if the client goes away. True if it ran to the end.

    Watching ``receive`` ourselves (rather than relying on StreamingResponse) makes
    disconnects cancel the reply promptly even while it sleeps, on any ASGI spec version.
    """
    finished = False
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _wait_for_disconnect(receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            await produce()
            finished = True
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            error = exc
        group.cancel_scope.cancel()
    if error is not None:
        raise error
    return finished


def _header_list(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class ChatCompletionResponse(Response):
    """ASGI response producing a chat completion per ``ReplyPlan``, streaming or not.

    Records the outcome (completed / client_disconnected / failed) on the request record.
    """

    def __init__(self, state: FakeOpenAIState, record: ChatRecord, chat: ChatRequest, plan: ReplyPlan) -> None:
        self.state, self.record, self.chat, self.plan = state, record, chat, plan
        self.completion_id = "chatcmpl-" + secrets.token_hex(14)
        self.created = int(time.time())
        self.request_id = "req_" + secrets.token_hex(16)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = self.chat.stream
        self.state.open_streams += int(streaming)
        outcome = "client_disconnected"
        try:
            produce = self._stream if streaming else self._respond
            if await run_until_disconnect(lambda: produce(send), receive):
                outcome = "completed" if self.plan.fail_at is None else "failed"
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.state.open_streams -= int(streaming)
            self.state.finish(self.record, outcome)

    async def _start(self, send: Send, content_type: str, extra: Mapping[str, str] | None = None) -> None:
        headers = {"content-type": content_type, "x-request-id": self.request_id, **(extra or {})}
        await send({"type": "http.response.start", "status": 200, "headers": _header_list(headers)})

    async def _stream(self, send: Send) -> None:
        """Send headers at once, then SSE chunks; zero-delay stretches go out as one write."""
        plan = self.plan
        encoder = ChunkEncoder(self.completion_id, self.created, self.chat.model, self.chat.include_usage)
        await self._start(send, "text/event-stream; charset=utf-8", {"cache-control": "no-cache"})
        pending: list[bytes] = []

        async def flush(sent: int, more: bool = True) -> None:
            self.record.tokens_sent = sent
            body = b"".join(pending)
            pending.clear()
            await send({"type": "http.response.body", "body": body, "more_body": more})

        end = plan.end()
        for index in range(end + 1):
            pause = plan.pause_before(index)
            if pause > 0:
                if pending:
                    await flush(index)
                await asyncio.sleep(pause)
            if index == 0:
                pending.append(encoder.role())
            if index < end:
                pending.append(encoder.content(plan.tokens[index]))
        if plan.fail_at is not None:
            await self._fail_stream(pending, flush, end)
            return
        pending.append(encoder.finish(plan.finish_reason))
        if self.chat.include_usage:
            pending.append(encoder.usage(plan.usage()))
        pending.append(_DONE)
        await flush(end, more=False)

    async def _fail_stream(
        self, pending: list[bytes], flush: Callable[[int, bool], Awaitable[None]], sent: int
    ) -> None:
        if self.plan.fail_mode == "error_event":
            pending.append(_STREAM_ERROR_EVENT)
            await flush(sent, False)
            return
        await flush(sent, True)
        raise SimulatedAbort(f"simulated connection drop after {sent} tokens")

    async def _respond(self, send: Send) -> None:
        """Non-streaming: wait as long as the whole stream would take, then answer in one go."""
        plan = self.plan
        total = sum(plan.pause_before(i) for i in range(plan.end() + 1))
        if total > 0:
            await asyncio.sleep(total)
        if plan.fail_at is not None and plan.fail_mode == "error_event":
            error = _status_error(500)
            await self._send_json(send, error.status, error.body)
            return
        if plan.fail_at is not None:  # announce a body, then drop the connection instead
            await self._start(send, "application/json", {"content-length": "1000"})
            raise SimulatedAbort("simulated connection drop before the response body")
        self.record.tokens_sent = len(plan.tokens)
        await self._send_json(send, 200, completion_body(self.completion_id, self.created, self.chat.model, plan))

    async def _send_json(self, send: Send, status: int, payload: object) -> None:
        body = _dumps(payload).encode()
        headers = {"content-type": "application/json", "content-length": str(len(body))}
        headers["x-request-id"] = self.request_id
        await send({"type": "http.response.start", "status": status, "headers": _header_list(headers)})
        await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- endpoints


def _state(request: Request) -> FakeOpenAIState:
    state: FakeOpenAIState = request.app.state.fake
    return state


def _load_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _new_record(body: object, request: Request) -> ChatRecord:
    data = body if isinstance(body, dict) else {}
    return ChatRecord(
        model=data.get("model"),
        messages=data.get("messages"),
        stream=data.get("stream", False),
        stream_options=data.get("stream_options"),
        headers_authorization_present="authorization" in request.headers,
    )


async def list_models(request: Request) -> Response:
    """``GET /v1/models``."""
    state = _state(request)
    try:
        _authorize(request, state.config)
    except OpenAIError as exc:
        return exc.response()
    model = {"id": state.config.model, "object": "model", "created": 1700000000, "owned_by": OWNER}
    return JSONResponse({"object": "list", "data": [model]})


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    state = _state(request)
    body = _load_json(await request.body())
    record = state.begin(_new_record(body, request))
    try:
        _authorize(request, state.config)
        chat = parse_chat_request(body, state.config.model)
        try:
            directive, echo = parse_directive(chat.last_user_text())
        except ScenarioError as exc:
            raise _invalid(f"Invalid [[fake ...]] directive: {exc}") from exc
        scenario = state.select(directive)
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise _status_error(scenario.status, _bearer_token(request) or "")
    except OpenAIError as exc:
        state.finish(record, "error_status")
        return exc.response()
    return ChatCompletionResponse(state, record, chat, plan_reply(chat, scenario, echo))


# --------------------------------------------------------------------------- audio endpoints


def _form_text(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _unsupported_value(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_value")


def _is_whisper(model: str) -> bool:
    return model.startswith("whisper")


def _transcription_params(form: Any, record: TranscriptionRecord) -> tuple[str, str, float | None]:
    """Validate the form fields (not the file): ``(model, response_format, temperature)``."""
    model = _form_text(form, "model")
    record.model = model
    record.language = _form_text(form, "language")
    record.languages = [v for v in form.getlist("languages[]") if isinstance(v, str)]
    record.prompt = _form_text(form, "prompt")
    response_format = _form_text(form, "response_format") or "json"
    record.response_format = response_format
    raw_temperature = _form_text(form, "temperature")
    record.temperature = raw_temperature
    if not model:
        raise _invalid("you must provide a model parameter", "model")
    if response_format not in TRANSCRIPTION_FORMATS:
        allowed = ", ".join(repr(f) for f in TRANSCRIPTION_FORMATS)
        raise _invalid(f"Invalid value: '{response_format}'. Supported values are: {allowed}.", "response_format")
    if response_format in ("srt", "vtt"):
        raise _unsupported_value(
            "response_format",
            f"response_format '{response_format}' is not supported by this OpenAI stand-in "
            "(use 'json', 'text' or 'verbose_json').",
        )
    if response_format == "verbose_json" and not _is_whisper(model):
        raise _unsupported_value(
            "response_format",
            f"response_format 'verbose_json' is not compatible with model '{model}'. Use 'json' or 'text' instead.",
        )
    temperature = None
    if raw_temperature is not None:
        try:
            temperature = float(raw_temperature)
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:
            message = f"Invalid 'temperature': expected a number between 0 and 1, got {raw_temperature!r}."
            raise _invalid(message, "temperature")
        record.temperature = temperature
    return model, response_format, temperature


async def _transcription_upload(form: Any, record: TranscriptionRecord) -> AudioInfo:
    """Read and measure the ``file`` part; 400 (413 if too big) unless it is decodable audio."""
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise _invalid("Missing required parameter: 'file'.", "file")
    record.filename = upload.filename
    record.file_content_type = upload.content_type
    data = await upload.read()
    record.file_bytes = len(data)
    if len(data) > MAX_UPLOAD_BYTES:
        raise OpenAIError(
            413, f"Maximum content size limit ({MAX_UPLOAD_BYTES}) exceeded ({len(data)} bytes read)", param="file"
        )
    extension = Path(upload.filename or "").suffix.lower().lstrip(".")
    if extension and extension not in UPLOAD_EXTENSIONS:
        raise OpenAIError(
            400,
            f"Invalid file format. Supported formats: {list(UPLOAD_EXTENSIONS)}",
            param="file",
            code="invalid_value",
        )
    try:
        info = await anyio.to_thread.run_sync(analyze_audio, data)
    except AudioDecodeError as exc:
        raise OpenAIError(
            400, f"Audio file might be corrupted or unsupported ({exc})", param="file", code="invalid_value"
        ) from exc
    record.audio_format, record.duration = info.format, round(info.duration, 4)
    record.sample_rate, record.channels = info.sample_rate, info.channels
    record.rms, record.rms_dbfs, record.peak = round(info.rms, 6), info.rms_dbfs, round(info.peak, 6)
    if info.duration < MIN_AUDIO_SECONDS:
        raise OpenAIError(
            400,
            f"Audio file is too short. Minimum audio length is {MIN_AUDIO_SECONDS} seconds.",
            param="file",
            code="audio_too_short",
        )
    return info


def _rough_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def transcription_body(
    text: str, model: str, response_format: str, info: AudioInfo, language: str | None, prompt: str | None
) -> tuple[bytes, str]:
    """Render a transcript as OpenAI does for ``response_format``: ``(body, content type)``."""
    if response_format == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    seconds = info.duration
    if _is_whisper(model):
        usage: dict[str, object] = {"type": "duration", "seconds": math.ceil(seconds)}
    else:  # gpt-4o(-mini)-transcribe & co. bill tokens (~10 audio tokens per second here)
        audio_tokens, text_tokens = math.ceil(seconds * 10), _rough_tokens(prompt or "")
        output_tokens = _rough_tokens(text)
        usage = {
            "type": "tokens",
            "input_tokens": audio_tokens + text_tokens,
            "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
            "output_tokens": output_tokens,
            "total_tokens": audio_tokens + text_tokens + output_tokens,
        }
    body: dict[str, object] = {"text": text, "usage": usage}
    if response_format == "verbose_json":
        segment = {
            "id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 2), "text": " " + text,
            "tokens": list(range(50364, 50364 + len(text.split()))), "temperature": 0.0,
            "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.01,
        }  # fmt: skip
        code = (language or "en").split("-")[0].lower()
        body = {
            "task": "transcribe",
            "language": _LANGUAGE_NAMES.get(code, code),
            "duration": round(seconds, 2),
            "text": text,
            "segments": [segment] if text else [],
            "usage": usage,
        }
    return _dumps(body).encode(), "application/json"


async def _send_whole(send: Send, status: int, body: bytes, content_type: str, request_id: str) -> None:
    headers = {"content-type": content_type, "content-length": str(len(body)), "x-request-id": request_id}
    await send({"type": "http.response.start", "status": status, "headers": _header_list(headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class TranscriptionResponse(Response):
    """Waits ``first_delay_ms``, then takes the next transcript and answers (unless the client left)."""

    def __init__(
        self,
        state: FakeOpenAIState,
        record: TranscriptionRecord,
        delay: float,
        render: Callable[[str], tuple[bytes, str]],
    ) -> None:
        self.state, self.record, self.delay, self.render_body = state, record, delay, render
        self.request_id = "req_" + secrets.token_hex(16)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "client_disconnected"
        try:
            if await run_until_disconnect(lambda: self._respond(send), receive):
                outcome = "completed"
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.state.finish_audio(self.record, outcome, 200 if outcome == "completed" else 499)

    async def _respond(self, send: Send) -> None:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        text = self.state.next_transcript()
        self.record.transcript = text
        body, content_type = self.render_body(text)
        await _send_whole(send, 200, body, content_type, self.request_id)


async def audio_transcriptions(request: Request) -> Response:
    """``POST /v1/audio/transcriptions`` (multipart form)."""
    state = _state(request)
    record = state.begin_audio(TranscriptionRecord(headers_authorization_present="authorization" in request.headers))
    try:
        _authorize(request, state.config)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise _invalid("Invalid Content-Type header: expected multipart/form-data.", None)
        try:
            form = await request.form(max_files=4, max_fields=100)
        except Exception as exc:  # MultiPartException / HTTPException from a malformed body
            raise _invalid(f"Could not parse multipart form: {getattr(exc, 'detail', exc)}", None) from exc
        try:
            model, response_format, _ = _transcription_params(form, record)
            info = await _transcription_upload(form, record)
        finally:
            await form.close()
        scenario = state.select_audio("transcriptions")
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise _status_error(scenario.status, _bearer_token(request) or "")
    except OpenAIError as exc:
        state.finish_audio(record, "error_status", exc.status, exc.body["error"]["message"])
        return exc.response()
    language, prompt = record.language, record.prompt
    assert language is None or isinstance(language, str)
    assert prompt is None or isinstance(prompt, str)

    def render(text: str) -> tuple[bytes, str]:
        return transcription_body(text, model, response_format, info, language, prompt)

    return TranscriptionResponse(state, record, (scenario.first_delay_ms or 0.0) / 1000, render)


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """A validated ``POST /v1/audio/speech`` body."""

    model: str
    input: str
    voice: object
    response_format: str
    stream_format: str
    speed: float


def parse_speech_request(body: object) -> SpeechRequest:
    """Validate a speech request the way OpenAI does (for the fields we use)."""
    if not isinstance(body, dict):
        raise _invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            None,
        )
    model, text, voice = body.get("model"), body.get("input"), body.get("voice")
    if not isinstance(model, str) or not model:
        raise _invalid("Missing required parameter: 'model'.", "model")
    if not isinstance(text, str):
        raise _invalid("Missing required parameter: 'input'.", "input")
    if not text:
        raise _invalid("Invalid 'input': empty string. Expected a string with minimum length 1.", "input")
    if len(text) > MAX_SPEECH_INPUT:
        raise OpenAIError(
            400,
            f"Invalid 'input': string too long. Expected a string with maximum length {MAX_SPEECH_INPUT}, "
            f"but got a string with length {len(text)} instead.",
            param="input",
            code="string_above_max_length",
        )
    if voice is None:
        raise _invalid("Missing required parameter: 'voice'.", "voice")
    if not (isinstance(voice, str) and voice in SPEECH_VOICES) and not (
        isinstance(voice, dict) and isinstance(voice.get("id"), str)
    ):
        allowed = ", ".join(repr(v) for v in SPEECH_VOICES)
        raise OpenAIError(
            400, f"Invalid value: {voice!r}. Supported values are: {allowed}.", param="voice", code="invalid_value"
        )
    response_format = body.get("response_format", "mp3")
    if response_format not in SPEECH_CONTENT_TYPES:
        allowed = ", ".join(repr(f) for f in SPEECH_CONTENT_TYPES)
        raise OpenAIError(
            400, f"Invalid value: {response_format!r}. Supported values are: {allowed}.", param="response_format",
            code="invalid_value",
        )  # fmt: skip
    if response_format not in ("wav", "pcm") and response_format not in av_speech_formats():
        raise _unsupported_value(
            "response_format",
            f"response_format '{response_format}' is not supported by this OpenAI stand-in here "
            "(PyAV with that encoder is not installed); use 'wav' or 'pcm'.",
        )
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise OpenAIError(
            400, f"Invalid value: {stream_format!r}. Supported values are: 'sse' and 'audio'.", param="stream_format",
            code="invalid_value",
        )  # fmt: skip
    if stream_format == "sse" and model in ("tts-1", "tts-1-hd"):
        raise _unsupported_value("stream_format", f"stream_format 'sse' is not supported for model '{model}'.")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        raise _invalid(f"Invalid 'speed': expected a number between 0.25 and 4.0, got {speed!r}.", "speed")
    return SpeechRequest(model, text, voice, str(response_format), str(stream_format), float(speed))


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """Pauses and the failure to inject while streaming ``count`` audio chunks."""

    count: int
    first_delay: float
    delay: float
    fail_at: int | None
    stall_at: int | None
    stall_seconds: float

    @classmethod
    def build(cls, count: int, scenario: Scenario) -> ChunkPlan:
        return cls(
            count=count,
            first_delay=(scenario.first_delay_ms or 0.0) / 1000,
            delay=(scenario.delay_ms or 0.0) / 1000,
            fail_at=_clamp(scenario.fail_after, count),
            stall_at=_clamp(scenario.stall_after, count),
            stall_seconds=3600.0 if scenario.stall_seconds is None else scenario.stall_seconds,
        )

    def pause_before(self, index: int) -> float:
        if index == self.stall_at:
            return self.stall_seconds
        if index == 0:
            return self.first_delay
        return self.delay if index < self.count else 0.0

    def end(self) -> int:
        return self.count if self.fail_at is None else self.fail_at


class SpeechResponse(Response):
    """Streams synthesised audio as raw bytes or SSE events per a ``ChunkPlan``; records the outcome."""

    def __init__(
        self, state: FakeOpenAIState, record: SpeechRecord, speech: SpeechRequest, audio: bytes, scenario: Scenario
    ) -> None:
        self.state, self.record, self.speech, self.audio = state, record, speech, audio
        size = SPEECH_CHUNK_BYTES if speech.response_format in ("pcm", "wav") else 4096
        self.chunks = [audio[i : i + size] for i in range(0, len(audio), size)] or [b""]
        self.plan = ChunkPlan.build(len(self.chunks), scenario)
        self.request_id = "req_" + secrets.token_hex(16)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.open_speech_streams += 1
        outcome = "client_disconnected"
        try:
            if await run_until_disconnect(lambda: self._stream(send), receive):
                outcome = "completed" if self.plan.fail_at is None else "failed"
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.state.open_speech_streams -= 1
            self.state.finish_audio(self.record, outcome, 200)

    def _usage(self) -> dict[str, int]:
        input_tokens = _rough_tokens(self.speech.input)
        output_tokens = math.ceil((self.record.audio_seconds or 0.0) * 20)
        return {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        }

    def _frame(self, chunk: bytes) -> bytes:
        if self.speech.stream_format != "sse":
            return chunk
        event = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()}
        return f"data: {_dumps(event)}\n\n".encode()

    async def _stream(self, send: Send) -> None:
        sse = self.speech.stream_format == "sse"
        content_type = "text/event-stream; charset=utf-8" if sse else SPEECH_CONTENT_TYPES[self.speech.response_format]
        headers = {"content-type": content_type, "x-request-id": self.request_id, "cache-control": "no-cache"}
        await send({"type": "http.response.start", "status": 200, "headers": _header_list(headers)})
        plan, pending = self.plan, list[bytes]()
        sent_bytes = sent_chunks = 0

        async def flush(more: bool = True) -> None:
            self.record.bytes_sent, self.record.chunks_sent = sent_bytes, sent_chunks
            body = b"".join(pending)
            pending.clear()
            await send({"type": "http.response.body", "body": body, "more_body": more})

        end = plan.end()
        for index in range(end + 1):
            pause = plan.pause_before(index)
            if pause > 0:
                if pending:
                    await flush()
                await asyncio.sleep(pause)
            if index < end:
                pending.append(self._frame(self.chunks[index]))
                sent_bytes += len(self.chunks[index])
                sent_chunks += 1
                if index == 0 or len(pending) >= 4:  # first audio at once, then ~400 ms writes
                    await flush()
        if plan.fail_at is not None:
            await flush()
            raise SimulatedAbort(f"simulated connection drop after {sent_chunks} audio chunks")
        if sse:
            pending.append(f"data: {_dumps({'type': 'speech.audio.done', 'usage': self._usage()})}\n\n".encode())
        await flush(more=False)


async def audio_speech(request: Request) -> Response:
    """``POST /v1/audio/speech``."""
    state = _state(request)
    body = _load_json(await request.body())
    data = body if isinstance(body, dict) else {}
    record = state.begin_audio(
        SpeechRecord(
            model=data.get("model"),
            input=data.get("input"),
            voice=data.get("voice"),
            response_format=data.get("response_format", "mp3"),
            stream_format=data.get("stream_format", "audio"),
            speed=data.get("speed"),
            instructions=data.get("instructions"),
            headers_authorization_present="authorization" in request.headers,
        )
    )
    try:
        _authorize(request, state.config)
        speech = parse_speech_request(body)
        scenario = state.select_audio("speech")
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise _status_error(scenario.status, _bearer_token(request) or "")
        try:
            pcm = await synthesize_pcm_async(speech.input, speech.voice, speech.speed)
            audio = await anyio.to_thread.run_sync(encode_pcm, pcm, speech.response_format)
        except SpeechSynthesisError as exc:
            code = "speech_synthesis_failed" if espeak_available() else "espeak_ng_not_installed"
            raise OpenAIError(500, f"OpenAI stand-in: {exc}", "server_error", code=code) from exc
    except OpenAIError as exc:
        state.finish_audio(record, "error_status", exc.status, exc.body["error"]["message"])
        return exc.response()
    record.audio_seconds = round(len(pcm) / 2 / AUDIO_SAMPLE_RATE, 4)
    record.bytes_total = len(audio)
    return SpeechResponse(state, record, speech, audio, scenario)


# --------------------------------------------------------------------------- control endpoints


async def _scenario_from(request: Request) -> tuple[str, Scenario]:
    data = _load_json(await request.body())
    if not isinstance(data, dict):
        raise _invalid("Expected a JSON object describing a scenario.", None)
    try:
        return scenario_for_endpoint(data)
    except ScenarioError as exc:
        raise _invalid(str(exc), None) from exc


async def set_scenario(request: Request) -> Response:
    """``POST /_control/scenario``: set (or with ``{}``) clear an endpoint's sticky scenario."""
    state = _state(request)
    try:
        endpoint, scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.stickies[endpoint] = scenario if scenario.to_json() else None
    return JSONResponse({"endpoint": endpoint, "scenario": scenario.to_json()})


async def get_scenarios(request: Request) -> Response:
    """``GET /_control/scenario``: sticky scenarios and one-shot queues (top level: chat's)."""
    state = _state(request)

    def view(endpoint: str) -> dict[str, object]:
        sticky = state.stickies[endpoint]
        return {"sticky": sticky.to_json() if sticky else None, "queue": [s.to_json() for s in state.queues[endpoint]]}

    return JSONResponse({**view("chat"), "endpoints": {e: view(e) for e in ENDPOINTS}})


async def queue_scenario(request: Request) -> Response:
    """``POST /_control/queue``: append a one-shot scenario for an endpoint's next request."""
    state = _state(request)
    try:
        endpoint, scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.queues[endpoint].append(scenario)
    return JSONResponse({"endpoint": endpoint, "queued": len(state.queues[endpoint])})


def _transcripts_view(state: FakeOpenAIState) -> dict[str, object]:
    return {"queue": list(state.transcripts), "sticky": state.transcript, "default": state.config.transcript}


async def queue_transcripts(request: Request) -> Response:
    """``POST /_control/transcripts {"texts": [...]}``: append transcripts, one per transcription."""
    state = _state(request)
    data = _load_json(await request.body())
    texts = data.get("texts") if isinstance(data, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return _invalid('Expected {"texts": [<string>, ...]}.', "texts").response()
    state.transcripts.extend(texts)
    return JSONResponse(_transcripts_view(state))


async def set_transcript(request: Request) -> Response:
    """``POST /_control/transcript {"text": ...}``: the sticky transcript (``null`` clears it)."""
    state = _state(request)
    data = _load_json(await request.body())
    if not isinstance(data, dict) or "text" not in data or not isinstance(data["text"], str | None):
        return _invalid('Expected {"text": <string or null>}.', "text").response()
    state.transcript = data["text"]
    return JSONResponse(_transcripts_view(state))


async def get_transcripts(request: Request) -> Response:
    """``GET /_control/transcripts``: the queue, the sticky transcript and the default."""
    return JSONResponse(_transcripts_view(_state(request)))


async def reset(request: Request) -> Response:
    """``POST /_control/reset``: clear scenarios, transcripts, recorded requests and counters."""
    _state(request).reset()
    return JSONResponse({"reset": True})


async def recorded_requests(request: Request) -> Response:
    """``GET /_control/requests``: the last recorded chat requests, oldest first."""
    return JSONResponse([r.to_json() for r in _state(request).records])


async def recorded_audio_requests(request: Request) -> Response:
    """``GET /_control/audio_requests[?endpoint=transcriptions|speech]``: oldest first."""
    endpoint = request.query_params.get("endpoint")
    if endpoint not in (None, "transcriptions", "speech"):
        return _invalid("endpoint must be 'transcriptions' or 'speech'.", "endpoint").response()
    records = _state(request).audio_records
    return JSONResponse([r.to_json() for r in records if endpoint is None or r.endpoint == endpoint])


async def stats(request: Request) -> Response:
    """``GET /_control/stats``: request counters and currently open streams."""
    return JSONResponse(_state(request).stats())


def openai_routes() -> list[BaseRoute]:
    """The OpenAI-compatible API surface (add further ``/v1`` endpoints here)."""
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/audio/transcriptions", audio_transcriptions, methods=["POST"]),
        Route("/v1/audio/speech", audio_speech, methods=["POST"]),
    ]


def control_routes() -> list[BaseRoute]:
    """Test-control endpoints (no authentication)."""
    return [
        Route("/_control/scenario", set_scenario, methods=["POST"]),
        Route("/_control/scenario", get_scenarios, methods=["GET"]),
        Route("/_control/queue", queue_scenario, methods=["POST"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/requests", recorded_requests, methods=["GET"]),
        Route("/_control/audio_requests", recorded_audio_requests, methods=["GET"]),
        Route("/_control/transcripts", queue_transcripts, methods=["POST"]),
        Route("/_control/transcripts", get_transcripts, methods=["GET"]),
        Route("/_control/transcript", set_transcript, methods=["POST"]),
        Route("/_control/stats", stats, methods=["GET"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos."
        return OpenAIError(404, message, code="unknown_url").response()
    return OpenAIError(status, str(getattr(exc, "detail", exc))).response()


def create_app(config: FakeOpenAIConfig | None = None) -> Starlette:
    """Build the ASGI app; its state lives in ``app.state.fake`` (a ``FakeOpenAIState``)."""
    _install_log_filter()
    app = Starlette(
        routes=[*openai_routes(), *control_routes()],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.fake = FakeOpenAIState(config or FakeOpenAIConfig())
    return app


# --------------------------------------------------------------------------- server & CLI


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"fake OpenAI server: cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _public_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_atomically(path: str, text: str) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(target)


def _uvicorn_impls() -> tuple[str, str]:
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return loop, http


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def serve(
    config: FakeOpenAIConfig, host: str = "127.0.0.1", port: int = 0, ready_file: str | None = None
) -> None:
    """Serve until stopped; announce ``LISTENING <url>`` on stdout once accepting connections."""
    sock = _bind(host, port)
    loop, http = _uvicorn_impls()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level="warning",
            access_log=False,
            loop=loop,
            http=http,
            lifespan="off",
            timeout_graceful_shutdown=1,
            backlog=4096,
        )
    )
    _install_log_filter()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise SystemExit("fake OpenAI server failed to start")
        await asyncio.sleep(0.01)
    url = _public_url(sock)
    print(f"{LISTENING_PREFIX}{url}", flush=True)
    if ready_file:
        _write_atomically(ready_file, url)
    # import the audio libraries now, not on the first audio request (~0.3 s)
    warm = asyncio.create_task(anyio.to_thread.run_sync(_warm_audio_imports))
    await task
    warm.cancel()


def _warm_audio_imports() -> None:
    for module in ("numpy", "av"):
        with contextlib.suppress(ImportError):
            __import__(module)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m morgana.devtools.openai_server",
        description="A stand-in for the OpenAI API (chat, speech, transcriptions) for tests and local runs.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this bearer token on /v1 endpoints")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model listed by /v1/models")
    parser.add_argument("--default-tokens", type=int, default=None, help="reply length (default: echo)")
    parser.add_argument("--first-delay-ms", type=float, default=0.0, help="default delay before the first token")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="default delay between tokens")
    parser.add_argument(
        "--transcript", default=DEFAULT_TRANSCRIPT, help="transcript answered when none is queued or set"
    )
    parser.add_argument("--ready-file", default=None, help="write the server URL here once listening")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    config = FakeOpenAIConfig(
        model=args.model,
        api_key=args.api_key,
        default_tokens=args.default_tokens,
        first_delay_ms=args.first_delay_ms,
        delay_ms=args.delay_ms,
        transcript=args.transcript,
    )
    coro = serve(config, args.host, args.port, args.ready_file)
    with contextlib.suppress(KeyboardInterrupt):
        if _uvicorn_impls()[0] == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)


# --------------------------------------------------------------------------- subprocess helper


class FakeOpenAIProcess:
    """Runs the fake server in a subprocess (context manager) and drives its control API.

    ``base_url`` ends in ``/v1`` (what ``OPENAI_BASE_URL`` / ``base_url=`` expect);
    ``root_url`` is the bare origin.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        default_tokens: int | None = None,
        first_delay_ms: float | None = None,
        delay_ms: float | None = None,
        transcript: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 20.0,
    ) -> None:
        options = {
            "--api-key": api_key,
            "--model": model,
            "--default-tokens": default_tokens,
            "--first-delay-ms": first_delay_ms,
            "--delay-ms": delay_ms,
            "--transcript": transcript,
        }
        self._args = ["--host", host, "--port", str(port)]
        for flag, value in options.items():
            if value is not None:
                self._args += [flag, str(value)]
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._root_url: str | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def root_url(self) -> str:
        if self._root_url is None:
            raise RuntimeError("fake OpenAI server is not running")
        return self._root_url

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> Self:
        """Launch the server and wait for its ``LISTENING`` line."""
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "morgana.devtools.openai_server", *self._args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        lines: Queue[str] = Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, lines), daemon=True).start()
        self._root_url = self._await_listening(lines)
        return self

    def _await_listening(self, lines: Queue[str]) -> str:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.05)
            except Empty:
                if self._process.poll() is not None:
                    break
                continue
            if line.startswith(LISTENING_PREFIX):
                return line[len(LISTENING_PREFIX) :].strip()
        code = self._process.poll()
        reason = f"exited with code {code}" if code is not None else f"not listening after {self._startup_timeout}s"
        stderr = self._stderr_text()
        self.stop()
        raise RuntimeError(f"fake OpenAI server failed to start ({reason}); stderr:\n{stderr}")

    def _stderr_text(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._root_url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # control API -------------------------------------------------------------

    def _control(self, method: str, path: str, payload: object = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with self._opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def set_scenario(self, **params: object) -> None:
        """Set the sticky scenario (no arguments clears it).

        ``endpoint="transcriptions"`` or ``"speech"`` targets an audio endpoint (default: chat).
        """
        self._control("POST", "/_control/scenario", params)

    def queue_scenario(self, **params: object) -> None:
        """Queue a one-shot scenario for the next chat request (or ``endpoint=...``'s)."""
        self._control("POST", "/_control/queue", params)

    def queue_transcripts(self, *texts: str) -> None:
        """Queue transcripts: each successful transcription answers (and consumes) the next."""
        self._control("POST", "/_control/transcripts", {"texts": list(texts)})

    def set_transcript(self, text: str | None) -> None:
        """Set the sticky transcript used when the queue is empty (``None`` clears it)."""
        self._control("POST", "/_control/transcript", {"text": text})

    def transcripts(self) -> dict[str, Any]:
        """``{"queue": [...], "sticky": str | None, "default": str}``."""
        result: dict[str, Any] = self._control("GET", "/_control/transcripts")
        return result

    def audio_requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Recorded audio requests (``"transcriptions"``, ``"speech"`` or both), oldest first."""
        query = "" if endpoint is None else "?" + urllib.parse.urlencode({"endpoint": endpoint})
        result: list[dict[str, Any]] = self._control("GET", "/_control/audio_requests" + query)
        return result

    def reset(self) -> None:
        """Clear scenarios, transcripts, recorded requests and counters."""
        self._control("POST", "/_control/reset", {})

    def requests(self) -> list[dict[str, Any]]:
        """Recorded chat requests, oldest first."""
        result: list[dict[str, Any]] = self._control("GET", "/_control/requests")
        return result

    def stats(self) -> dict[str, int]:
        """Counters: requests, completed, client_disconnected, failed, error_status, open_streams
        (chat); the same five prefixed ``transcriptions_`` and ``speech_``; speech_bytes_sent and
        open_speech_streams."""
        result: dict[str, int] = self._control("GET", "/_control/stats")
        return result


def _pump_lines(stream: IO[str] | None, lines: Queue[str]) -> None:
    if stream is None:
        return
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            lines.put(line)


def _pythonpath() -> str:
    src = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH")
    return src if not existing else os.pathsep.join([src, existing])


if __name__ == "__main__":
    main()
