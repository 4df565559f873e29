"""Chat sessions: one conversation each, owned by one user."""

import uuid
from typing import Any, cast

from sqlalchemy import CursorResult, bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from morgana.api.models import ChatSession, User
from morgana.api.names import friendly_name

# Built once, with the new row's values as parameters: the statement is the same every time.
_CREATE_FOR_TOKEN = (
    insert(ChatSession)
    .from_select(
        ["id", "user_id", "name"],
        select(
            bindparam("id", type_=ChatSession.id.type), User.id, bindparam("name", type_=ChatSession.name.type)
        ).where(User.id == bindparam("user_id"), User.token_version == bindparam("version")),
    )
    .returning(ChatSession.created_at)
)


async def create_for_token(conn: AsyncConnection, user_id: int, token_version: int) -> ChatSession | None:
    """A new session of the user a token names, if that user exists and the token is not revoked
    (its version is the user's): checked and created in one statement, one round trip. None if not.

    One statement is atomic on its own: `conn` may be an autocommit connection."""
    session = ChatSession(id=uuid.uuid4(), user_id=user_id, name=friendly_name())
    created = await conn.execute(
        _CREATE_FOR_TOKEN, {"id": session.id, "name": session.name, "user_id": user_id, "version": token_version}
    )
    created_at = created.scalar_one_or_none()
    await conn.commit()
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


async def owned(db: AsyncSession, user_id: int, session_id: uuid.UUID) -> ChatSession | None:
    """The user's session of that id; None if the user has no such session."""
    session = await db.get(ChatSession, session_id)
    return session if session is not None and session.user_id == user_id else None


async def rename(db: AsyncSession, user_id: int, session_id: uuid.UUID, name: str) -> ChatSession | None:
    session = await owned(db, user_id, session_id)
    if session is None:
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
