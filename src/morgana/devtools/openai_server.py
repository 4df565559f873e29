"""A stand-in for the OpenAI API used by tests, ``make run`` and benchmarks.

It speaks the real Chat Completions wire protocol (JSON bodies, server-sent events,
OpenAI error bodies), so the official ``openai`` SDK and ``langchain_openai.ChatOpenAI``
run against it unchanged. By default it answers ``"You said: <last user message>"``.

*Scenarios* make it behave differently on demand: a fixed reply or reply length,
delays, HTTP errors, streams that break or stall. Per request the first of these wins:

1. a directive in the last user message, e.g. ``"hi [[fake tokens=5 delay_ms=20]]"``
   (stripped from the echoed text);
2. the head of the one-shot queue (``POST /_control/queue``);
3. the sticky scenario (``POST /_control/scenario``; ``{}`` clears it);
4. the server defaults given on the command line.

Test-control endpoints (unauthenticated): ``POST /_control/scenario`` and
``POST /_control/queue`` (a JSON ``Scenario``), ``GET /_control/scenario``,
``POST /_control/reset``, ``GET /_control/requests`` (last 1000 chat requests with their
outcome) and ``GET /_control/stats`` (counters and open streams).

Run it with ``python -m morgana.devtools.openai_server --port 0`` (prints
``LISTENING http://127.0.0.1:<port>``), or from Python::

    with FakeOpenAIProcess() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="anything")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from queue import Empty, Queue
from types import TracebackType
from typing import IO, Any, Final, Self

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "FakeOpenAIConfig",
    "FakeOpenAIProcess",
    "FakeOpenAIState",
    "Scenario",
    "create_app",
    "main",
    "serve",
]

DEFAULT_MODEL: Final = "gpt-4o-mini"
SYSTEM_FINGERPRINT: Final = "fp_morgana"
OWNER: Final = "morgana-dev"
MAX_RECORDS: Final = 1000
FAIL_MODES: Final = frozenset({"abort", "error_event"})
LISTENING_PREFIX: Final = "LISTENING "

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


# --------------------------------------------------------------------------- configuration & state


@dataclass(frozen=True, slots=True)
class FakeOpenAIConfig:
    """Server-wide settings (the CLI flags)."""

    model: str = DEFAULT_MODEL
    api_key: str | None = None
    default_tokens: int | None = None
    first_delay_ms: float = 0.0
    delay_ms: float = 0.0

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


class FakeOpenAIState:
    """Mutable server state: scenarios, recorded requests and counters."""

    def __init__(self, config: FakeOpenAIConfig) -> None:
        self.config = config
        self.base = config.base_scenario()
        self.sticky: Scenario | None = None
        self.queue: deque[Scenario] = deque()
        self.records: deque[ChatRecord] = deque(maxlen=MAX_RECORDS)
        self.counters: Counter[str] = Counter()
        self.open_streams = 0
        self.generation = 0

    def reset(self) -> None:
        """Forget scenarios, records and counters (in-flight streams stay counted as open)."""
        self.sticky = None
        self.queue.clear()
        self.records.clear()
        self.counters.clear()
        self.generation += 1

    def select(self, directive: Scenario | None) -> Scenario:
        """Pick the scenario for a request (directive > queue > sticky), over the defaults."""
        chosen = directive
        if chosen is None and self.queue:
            chosen = self.queue.popleft()
        if chosen is None:
            chosen = self.sticky
        return self.base if chosen is None else chosen.over(self.base)

    def begin(self, record: ChatRecord) -> ChatRecord:
        record.generation = self.generation
        self.records.append(record)
        self.counters["requests"] += 1
        return record

    def finish(self, record: ChatRecord, outcome: str) -> None:
        record.outcome = outcome
        if record.generation == self.generation:
            self.counters[outcome] += 1

    def stats(self) -> dict[str, int]:
        names = ("requests", "completed", "client_disconnected", "failed", "error_status")
        return {**{n: self.counters[n] for n in names}, "open_streams": self.open_streams}


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


async def _scenario_from(request: Request) -> Scenario:
    data = _load_json(await request.body())
    if not isinstance(data, dict):
        raise _invalid("Expected a JSON object describing a scenario.", None)
    try:
        return Scenario.from_mapping(data)
    except ScenarioError as exc:
        raise _invalid(str(exc), None) from exc


async def set_scenario(request: Request) -> Response:
    """``POST /_control/scenario``: set (or with ``{}`` clear) the sticky scenario."""
    state = _state(request)
    try:
        scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.sticky = scenario if scenario.to_json() else None
    return JSONResponse({"scenario": scenario.to_json()})


async def get_scenarios(request: Request) -> Response:
    """``GET /_control/scenario``: the sticky scenario and the one-shot queue."""
    state = _state(request)
    sticky = state.sticky.to_json() if state.sticky else None
    return JSONResponse({"sticky": sticky, "queue": [s.to_json() for s in state.queue]})


async def queue_scenario(request: Request) -> Response:
    """``POST /_control/queue``: append a one-shot scenario for the next chat request."""
    state = _state(request)
    try:
        scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.queue.append(scenario)
    return JSONResponse({"queued": len(state.queue)})


async def reset(request: Request) -> Response:
    """``POST /_control/reset``: clear scenarios, recorded requests and counters."""
    _state(request).reset()
    return JSONResponse({"reset": True})


async def recorded_requests(request: Request) -> Response:
    """``GET /_control/requests``: the last recorded chat requests, oldest first."""
    return JSONResponse([r.to_json() for r in _state(request).records])


async def stats(request: Request) -> Response:
    """``GET /_control/stats``: request counters and currently open streams."""
    return JSONResponse(_state(request).stats())


def openai_routes() -> list[BaseRoute]:
    """The OpenAI-compatible API surface (add further ``/v1`` endpoints here)."""
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


def control_routes() -> list[BaseRoute]:
    """Test-control endpoints (no authentication)."""
    return [
        Route("/_control/scenario", set_scenario, methods=["POST"]),
        Route("/_control/scenario", get_scenarios, methods=["GET"]),
        Route("/_control/queue", queue_scenario, methods=["POST"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/requests", recorded_requests, methods=["GET"]),
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
    await task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m morgana.devtools.openai_server",
        description="A stand-in for the OpenAI API (Chat Completions wire protocol) for tests and local runs.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this bearer token on /v1 endpoints")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model listed by /v1/models")
    parser.add_argument("--default-tokens", type=int, default=None, help="reply length (default: echo)")
    parser.add_argument("--first-delay-ms", type=float, default=0.0, help="default delay before the first token")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="default delay between tokens")
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
        """Set the sticky scenario (no arguments clears it)."""
        self._control("POST", "/_control/scenario", params)

    def queue_scenario(self, **params: object) -> None:
        """Queue a one-shot scenario for the next chat request."""
        self._control("POST", "/_control/queue", params)

    def reset(self) -> None:
        """Clear scenarios, recorded requests and counters."""
        self._control("POST", "/_control/reset", {})

    def requests(self) -> list[dict[str, Any]]:
        """Recorded chat requests, oldest first."""
        result: list[dict[str, Any]] = self._control("GET", "/_control/requests")
        return result

    def stats(self) -> dict[str, int]:
        """Counters: requests, completed, client_disconnected, failed, error_status, open_streams."""
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
