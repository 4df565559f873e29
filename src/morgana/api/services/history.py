"""A session's message history, kept in Postgres so every replica and restart sees it."""

import uuid
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from morgana.api.models import ChatMessage, ChatSession
from morgana.api.services.utterance import Role, Utterance


def role_of(message: ChatMessage) -> Role:
    """A stored message's role (the column holds only what append_turn wrote)."""
    if message.role not in ("user", "assistant"):
        raise ValueError(f"message {message.id} has an unknown role {message.role!r}")
    return cast(Role, message.role)


async def recent(db: AsyncSession, session_id: uuid.UUID, limit: int) -> list[ChatMessage]:
    """The last `limit` messages of a session, oldest first."""
    newest_first = await db.scalars(
        select(ChatMessage).where(ChatMessage.session_id == session_id).order_by(ChatMessage.id.desc()).limit(limit)
    )
    return list(reversed(list(newest_first)))


async def all_messages(db: AsyncSession, session_id: uuid.UUID) -> list[ChatMessage]:
    rows = await db.scalars(select(ChatMessage).where(ChatMessage.session_id == session_id).order_by(ChatMessage.id))
    return list(rows)


async def append_turn(
    db: AsyncSession, session_id: uuid.UUID, messages: Iterable[Utterance], channel: str = "chat"
) -> None:
    """Store a whole turn (the caller's messages and the reply) in one transaction.

    The session row is locked first so that concurrent turns on one session are stored
    one after the other, never interleaved.
    """
    await db.execute(select(ChatSession.id).where(ChatSession.id == session_id).with_for_update())
    db.add_all(
        ChatMessage(session_id=session_id, role=role, content=content, channel=channel) for role, content in messages
    )
    await db.commit()


async def clear(db: AsyncSession, session_id: uuid.UUID) -> int:
    """Delete a session's messages; how many there were."""
    result = await db.execute(delete(ChatMessage).where(ChatMessage.session_id == session_id))
    await db.commit()
    # A DELETE's result is a CursorResult, which has the row count.
    return cast("CursorResult[Any]", result).rowcount
