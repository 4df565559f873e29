"""``POST /v1/chat/completions``: request validation, the reply plan a scenario turns into, and
the response (server-sent ``chat.completion.chunk`` events or one ``chat.completion``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from morgana_devtools.openai_server.asgi import SimulatedAbort, dumps, header_list, load_json, run_until_disconnect
from morgana_devtools.openai_server.errors import OpenAIError, authorize, bearer_token, invalid_request, status_error
from morgana_devtools.openai_server.scenarios import (
    Scenario,
    ScenarioError,
    clamp,
    content_text,
    count_words,
    filler_tokens,
    parse_directive,
    tokenize,
)
from morgana_devtools.openai_server.state import ChatRecord, FakeOpenAIState, fake_state

SYSTEM_FINGERPRINT: Final = "fp_morgana"
_DONE: Final = b"data: [DONE]\n\n"
_STREAM_ERROR_EVENT: Final = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":null}}\n\n'
)


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


def _validate_messages(messages: object) -> list[dict[str, Any]]:
    if messages is None:
        raise invalid_request("Missing required parameter: 'messages'.")
    if not isinstance(messages, list):
        raise invalid_request("Invalid type for 'messages': expected an array of objects.")
    if not messages:
        raise invalid_request("Invalid 'messages': empty array. Expected an array with minimum length 1.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise invalid_request(f"Missing required parameter: 'messages[{i}].role'.", f"messages[{i}].role")
    return messages


def parse_chat_request(body: object, default_model: str) -> ChatRequest:
    """Validate a decoded request body the way OpenAI does (for the fields we use)."""
    if not isinstance(body, dict):
        raise invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            None,
        )
    messages = _validate_messages(body.get("messages"))
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
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
    keepalive: float = 0.0

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
        fail_at=clamp(scenario.fail_after, len(tokens)),
        fail_mode=scenario.fail_mode or "abort",
        stall_at=clamp(scenario.stall_after, len(tokens)),
        stall_seconds=3600.0 if scenario.stall_seconds is None else scenario.stall_seconds,
        keepalive=(scenario.keepalive_ms or 0.0) / 1000,
    )


class ChunkEncoder:
    """Pre-serialises the constant parts of ``chat.completion.chunk`` events for one stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = dumps(
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
        return self._content_open + dumps(token).encode() + self._content_close

    def finish(self, reason: str) -> bytes:
        close = f',"logprobs":null,"finish_reason":{dumps(reason)}}}]{self._tail}'
        return self._delta_open + b"{}" + close.encode()

    def usage(self, usage: Mapping[str, object]) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{dumps(usage)}}}\n\n'.encode()


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
        await send({"type": "http.response.start", "status": 200, "headers": header_list(headers)})

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
                await self._pause(send, pause)
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

    async def _pause(self, send: Send, seconds: float) -> None:
        """Wait, sending a ``: keepalive`` comment every ``keepalive`` seconds if the plan has one."""
        every = self.plan.keepalive
        if every <= 0:
            await asyncio.sleep(seconds)
            return
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(min(every, left))
            if left > every:
                await send({"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True})

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
            error = status_error(500)
            await self._send_json(send, error.status, error.body)
            return
        if plan.fail_at is not None:  # announce a body, then drop the connection instead
            await self._start(send, "application/json", {"content-length": "1000"})
            raise SimulatedAbort("simulated connection drop before the response body")
        self.record.tokens_sent = len(plan.tokens)
        await self._send_json(send, 200, completion_body(self.completion_id, self.created, self.chat.model, plan))

    async def _send_json(self, send: Send, status: int, payload: object) -> None:
        body = dumps(payload).encode()
        headers = {"content-type": "application/json", "content-length": str(len(body))}
        headers["x-request-id"] = self.request_id
        await send({"type": "http.response.start", "status": status, "headers": header_list(headers)})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _new_record(body: object, request: Request) -> ChatRecord:
    data = body if isinstance(body, dict) else {}
    return ChatRecord(
        model=data.get("model"),
        messages=data.get("messages"),
        stream=data.get("stream", False),
        stream_options=data.get("stream_options"),
        headers_authorization_present="authorization" in request.headers,
    )


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    state = fake_state(request)
    body = load_json(await request.body())
    record = state.begin(_new_record(body, request))
    try:
        authorize(request, state.config)
        chat = parse_chat_request(body, state.config.model)
        try:
            directive, echo = parse_directive(chat.last_user_text())
        except ScenarioError as exc:
            raise invalid_request(f"Invalid [[fake ...]] directive: {exc}") from exc
        scenario = state.select(directive)
        record.scenario = scenario.to_json()
        if scenario.status is not None:
            raise status_error(scenario.status, bearer_token(request) or "")
    except OpenAIError as exc:
        state.finish(record, "error_status")
        return exc.response()
    return ChatCompletionResponse(state, record, chat, plan_reply(chat, scenario, echo))
