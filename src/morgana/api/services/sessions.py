"""Chat sessions: one conversation each, owned by one user."""

import uuid
from typing import Any, cast

from sqlalchemy import CursorResult, delete, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from morgana.api.models import ChatSession, User
from morgana.api.names import friendly_name


async def create_for_token(db: AsyncSession, user_id: int, token_version: int) -> ChatSession | None:
    """A new session of the user a token names, if that user exists and the token is not revoked
    (its version is the user's): checked and created in one statement, one round trip. None if not."""
    session = ChatSession(id=uuid.uuid4(), user_id=user_id, name=friendly_name())
    owner = select(literal(session.id, ChatSession.id.type), User.id, literal(session.name, ChatSession.name.type))
    created = await db.execute(
        insert(ChatSession)
        .from_select(["id", "user_id", "name"], owner.where(User.id == user_id, User.token_version == token_version))
        .returning(ChatSession.created_at)
    )
    created_at = created.scalar_one_or_none()
    await db.commit()
    if created_at is None:
        return None
    session.created_at = created_at
    return session


async def list_for_user(db: AsyncSession, user_id: int) -> list[ChatSession]:
    rows = await db.scalars(
        select(ChatSession)
        .where(ChatSession.user_id == user_id)
        .order_by(ChatSession.created_at.desc(), ChatSession.id)
    )
    return list(rows)


async def rename(db: AsyncSession, user_id: int, session_id: uuid.UUID, name: str) -> ChatSession | None:
    session = await db.get(ChatSession, session_id)
    if session is None or session.user_id != user_id:
        return None
    session.name = name
    await db.commit()
    return session


async def delete_owned(db: AsyncSession, user_id: int, session_id: uuid.UUID) -> bool:
    """Delete a session and (by cascade) its history; False if the user has no such session."""
    result = await db.execute(delete(ChatSession).where(ChatSession.id == session_id, ChatSession.user_id == user_id))
    await db.commit()
    # A DELETE's result is a CursorResult, which has the row count.
    return cast("CursorResult[Any]", result).rowcount > 0
