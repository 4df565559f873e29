"""Chat: a turn streamed as Server-Sent Events or answered as JSON, and the session's history."""

import asyncio
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing

import anyio
from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError
from sse_starlette import ServerSentEvent
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from morgana.api.config import ApiSettings
from morgana.api.deps import (
    AnyChannelSession,
    ClaimsDep,
    ConversationDep,
    CurrentChatSession,
    DbDep,
    SettingsDep,
    limit_by_session,
)
from morgana.api.routes import Responses
from morgana.api.schemas import (
    ChatRequest,
    ChatResponse,
    DeletedResponse,
    ErrorDetail,
    ErrorResponse,
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
    TurnEvent,
    TurnFailed,
    TurnStored,
    TurnWithdrawn,
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


_PING = ServerSentEvent(comment="ping").encode()


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
        self, events: AsyncGenerator[bytes, None], status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(events, status_code, headers)
        self._events = events

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
            if not finished:
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


def _sse(event: TurnEvent) -> bytes:
    """Frame one turn event as the contract's SSE: JSON `{content, done}`, and a failure as an
    `error` event whose data also carries `error: {code, message}`; a keep-alive as a comment."""
    match event:
        case StillReplying():
            return _PING
        case ReplyText(text):
            data = StreamEvent(content=text, done=False)
        case TurnStored():
            data = StreamEvent(content="", done=True)
        case TurnFailed(code, message):
            data = StreamEvent(content="", done=True, error=ErrorDetail(code=code, message=message))
    return ServerSentEvent(
        data=data.model_dump_json(exclude_none=True), event="error" if data.error is not None else None
    ).encode()


async def _sse_stream(turn: Turn, keepalive: float) -> AsyncGenerator[bytes, None]:
    async with aclosing(turn.events(keepalive)) as events:
        async for event in events:
            yield _sse(event)


@router.post(
    "/chat/stream",
    summary="Send messages and stream the agent's reply as Server-Sent Events",
    response_class=EventStreamResponse,
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_stream(body: ChatRequest, settings: SettingsDep, conversation: ConversationDep) -> EventStreamResponse:
    _check_size(body, settings)
    # The history was read with the session (TurnSession, which also applies the `chat` rate
    # limit), so a database outage is a plain 503.
    turn = conversation.begin(_said(body), body.turn_id)
    return EventStreamResponse(
        _sse_stream(turn, settings.chat_stream_keepalive_seconds),
        # No caching, and no buffering by nginx (its ingress included): each event as it comes.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
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
