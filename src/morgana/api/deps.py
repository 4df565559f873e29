"""FastAPI dependencies: settings, database, the two kinds of bearer token, rate limits."""

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Header, HTTPException, Query, Request, params, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from morgana.api import metrics
from morgana.api.config import ApiSettings
from morgana.api.models import ChatSession, User
from morgana.api.ratelimit import RateLimitBackendDown, RateLimiter
from morgana.api.security import Channel, InvalidToken, PasswordHasher, TokenClaims, TokenType, decode_token
from morgana.api.services import history
from morgana.api.services.chat import ChatAgent
from morgana.api.services.conversation import Conversation
from morgana.api.services.history import SessionWithHistory
from morgana.api.services.livekit import VoiceRooms
from morgana.api.services.stream_log import EventId, InvalidEventId, StreamLog


# `request.app.state` is untyped: each getter below names what create_app stores there. They are
# `async def`, as are all dependencies here: FastAPI runs a plain `def` one in a worker thread,
# a thread hop per dependency per request.
async def app_settings(request: Request) -> ApiSettings:
    """The settings the app was created with (create_app may be given its own, e.g. in tests)."""
    return cast(ApiSettings, request.app.state.settings)


SettingsDep = Annotated[ApiSettings, Depends(app_settings)]


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.session_factory() as session:
        yield session


DbDep = Annotated[AsyncSession, Depends(get_db)]


def _session_factory(request: Request) -> async_sessionmaker[AsyncSession]:
    return cast(async_sessionmaker[AsyncSession], request.app.state.session_factory)


async def get_session_factory(request: Request) -> async_sessionmaker[AsyncSession]:
    """For work that must hold a connection only briefly (not for the whole request)."""
    return _session_factory(request)


SessionFactoryDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_session_factory)]


def _autocommit_engine(request: Request) -> AsyncEngine:
    return cast(AsyncEngine, request.app.state.autocommit_engine)


async def get_autocommit_engine(request: Request) -> AsyncEngine:
    """For a request whose database work is one statement (see db.autocommit)."""
    return _autocommit_engine(request)


AutocommitDep = Annotated[AsyncEngine, Depends(get_autocommit_engine)]


async def get_agent(request: Request) -> ChatAgent:
    return cast(ChatAgent, request.app.state.agent)


AgentDep = Annotated[ChatAgent, Depends(get_agent)]


async def get_voice_rooms(request: Request) -> VoiceRooms:
    return cast(VoiceRooms, request.app.state.voice_rooms)


VoiceRoomsDep = Annotated[VoiceRooms, Depends(get_voice_rooms)]


async def get_hasher(request: Request) -> PasswordHasher:
    return cast(PasswordHasher, request.app.state.password_hasher)


HasherDep = Annotated[PasswordHasher, Depends(get_hasher)]

_bearer = HTTPBearer(
    auto_error=False,
    description="A user token (register/login) or a session token (POST /api/v1/auth/session).",
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


async def _claims(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenClaims:
    if credentials is None:
        raise _unauthorized("Missing bearer token")
    try:
        return decode_token(settings, credentials.credentials)
    except InvalidToken:
        raise _unauthorized("Invalid or expired token") from None


ClaimsDep = Annotated[TokenClaims, Depends(_claims)]


def _revoked() -> HTTPException:
    return _unauthorized("This token was revoked (logged out or password changed): log in again")


async def user_claims(claims: ClaimsDep) -> TokenClaims:
    """The claims of a user token (not yet checked against the database)."""
    if claims.type is not TokenType.USER:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "This endpoint needs a user token (from /api/v1/auth/register or /api/v1/auth/login)",
        )
    return claims


UserClaims = Annotated[TokenClaims, Depends(user_claims)]


def _refused(user_exists: bool) -> HTTPException:
    if not user_exists:
        return _unauthorized("The account behind this token no longer exists")
    return _revoked()


async def current_user(claims: UserClaims, db: DbDep) -> User:
    """The user of a user token, read in the request's own database session: user-token endpoints
    answer at once, and one connection (one checkout) serves the check and the endpoint."""
    user = await db.get(User, claims.user_id)
    if user is None or user.token_version != claims.version:
        raise _refused(user is not None)
    return user


async def token_refused(conn: AsyncConnection, claims: TokenClaims) -> HTTPException:
    """Why a user token that a combined check-and-write statement did not accept was refused."""
    return _refused(await conn.scalar(select(User.id).where(User.id == claims.user_id)) is not None)


def _check_session_token(claims: TokenClaims, *, voice: bool) -> uuid.UUID:
    """The token's session id, if it is a session token this endpoint takes."""
    if claims.type is not TokenType.SESSION or claims.session_id is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "This endpoint needs a session token (from POST /api/v1/auth/session)",
        )
    if claims.channel is Channel.VOICE and not voice:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "A voice call's session token can only add turns to its conversation"
        )
    return claims.session_id


def _check_owner(claims: TokenClaims, user_id: int | None, token_version: int) -> None:
    if user_id != claims.user_id:
        raise _unauthorized("The session behind this token no longer exists")
    if token_version != claims.version:
        raise _revoked()


# Short-lived DB sessions here, so a long chat stream does not pin a pooled connection.
async def current_chat_session(request: Request, claims: ClaimsDep) -> ChatSession:
    """The session of a session token that its user holds (not a call's agent)."""
    return await _owned_session(request, claims, _check_session_token(claims, voice=False))


async def any_channel_session(request: Request, claims: ClaimsDep) -> ChatSession:
    """The session of a session token, its user's or a call's agent's."""
    return await _owned_session(request, claims, _check_session_token(claims, voice=True))


async def _owned_session(request: Request, claims: TokenClaims, session_id: uuid.UUID) -> ChatSession:
    async with _session_factory(request)() as db:
        row = (
            (await db.execute(select(ChatSession, User.token_version).join(User).where(ChatSession.id == session_id)))
            .tuples()
            .one_or_none()
        )
    if row is None:
        raise _unauthorized("The session behind this token no longer exists")
    _check_owner(claims, row[0].user_id, row[1])
    return row[0]


async def turn_session(request: Request, claims: ClaimsDep, settings: SettingsDep) -> SessionWithHistory:
    """The session a turn is added to (its user's, or a call's agent's voice token), with the
    recent history the turn is answered from: one round trip to the database. The session's
    `chat` rate limit is checked meanwhile, keyed on the signed token's session id, so that the
    two round trips overlap; a refusal by the limit wins over what the database says."""
    session_id = _check_session_token(claims, voice=True)
    limited, found = await asyncio.gather(
        _enforce(request, "chat", f"session:{session_id}"),
        _read_turn_session(request, session_id, settings.max_history_messages),
        return_exceptions=True,
    )
    if isinstance(limited, BaseException):
        raise limited
    if isinstance(found, BaseException):
        raise found
    if found is None:
        raise _unauthorized("The session behind this token no longer exists")
    _check_owner(claims, found.user_id, found.token_version)
    return found


async def _read_turn_session(request: Request, session_id: uuid.UUID, limit: int) -> SessionWithHistory | None:
    async with _autocommit_engine(request).connect() as conn:
        return await history.session_with_recent(conn, session_id, limit)


CurrentUser = Annotated[User, Depends(current_user)]
CurrentChatSession = Annotated[ChatSession, Depends(current_chat_session)]
AnyChannelSession = Annotated[ChatSession, Depends(any_channel_session)]
TurnSession = Annotated[SessionWithHistory, Depends(turn_session)]


async def get_conversation(
    session: TurnSession, claims: ClaimsDep, agent: AgentDep, factory: SessionFactoryDep
) -> Conversation:
    """The conversation of the session token's chat session; its turns are stored as said on the
    token's channel (typed, or spoken in a call). The voice agent's own sessions are spoken too,
    though stored as typed: their replies are not held to be sent in fewer events."""
    return Conversation(agent, factory, session.id, session.recent, claims.channel, spoken=session.of_service_account)


ConversationDep = Annotated[Conversation, Depends(get_conversation)]


async def get_stream_log(request: Request) -> StreamLog | None:
    """Where chat streams' events are kept for resuming; None when CHAT_STREAM_RESUME_SECONDS is 0."""
    return cast(StreamLog | None, request.app.state.stream_log)


StreamLogDep = Annotated[StreamLog | None, Depends(get_stream_log)]


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A chat stream to pick up: the session token's, after the last event its client has."""

    session_id: uuid.UUID
    last: EventId


_LAST_EVENT_ID_DOC = (
    "To pick a chat stream up again after a lost connection: the `id` of the last event received "
    "(as EventSource sends it on reconnecting)."
)
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID", description=_LAST_EVENT_ID_DOC)]


async def resume_point(request: Request, claims: TokenClaims, last_event_id: str) -> ResumePoint:
    """The stream a reconnecting client asks for: the event id must be one this API gave out, and
    the token one its session's user holds. Limited as reading the history is (`messages`)."""
    session_id = _check_session_token(claims, voice=True)
    try:
        last = EventId.parse(last_event_id)
    except InvalidEventId:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "Last-Event-ID must be the id of an event of this API's chat stream (`<stream>:<n>`)",
        ) from None
    await _enforce(request, "messages", f"session:{session_id}")
    await _owned_session(request, claims, session_id)
    return ResumePoint(session_id, last)


async def chat_stream_start(
    request: Request,
    claims: ClaimsDep,
    settings: SettingsDep,
    agent: AgentDep,
    factory: SessionFactoryDep,
    last_event_id: LastEventIdHeader = None,
) -> Conversation | ResumePoint:
    """A new turn's conversation, or, with a Last-Event-ID (a client reconnecting by sending its
    request again, as fetch-based SSE clients do), the stream to pick up: no new turn, and no
    `chat` rate limit spent."""
    if last_event_id:
        return await resume_point(request, claims, last_event_id)
    session = await turn_session(request, claims, settings)
    return await get_conversation(session, claims, agent, factory)


ChatStreamStart = Annotated[Conversation | ResumePoint, Depends(chat_stream_start)]


async def resume_request(
    request: Request,
    claims: ClaimsDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: Annotated[
        str | None, Query(description="The same as the Last-Event-ID header, for clients that cannot set it.")
    ] = None,
) -> ResumePoint:
    chosen = last_event_id_header or last_event_id
    if not chosen:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "Say which stream to pick up: a Last-Event-ID header or `last_event_id`"
        )
    return await resume_point(request, claims, chosen)


ResumeRequest = Annotated[ResumePoint, Depends(resume_request)]


def _store_down() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Rate limiting store (Redis) is unavailable",
        headers={"Retry-After": "5"},
    )


def _limited(name: str, retry_after: int, what: str = "Too many requests") -> HTTPException:
    metrics.RATE_LIMITED.labels(limit=name).inc()
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"{what}; retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


async def _enforce(request: Request, name: str, key: str) -> None:
    limiter: RateLimiter = request.app.state.rate_limiter
    try:
        decision = await limiter.hit(name, key)
    except RateLimitBackendDown:
        raise _store_down() from None
    if not decision.allowed:
        raise _limited(name, decision.retry_after_seconds)


class FailedLogins:
    """Failed logins counted per account (RATE_LIMIT_LOGIN_ACCOUNT), shared by every replica.

    Keyed on the email as typed, registered or not, and refused the same way either way, so a
    lockout tells nothing about which accounts exist; while locked, no password is checked.
    Per-address limits alone let rotating client addresses guess one account's password.
    """

    def __init__(self, request: Request, email: str) -> None:
        self.limiter: RateLimiter = request.app.state.rate_limiter
        self.key = "account:" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]

    async def refuse_if_locked(self) -> None:
        try:
            decision = await self.limiter.exceeded("login_account", self.key)
        except RateLimitBackendDown:
            raise _store_down() from None
        if not decision.allowed:
            raise _limited("login_account", decision.retry_after_seconds, "Too many failed logins for this account")

    async def failed(self) -> None:
        try:
            await self.limiter.hit("login_account", self.key)
        except RateLimitBackendDown:
            raise _store_down() from None

    async def succeeded(self) -> None:
        try:
            await self.limiter.forget("login_account", self.key)
        except RateLimitBackendDown:
            pass  # the failures expire on their own


# fastapi types Depends() as returning Any (so that it can stand as a parameter's default).
def limit_by_client(name: str) -> params.Depends:
    """Limit unauthenticated calls per client address (see FORWARDED_ALLOW_IPS for proxies)."""

    async def dependency(request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        await _enforce(request, name, f"ip:{client}")

    return cast(params.Depends, Depends(dependency))


def limit_by_user(name: str) -> params.Depends:
    """Limit a user token's calls per user, before the database is asked about the token."""

    async def dependency(request: Request, claims: UserClaims) -> None:
        await _enforce(request, name, f"user:{claims.user_id}")

    return cast(params.Depends, Depends(dependency))


def limit_by_session(name: str) -> params.Depends:
    """Limit a session token's calls per session (a call's agent and its caller together), before
    the database is asked about the token. Chat turns are limited by TurnSession instead."""

    async def dependency(request: Request, claims: ClaimsDep) -> None:
        await _enforce(request, name, f"session:{_check_session_token(claims, voice=True)}")

    return cast(params.Depends, Depends(dependency))
