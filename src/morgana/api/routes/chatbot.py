"""Chat: a turn streamed as Server-Sent Events or answered as JSON, and the session's history."""

import asyncio
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing

import anyio
from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from morgana.api import metrics
from morgana.api.config import ApiSettings
from morgana.api.deps import (
    AnyChannelSession,
    ChatStreamStart,
    ClaimsDep,
    ConversationDep,
    CurrentChatSession,
    DbDep,
    ResumePoint,
    ResumeRequest,
    SettingsDep,
    StreamLogDep,
    limit_by_session,
)
from morgana.api.routes import Responses
from morgana.api.schemas import (
    ChatRequest,
    ChatResponse,
    DeletedResponse,
    ErrorDetail,
    ErrorResponse,
    GoneResponse,
    HistoryResponse,
    Message,
    StoredMessage,
    StreamEvent,
)
from morgana.api.security import Channel
from morgana.api.services import history
from morgana.api.services.chat import ChatFailure
from morgana.api.services.conversation import (
    ReplyText,
    StillReplying,
    Turn,
    TurnFailed,
    TurnStored,
    TurnWithdrawn,
)
from morgana.api.services.stream_log import (
    Entry,
    StreamGone,
    StreamLog,
    StreamLogDown,
    StreamLost,
    StreamRecorder,
    follow,
    new_stream_id,
    stream_key,
)
from morgana.api.services.utterance import Utterance

router = APIRouter(prefix="/chatbot", tags=["chatbot"])

_ERRORS: Responses = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or expired token"},
    403: {"model": ErrorResponse, "description": "A user token where a session token belongs"},
    429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Database, Redis or the model is unavailable"},
}

_STREAM_DOC: Responses = {
    200: {
        "description": (
            'Server-Sent Events. Each event\'s data is JSON `{"content": str, "done": bool}`; '
            "the last has `done: true`. A failure ends the stream with an `error` event whose "
            "data also carries `error: {code, message}`. While the model sends no text for "
            "CHAT_STREAM_KEEPALIVE_SECONDS (15), a comment line (`: ping`) keeps proxies from "
            "closing the connection."
        ),
        "content": {
            "text/event-stream": {
                "example": 'data: {"content": "Hello", "done": false}\n\n'
                'data: {"content": "!", "done": false}\n\n'
                'data: {"content": "", "done": true}\n\n'
            }
        },
    }
}


def _check_size(body: ChatRequest, settings: ApiSettings) -> None:
    errors = []
    if len(body.messages) > settings.max_messages_per_request:
        errors.append(
            {
                "type": "too_long",
                "loc": ["body", "messages"],
                "msg": f"at most {settings.max_messages_per_request} messages per request",
                "input": len(body.messages),
            }
        )
    for index, message in enumerate(body.messages):
        if len(message.content) > settings.max_message_chars:
            errors.append(
                {
                    "type": "string_too_long",
                    "loc": ["body", "messages", index, "content"],
                    "msg": f"at most {settings.max_message_chars} characters per message",
                    "input": len(message.content),
                }
            )
    if errors:
        raise RequestValidationError(errors)


# The HTTP status of each model failure on the JSON endpoint (streams report it in an event).
_FAILURE_STATUS = {"timeout": 504, "bad_request": 502, "other": 500}


# A comment line with no blank line after it: a blank line would end an event, and some clients
# (httpx-sse) then hand on an empty event, repeating the last event's id, where the standard
# dispatches nothing.
_PING = b": ping\r\n"
# No caching, and no buffering by nginx (its ingress included): each event as it comes.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_HISTORY = "/api/v1/chatbot/messages"


class EventStreamResponse(StreamingResponse):
    """A stream of Server-Sent Events (each chunk one framed event) on Starlette's streaming
    response, streamed in the request's own task with one plain asyncio task beside it, which
    cancels the stream when the client goes away.

    Starlette runs the stream and the disconnect watcher in an anyio task group (three cancel
    scopes, two anyio events, a task handle), and sse-starlette's EventSourceResponse runs four
    anyio tasks (the stream, pings, a shutdown watcher, the disconnect watcher). The stream sends
    its own keep-alives (StillReplying), and a server shutting down lets open replies finish
    instead of cutting them.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        cancel_on_disconnect: bool = True,
    ) -> None:
        super().__init__(events, status_code, headers)
        self._events = events
        # Else the stream runs on when its client leaves (uvicorn drops what is sent meanwhile).
        self._cancel_on_disconnect = cancel_on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        streaming = asyncio.current_task()
        assert streaming is not None  # ASGI apps run in a task
        finished = disconnected = False

        async def cancel_on_disconnect() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            # The response's last message also ends `receive` (as a disconnect); a stream that
            # has finished by then has nothing to cancel.
            if not finished and self._cancel_on_disconnect:
                disconnected = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(cancel_on_disconnect())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # Ours to absorb only if the client's leaving was the one cancellation.
            if not disconnected or streaming.uncancel() > 0:
                raise
        finally:
            finished = True
            watcher.cancel()
        if self.background is not None:
            await self.background()

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # A client gone while an event was being sent leaves the generator at its yield:
            # close it now (which cancels the model call), shielded from any further
            # cancellation, rather than when it is collected.
            with anyio.move_on_after(5, shield=True):
                await self._events.aclose()


def _sse(event: ReplyText | TurnStored | TurnFailed, event_id: str | None = None) -> bytes:
    """Frame one turn event as the contract's SSE: JSON `{content, done}`, and a failure as an
    `error` event whose data also carries `error: {code, message}`."""
    match event:
        case ReplyText(text):
            data = StreamEvent(content=text, done=False)
        case TurnStored():
            data = StreamEvent(content="", done=True)
        case TurnFailed(code, message):
            data = StreamEvent(content="", done=True, error=ErrorDetail(code=code, message=message))
    return ServerSentEvent(
        data=data.model_dump_json(exclude_none=True), event="error" if data.error is not None else None, id=event_id
    ).encode()


_CANCELLED = TurnFailed(
    "reply_cancelled", "The reply was cancelled when its client went away (on_disconnect: cancel); it was not stored."
)
_LOST = TurnFailed(
    "stream_lost",
    "This stream's events stopped coming before its end (its server may have gone away); "
    "GET /api/v1/chatbot/messages shows the turn if it was completed.",
)


async def _sse_stream(turn: Turn, keepalive: float, recorder: StreamRecorder | None) -> AsyncGenerator[bytes, None]:
    """The turn's events as SSE; with a recorder, each has an id and is logged once it is sent (a
    client reconnecting with that id gets what follows it). A stream cut short (its client gone,
    on_disconnect: cancel) is logged as ended, so that nobody waits for the rest."""
    if recorder is None:
        async with aclosing(turn.events(keepalive)) as events:
            async for event in events:
                yield _PING if isinstance(event, StillReplying) else _sse(event)
        return
    seq = 0
    unlogged: tuple[bytes, bool] | None = None  # sent (or being sent) but not logged yet
    try:
        async with aclosing(turn.events(keepalive)) as events:
            async for event in events:
                if isinstance(event, StillReplying):
                    yield _PING
                    continue
                seq += 1
                unlogged = (_sse(event, recorder.event_id(seq)), not isinstance(event, ReplyText))
                yield unlogged[0]
                await recorder.record(seq, unlogged[0], last=unlogged[1])
                unlogged = None
    finally:
        if unlogged is not None:
            await recorder.record(seq, unlogged[0], last=unlogged[1])
        if not recorder.ended:
            await recorder.record(seq + 1, _sse(_CANCELLED, recorder.event_id(seq + 1)), last=True)


async def _resumed_stream(
    stream_log: StreamLog, key: str, after: int, entries: list[Entry], settings: ApiSettings
) -> AsyncGenerator[bytes, None]:
    # The producing replica sends an event at least every LLM_TIMEOUT_SECONDS (its model's
    # silence limit) and stores the turn within a pool wait: longer without one, it is gone.
    give_up = settings.llm_timeout_seconds + settings.db_pool_timeout_seconds + 10
    keepalive = settings.chat_stream_keepalive_seconds
    try:
        async with aclosing(follow(stream_log, key, after, entries, keepalive=keepalive, give_up=give_up)) as kept:
            async for entry in kept:
                yield _PING if entry is None else entry.frame
    except (StreamLost, StreamGone, StreamLogDown):
        yield _sse(_LOST)


@router.post(
    "/chat/stream",
    summary="Send messages and stream the agent's reply as Server-Sent Events",
    response_class=EventStreamResponse,
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_stream(
    body: ChatRequest, settings: SettingsDep, start: ChatStreamStart, stream_log: StreamLogDep
) -> Response:
    if isinstance(start, ResumePoint):
        return await _resume(start, stream_log, settings)
    _check_size(body, settings)
    # The history was read with the session (TurnSession, which also applies the `chat` rate
    # limit), so a database outage is a plain 503.
    turn = start.begin(_said(body), body.turn_id)
    recorder = None
    if stream_log is not None:
        stream = new_stream_id()
        recorder = StreamRecorder(stream_log, stream_key(start.session_id, stream), stream)
    on_disconnect = body.on_disconnect or settings.chat_stream_on_disconnect
    return EventStreamResponse(
        _sse_stream(turn, settings.chat_stream_keepalive_seconds, recorder),
        headers=_STREAM_HEADERS,
        cancel_on_disconnect=on_disconnect == "cancel",
    )


@router.get(
    "/chat/stream",
    summary="Pick a chat stream up again after a lost connection",
    description=(
        "Sends the events that came after `Last-Event-ID` (header, or the `last_event_id` query "
        "parameter), then the rest as they come, from whichever replica is answering. Sending the "
        "POST request again with a `Last-Event-ID` header does the same. A stream is kept for "
        "CHAT_STREAM_RESUME_SECONDS after its last event; after that, 410: the history "
        "(GET /api/v1/chatbot/messages) holds the turn if it was completed."
    ),
    response_class=EventStreamResponse,
    responses={
        **_STREAM_DOC,
        **_ERRORS,
        400: {"model": ErrorResponse, "description": "No Last-Event-ID, or one this API did not give out"},
        410: {"model": GoneResponse, "description": "The stream's events are no longer kept (or never were)"},
    },
)
async def resume_chat_stream(settings: SettingsDep, point: ResumeRequest, stream_log: StreamLogDep) -> Response:
    return await _resume(point, stream_log, settings)


async def _resume(point: ResumePoint, stream_log: StreamLog | None, settings: ApiSettings) -> Response:
    if stream_log is None:
        metrics.CHAT_STREAM_RESUMES.labels(outcome="gone").inc()
        return _gone("Chat streams are not kept on this server (CHAT_STREAM_RESUME_SECONDS is 0).")
    key = stream_key(point.session_id, point.last.stream)
    try:
        # The first read before the response starts: a stream not kept is a 410, not an event.
        entries = await stream_log.read(key, point.last.seq, 0)
    except StreamGone:
        metrics.CHAT_STREAM_RESUMES.labels(outcome="gone").inc()
        return _gone("This stream's events are no longer kept.")
    except StreamLogDown:
        metrics.CHAT_STREAM_RESUMES.labels(outcome="unavailable").inc()
        raise HTTPException(503, "The chat streams' event log (Redis) is unavailable", {"Retry-After": "5"}) from None
    metrics.CHAT_STREAM_RESUMES.labels(outcome="resumed").inc()
    return EventStreamResponse(
        _resumed_stream(stream_log, key, point.last.seq, entries, settings), headers=_STREAM_HEADERS
    )


def _gone(why: str) -> JSONResponse:
    return JSONResponse(
        GoneResponse(detail=f"{why} The history holds the turn if it was completed.", history=_HISTORY).model_dump(),
        status_code=410,
    )


@router.post(
    "/chat",
    response_model=ChatResponse,
    summary="Send messages and get the agent's whole reply as JSON",
    responses={
        **_ERRORS,
        500: {"model": ErrorResponse, "description": "The reply failed unexpectedly"},
        409: {"model": ErrorResponse, "description": "The turn was withdrawn before its reply was complete"},
        502: {"model": ErrorResponse, "description": "The model rejected the request"},
        504: {"model": ErrorResponse, "description": "The model timed out"},
    },
)
async def chat(body: ChatRequest, settings: SettingsDep, conversation: ConversationDep) -> ChatResponse:
    _check_size(body, settings)
    turn = conversation.begin(_said(body), body.turn_id)
    try:
        answer = await turn.reply()
    except ChatFailure as failure:
        raise HTTPException(_FAILURE_STATUS.get(failure.reason, 503), failure.message) from None
    except TurnWithdrawn as withdrawn:
        raise HTTPException(409, withdrawn.message) from None
    return ChatResponse(messages=[Message(role=answer.role, content=answer.content)])


def _said(body: ChatRequest) -> list[Utterance]:
    return [Utterance(message.role, message.content) for message in body.messages]


@router.get(
    "/messages",
    response_model=HistoryResponse,
    summary="The session's message history, oldest first",
    responses=_ERRORS,
    dependencies=[limit_by_session("messages")],
)
async def get_messages(session: CurrentChatSession, db: DbDep) -> HistoryResponse:
    rows = await history.all_messages(db, session.id)
    return HistoryResponse(
        messages=[
            StoredMessage(role=m.role, content=m.content, created_at=m.created_at, channel=m.channel, turn_id=m.turn_id)
            for m in rows
        ]
    )


@router.delete(
    "/messages",
    response_model=DeletedResponse,
    summary="Delete the session's message history",
    responses=_ERRORS,
    dependencies=[limit_by_session("messages")],
)
async def delete_messages(session: CurrentChatSession, db: DbDep) -> DeletedResponse:
    return DeletedResponse(deleted=await history.clear(db, session.id))


@router.delete(
    "/turns/{turn_id}",
    response_model=DeletedResponse,
    summary="Take back a turn sent with a turn_id, stored or still running",
    description=(
        "Deletes the turn's messages if it is stored; if its reply is still running, the reply is "
        "never stored (its stream ends with a `turn_withdrawn` error event). Withdrawing twice, or a "
        "turn id never sent, is not an error. A voice call's token takes back only the call's turns. "
        "The voice agent uses this for a reply it prepared while the caller was still speaking."
    ),
    responses=_ERRORS,
    dependencies=[limit_by_session("messages")],
)
async def withdraw_turn(
    turn_id: uuid.UUID, session: AnyChannelSession, claims: ClaimsDep, db: DbDep
) -> DeletedResponse:
    channel = claims.channel.value if claims.channel is Channel.VOICE else None
    return DeletedResponse(deleted=await history.withdraw_turn(db, session.id, turn_id, channel))
