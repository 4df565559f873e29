"""A voice call continues its caller's conversation: the call's agent trades the credential from
its dispatch for a voice token of the caller's session.

Two things are needed, so neither alone is enough: the credential, which only the caller's LiveKit
token carries (bound to one session and one room, and expiring), and the voice agent's own
account. The caller can read the credential inside their token, but cannot trade it; the agent's
account can trade credentials, but holds no conversations and can read none.
"""

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from morgana.api.config import ApiSettings
from morgana.api.models import ChatSession, User
from morgana.api.security import (
    InvalidToken,
    IssuedToken,
    TokenType,
    decode_token,
    issue_voice_session_token,
)


class CallRefused(Exception):
    """The credential cannot be traded; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def join_call(
    session_factory: async_sessionmaker[AsyncSession], settings: ApiSettings, agent: User, credential: str, room: str
) -> tuple[ChatSession, IssuedToken]:
    """The caller's session and a voice token for it, or CallRefused."""
    if not agent.is_service_account:
        raise CallRefused(403, "Only the voice agent's account may join a call's conversation")
    try:
        call = decode_token(settings, credential)
    except InvalidToken:
        raise CallRefused(401, "Invalid or expired call credential") from None
    if call.type is not TokenType.CALL or call.session_id is None:
        raise CallRefused(401, "Invalid or expired call credential")
    if call.room != room:
        raise CallRefused(403, "This call credential is for another room")
    session = await _owned_session(session_factory, call.session_id, call.user_id, call.version)
    return session, issue_voice_session_token(settings, call)


async def _owned_session(
    session_factory: async_sessionmaker[AsyncSession], session_id: uuid.UUID, user_id: int, version: int
) -> ChatSession:
    async with session_factory() as db:
        row = (
            (await db.execute(select(ChatSession, User.token_version).join(User).where(ChatSession.id == session_id)))
            .tuples()
            .one_or_none()
        )
    if row is None or row[0].user_id != user_id:
        raise CallRefused(404, "The caller's session no longer exists")
    if row[1] != version:
        raise CallRefused(401, "The caller logged out or changed their password since the call began")
    return row[0]
