"""Calls continue the caller's conversation: each message says how it was said, and the voice
agent's account is marked as such (it may join a caller's session for the length of a call).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chat_messages", sa.Column("channel", sa.String(8), server_default="chat", nullable=False))
    op.add_column("users", sa.Column("is_service_account", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    op.drop_column("users", "is_service_account")
    op.drop_column("chat_messages", "channel")
