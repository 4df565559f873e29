"""Turns a client can take back: messages carry the client's turn id, and withdrawn turns are
remembered so that a reply still running when its turn was withdrawn is never stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chat_messages", sa.Column("turn_id", sa.Uuid(), nullable=True))
    op.create_index(
        "ix_chat_messages_session_id_turn_id",
        "chat_messages",
        ["session_id", "turn_id"],
        postgresql_where=sa.text("turn_id IS NOT NULL"),
    )
    op.create_table(
        "withdrawn_turns",
        sa.Column("session_id", sa.Uuid(), sa.ForeignKey("chat_sessions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("turn_id", sa.Uuid(), primary_key=True),
        sa.Column("withdrawn_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("withdrawn_turns")
    op.drop_index("ix_chat_messages_session_id_turn_id", table_name="chat_messages")
    op.drop_column("chat_messages", "turn_id")
