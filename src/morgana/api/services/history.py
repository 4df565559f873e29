"""A session's message history, kept in Postgres so every replica and restart sees it."""

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Integer, Select, bindparam, delete, exists, insert, select, true
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from morgana.api.models import ChatMessage, ChatSession, User, WithdrawnTurn
from morgana.api.services.utterance import Role, Utterance


@dataclass(frozen=True, slots=True)
class SessionWithHistory:
    """A chat session, what its owner's tokens must match, and its last messages (oldest first)."""

    id: uuid.UUID
    user_id: int
    token_version: int
    recent: list[Utterance]
    # The voice agent's own session (a room the API did not open): its turns are spoken.
    of_service_account: bool = False


def _session_with_recent() -> Select[tuple[int, int, bool, int | None, str | None, str | None]]:
    recent = (
        select(ChatMessage.id, ChatMessage.role, ChatMessage.content)
        .where(ChatMessage.session_id == ChatSession.id)
        .order_by(ChatMessage.id.desc())
        .limit(bindparam("limit", type_=Integer))
        .lateral()
    )
    return (
        select(
            ChatSession.user_id,
            User.token_version,
            User.is_service_account,
            recent.c.id,
            recent.c.role,
            recent.c.content,
        )
        .join(User, User.id == ChatSession.user_id)
        .outerjoin(recent, true())
        .where(ChatSession.id == bindparam("session_id", type_=ChatSession.id.type))
    )


# Built once: building the lateral subquery per turn cost more CPU than running it.
_SESSION_WITH_RECENT = _session_with_recent()


async def session_with_recent(conn: AsyncConnection, session_id: uuid.UUID, limit: int) -> SessionWithHistory | None:
    """The session and its last `limit` messages in one round trip (a chat turn needs both before
    it can start); None if there is no such session."""
    rows = (await conn.execute(_SESSION_WITH_RECENT, {"session_id": session_id, "limit": limit})).all()
    if not rows:
        return None
    messages = sorted((row[3], row[4], row[5]) for row in rows if row[3] is not None)
    return SessionWithHistory(
        session_id,
        rows[0][0],
        rows[0][1],
        [Utterance(_checked_role(message_id, role), content) for message_id, role, content in messages],
        of_service_account=rows[0][2],
    )


def _checked_role(message_id: int, role: str) -> Role:
    if role not in ("user", "assistant"):
        raise ValueError(f"message {message_id} has an unknown role {role!r}")
    return cast(Role, role)


async def all_messages(db: AsyncSession, session_id: uuid.UUID) -> list[ChatMessage]:
    rows = await db.scalars(select(ChatMessage).where(ChatMessage.session_id == session_id).order_by(ChatMessage.id))
    return list(rows)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    # A turn with this id is in the history already: nothing stored twice.
    ALREADY_STORED = "already_stored"
    # Its client took it back (withdraw_turn) while the reply was running: nothing stored.
    WITHDRAWN = "withdrawn"


async def append_turn(
    db: AsyncSession,
    session_id: uuid.UUID,
    messages: Iterable[Utterance],
    channel: str = "chat",
    turn_id: uuid.UUID | None = None,
) -> StoreOutcome:
    """Store a whole turn (the caller's messages and the reply) in one transaction.

    The session row is locked first so that concurrent turns on one session are stored one after
    the other, never interleaved, and so that a turn and its withdrawal are never both half done.
    """
    await db.execute(select(ChatSession.id).where(ChatSession.id == session_id).with_for_update())
    if turn_id is not None:
        withdrawn, stored = (
            await db.execute(
                select(
                    exists().where(WithdrawnTurn.session_id == session_id, WithdrawnTurn.turn_id == turn_id),
                    exists().where(ChatMessage.session_id == session_id, ChatMessage.turn_id == turn_id),
                )
            )
        ).one()
        if withdrawn or stored:
            await db.rollback()
            return StoreOutcome.WITHDRAWN if withdrawn else StoreOutcome.ALREADY_STORED
    # One multi-row INSERT (Core: nothing is read back, so the ORM's unit of work has no job here).
    await db.execute(
        insert(ChatMessage).values(
            [
                {"session_id": session_id, "role": role, "content": content, "channel": channel, "turn_id": turn_id}
                for role, content in messages
            ]
        )
    )
    await db.commit()
    return StoreOutcome.STORED


async def withdraw_turn(db: AsyncSession, session_id: uuid.UUID, turn_id: uuid.UUID, channel: str | None) -> int:
    """Take a turn back: delete its messages if stored, and make sure a reply still running for
    it is never stored. `channel` limits it to turns said that way (a call's token withdraws only
    the call's turns). How many messages were deleted."""
    await db.execute(select(ChatSession.id).where(ChatSession.id == session_id).with_for_update())
    await db.execute(pg_insert(WithdrawnTurn).values(session_id=session_id, turn_id=turn_id).on_conflict_do_nothing())
    stored = delete(ChatMessage).where(ChatMessage.session_id == session_id, ChatMessage.turn_id == turn_id)
    if channel is not None:
        stored = stored.where(ChatMessage.channel == channel)
    result = await db.execute(stored)
    await db.commit()
    return cast("CursorResult[Any]", result).rowcount


async def clear(db: AsyncSession, session_id: uuid.UUID) -> int:
    """Delete a session's messages; how many there were."""
    result = await db.execute(delete(ChatMessage).where(ChatMessage.session_id == session_id))
    await db.commit()
    # A DELETE's result is a CursorResult, which has the row count.
    return cast("CursorResult[Any]", result).rowcount
