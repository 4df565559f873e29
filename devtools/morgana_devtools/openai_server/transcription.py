"""``POST /v1/audio/transcriptions``: it cannot recognise speech, so it answers the transcript
queued or set through the control API, but only for real, decodable audio."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from morgana_devtools.openai_server.asgi import dumps, header_list, run_until_disconnect
from morgana_devtools.openai_server.audio import AudioDecodeError, AudioInfo, analyze_audio
from morgana_devtools.openai_server.errors import (
    OpenAIError,
    authorize,
    bearer_token,
    invalid_request,
    status_error,
    unsupported_value,
)
from morgana_devtools.openai_server.scenarios import rough_tokens
from morgana_devtools.openai_server.state import FakeOpenAIState, TranscriptionRecord, fake_state

MAX_UPLOAD_BYTES: Final = 25 * 1024 * 1024
MIN_AUDIO_SECONDS: Final = 0.1
UPLOAD_EXTENSIONS: Final = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
TRANSCRIPTION_FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt")
_LANGUAGE_NAMES: Final[Mapping[str, str]] = {
    "en": "english", "de": "german", "es": "spanish", "fr": "french", "it": "italian",
    "nl": "dutch", "pt": "portuguese", "ja": "japanese", "zh": "chinese", "ru": "russian",
}  # fmt: skip


def _form_text(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


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
        raise invalid_request("you must provide a model parameter", "model")
    if response_format not in TRANSCRIPTION_FORMATS:
        allowed = ", ".join(repr(f) for f in TRANSCRIPTION_FORMATS)
        raise invalid_request(
            f"Invalid value: '{response_format}'. Supported values are: {allowed}.", "response_format"
        )
    if response_format in ("srt", "vtt"):
        raise unsupported_value(
            "response_format",
            f"response_format '{response_format}' is not supported by this OpenAI stand-in "
            "(use 'json', 'text' or 'verbose_json').",
        )
    if response_format == "verbose_json" and not _is_whisper(model):
        raise unsupported_value(
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
            raise invalid_request(message, "temperature")
        record.temperature = temperature
    return model, response_format, temperature


async def _transcription_upload(form: Any, record: TranscriptionRecord) -> AudioInfo:
    """Read and measure the ``file`` part; 400 (413 if too big) unless it is decodable audio."""
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise invalid_request("Missing required parameter: 'file'.", "file")
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
        audio_tokens, text_tokens = math.ceil(seconds * 10), rough_tokens(prompt or "")
        output_tokens = rough_tokens(text)
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
    return dumps(body).encode(), "application/json"


async def _send_whole(send: Send, status: int, body: bytes, content_type: str, request_id: str) -> None:
    headers = {"content-type": content_type, "content-length": str(len(body)), "x-request-id": request_id}
    await send({"type": "http.response.start", "status": status, "headers": header_list(headers)})
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
    state = fake_state(request)
    record = state.begin_audio(TranscriptionRecord(headers_authorization_present="authorization" in request.headers))
    try:
        authorize(request, state.config)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise invalid_request("Invalid Content-Type header: expected multipart/form-data.", None)
        try:
            form = await request.form(max_files=4, max_fields=100)
        except Exception as exc:  # MultiPartException / HTTPException from a malformed body
            raise invalid_request(f"Could not parse multipart form: {getattr(exc, 'detail', exc)}", None) from exc
        try:
            model, response_format, _ = _transcription_params(form, record)
            info = await _transcription_upload(form, record)
        finally:
            await form.close()
        scenario = state.select_audio("transcriptions")
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise status_error(scenario.status, bearer_token(request) or "")
    except OpenAIError as exc:
        state.finish_audio(record, "error_status", exc.status, exc.body["error"]["message"])
        return exc.response()
    language, prompt = record.language, record.prompt
    assert language is None or isinstance(language, str)
    assert prompt is None or isinstance(prompt, str)

    def render(text: str) -> tuple[bytes, str]:
        return transcription_body(text, model, response_format, info, language, prompt)

    return TranscriptionResponse(state, record, (scenario.first_delay_ms or 0.0) / 1000, render)
