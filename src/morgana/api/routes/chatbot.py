"""Chat: a turn streamed as Server-Sent Events or answered as JSON, and the session's history."""

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

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
from morgana.api.services.conversation import ReplyText, Turn, TurnEvent, TurnFailed, TurnStored, TurnWithdrawn
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
            "data also carries `error: {code, message}`."
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


def _sse(event: TurnEvent) -> ServerSentEvent:
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
        data=data.model_dump_json(exclude_none=True), event="error" if data.error is not None else None
    )


async def _sse_stream(turn: Turn) -> AsyncGenerator[ServerSentEvent, None]:
    async with aclosing(turn.events()) as events:
        async for event in events:
            yield _sse(event)


@router.post(
    "/chat/stream",
    summary="Send messages and stream the agent's reply as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_stream(body: ChatRequest, settings: SettingsDep, conversation: ConversationDep) -> EventSourceResponse:
    _check_size(body, settings)
    # The history was read with the session (TurnSession, which also applies the `chat` rate
    # limit), so a database outage is a plain 503.
    turn = conversation.begin(_said(body), body.turn_id)
    return EventSourceResponse(_sse_stream(turn), ping=15, headers={"Cache-Control": "no-cache"})


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
