"""``POST /v1/audio/speech``: espeak-ng speech in the requested format, streamed in ~100 ms
chunks as raw bytes or ``speech.audio.delta`` events."""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from morgana_devtools.openai_server.asgi import SimulatedAbort, dumps, header_list, load_json, run_until_disconnect
from morgana_devtools.openai_server.audio import AUDIO_SAMPLE_RATE, av_speech_formats, encode_pcm
from morgana_devtools.openai_server.errors import (
    OpenAIError,
    authorize,
    bearer_token,
    invalid_request,
    status_error,
    unsupported_value,
)
from morgana_devtools.openai_server.scenarios import Scenario, clamp, rough_tokens
from morgana_devtools.openai_server.speech_synthesis import (
    SPEECH_VOICES,
    SpeechSynthesisError,
    espeak_available,
    synthesize_pcm_async,
)
from morgana_devtools.openai_server.state import FakeOpenAIState, SpeechRecord, fake_state

MAX_SPEECH_INPUT: Final = 4096
SPEECH_CONTENT_TYPES: Final[Mapping[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
SPEECH_CHUNK_BYTES: Final = AUDIO_SAMPLE_RATE * 2 // 10  # 100 ms of 24 kHz s16 mono


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
        raise invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            None,
        )
    model, text, voice = body.get("model"), body.get("input"), body.get("voice")
    if not isinstance(model, str) or not model:
        raise invalid_request("Missing required parameter: 'model'.", "model")
    if not isinstance(text, str):
        raise invalid_request("Missing required parameter: 'input'.", "input")
    if not text:
        raise invalid_request("Invalid 'input': empty string. Expected a string with minimum length 1.", "input")
    if len(text) > MAX_SPEECH_INPUT:
        raise OpenAIError(
            400,
            f"Invalid 'input': string too long. Expected a string with maximum length {MAX_SPEECH_INPUT}, "
            f"but got a string with length {len(text)} instead.",
            param="input",
            code="string_above_max_length",
        )
    if voice is None:
        raise invalid_request("Missing required parameter: 'voice'.", "voice")
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
        raise unsupported_value(
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
        raise unsupported_value("stream_format", f"stream_format 'sse' is not supported for model '{model}'.")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        raise invalid_request(f"Invalid 'speed': expected a number between 0.25 and 4.0, got {speed!r}.", "speed")
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
            fail_at=clamp(scenario.fail_after, count),
            stall_at=clamp(scenario.stall_after, count),
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
        input_tokens = rough_tokens(self.speech.input)
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
        return f"data: {dumps(event)}\n\n".encode()

    async def _stream(self, send: Send) -> None:
        sse = self.speech.stream_format == "sse"
        content_type = "text/event-stream; charset=utf-8" if sse else SPEECH_CONTENT_TYPES[self.speech.response_format]
        headers = {"content-type": content_type, "x-request-id": self.request_id, "cache-control": "no-cache"}
        await send({"type": "http.response.start", "status": 200, "headers": header_list(headers)})
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
            pending.append(f"data: {dumps({'type': 'speech.audio.done', 'usage': self._usage()})}\n\n".encode())
        await flush(more=False)


async def audio_speech(request: Request) -> Response:
    """``POST /v1/audio/speech``."""
    state = fake_state(request)
    body = load_json(await request.body())
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
        authorize(request, state.config)
        speech = parse_speech_request(body)
        scenario = state.select_audio("speech")
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise status_error(scenario.status, bearer_token(request) or "")
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
