from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse

from morgana.api.deps import AgentDep, CurrentChatSession, DbDep, SettingsDep, limit_by_session
from morgana.api.config import ApiSettings
from morgana.api.schemas import (
    ChatRequest,
    ChatResponse,
    DeletedResponse,
    ErrorResponse,
    HistoryResponse,
    StoredMessage,
)
from morgana.api.services import history
from morgana.api.services.chat import ChatFailure
from morgana.api.services.conversation import Conversation

router = APIRouter(prefix="/chatbot", tags=["chatbot"])

_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or expired token"},
    403: {"model": ErrorResponse, "description": "A user token where a session token belongs"},
    429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Database, Redis or the model is unavailable"},
}

_STREAM_DOC = {
    200: {
        "description": (
            "Server-Sent Events. Each event's data is JSON `{\"content\": str, \"done\": bool}`; "
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
        errors.append({
            "type": "too_long",
            "loc": ["body", "messages"],
            "msg": f"at most {settings.max_messages_per_request} messages per request",
            "input": len(body.messages),
        })
    for index, message in enumerate(body.messages):
        if len(message.content) > settings.max_message_chars:
            errors.append({
                "type": "string_too_long",
                "loc": ["body", "messages", index, "content"],
                "msg": f"at most {settings.max_message_chars} characters per message",
                "input": len(message.content),
            })
    if errors:
        raise RequestValidationError(errors)


def _conversation(request: Request, session_id, settings: ApiSettings, agent) -> Conversation:
    return Conversation(
        agent, request.app.state.session_factory, session_id, settings.max_history_messages
    )


@router.post(
    "/chat/stream",
    summary="Send messages and stream the agent's reply as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={**_STREAM_DOC, **_ERRORS},
    dependencies=[limit_by_session("chat")],
)
async def chat_stream(
    body: ChatRequest,
    request: Request,
    session: CurrentChatSession,
    settings: SettingsDep,
    agent: AgentDep,
) -> EventSourceResponse:
    _check_size(body, settings)
    conversation = _conversation(request, session.id, settings, agent)
    # Read history before the 200 goes out, so a database outage is a plain 503.
    context = await conversation.context_for(body.messages)
    return EventSourceResponse(
        conversation.stream_events(context, body.messages),
        ping=15,
        headers={"Cache-Control": "no-cache"},
    )


@router.post(
    "/chat",
    response_model=ChatResponse,
    summary="Send messages and get the agent's whole reply as JSON",
    responses={**_ERRORS, 504: {"model": ErrorResponse, "description": "The model timed out"}},
    dependencies=[limit_by_session("chat")],
)
async def chat(
    body: ChatRequest,
    request: Request,
    session: CurrentChatSession,
    settings: SettingsDep,
    agent: AgentDep,
) -> ChatResponse:
    _check_size(body, settings)
    try:
        answer = await _conversation(request, session.id, settings, agent).reply(body.messages)
    except ChatFailure as failure:
        raise HTTPException(failure.status_code, failure.message) from None
    return ChatResponse(messages=[answer])


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
        messages=[StoredMessage(role=m.role, content=m.content, created_at=m.created_at) for m in rows]
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
