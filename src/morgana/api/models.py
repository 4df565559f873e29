"""Database tables: users, their chat sessions, each session's message history, and the turns
withdrawn from it."""

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # Stored lower-cased: one account per address whatever the caller's casing.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    hashed_password: Mapped[str] = mapped_column(String(255))
    # In every token issued for this user; bumped by logout and a password change, which so
    # revoke every token issued before.
    token_version: Mapped[int] = mapped_column(Integer, server_default="0", default=0)
    # The voice agent's account (`morgana-api migrate`): it may trade a call's credential for a
    # token of the caller's session, and holds no conversations of its own.
    is_service_account: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    sessions: Mapped[list["ChatSession"]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    user: Mapped[User] = relationship(back_populates="sessions")


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (
        Index("ix_chat_messages_session_id_id", "session_id", "id"),
        Index(
            "ix_chat_messages_session_id_turn_id", "session_id", "turn_id", postgresql_where=text("turn_id IS NOT NULL")
        ),
    )

    # The identity gives the order of turns, also across concurrent writers.
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # How it was said: "chat" (typed) or "voice" (spoken in a LiveKit call).
    channel: Mapped[str] = mapped_column(String(8), server_default="chat", default="chat")
    # The client's id for the turn this message belongs to, when it gave one (ChatRequest.turn_id).
    turn_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WithdrawnTurn(Base):
    """A turn its client took back (a voice reply prepared while the caller was still speaking,
    then dropped): it is deleted if stored, and never stored if its reply is still running."""

    __tablename__ = "withdrawn_turns"

    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), primary_key=True)
    turn_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    withdrawn_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
