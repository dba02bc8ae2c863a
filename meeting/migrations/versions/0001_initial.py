"""The whole initial schema: users, meetings, participants, messages, recipients.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from meeting.db import MYSQL_TABLE_ARGS, Id, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(32).with_variant(mysql.VARCHAR(32, collation="utf8mb4_bin"), "mysql", "mariadb"), nullable=False),
        sa.Column("display_name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("username", name="uq_users_username"),
        **MYSQL_TABLE_ARGS,
    )
    op.create_table(
        "meetings",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("organizer_id", Id, sa.ForeignKey("users.id", name="fk_meetings_organizer"), nullable=False),
        sa.Column("starts_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Index("ix_meetings_organizer_id", "organizer_id"),
        **MYSQL_TABLE_ARGS,
    )
    op.create_table(
        "meeting_participants",
        sa.Column("meeting_id", Id, sa.ForeignKey("meetings.id", name="fk_participants_meeting", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", Id, sa.ForeignKey("users.id", name="fk_participants_user"), primary_key=True),
        sa.Index("ix_meeting_participants_user", "user_id", "meeting_id"),
        **MYSQL_TABLE_ARGS,
    )
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("sender_id", Id, sa.ForeignKey("users.id", name="fk_messages_sender"), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("meeting_id", Id, sa.ForeignKey("meetings.id", name="fk_messages_meeting"), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Index("ix_messages_sender", "sender_id", "id"),
        **MYSQL_TABLE_ARGS,
    )
    op.create_table(
        "message_recipients",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", name="fk_recipients_message", ondelete="CASCADE"), primary_key=True),
        sa.Column("recipient_id", Id, sa.ForeignKey("users.id", name="fk_recipients_user"), primary_key=True),
        sa.Column("read_at", UTCDateTime(), nullable=True),
        sa.Index("ix_message_recipients_inbox", "recipient_id", "message_id"),
        sa.Index("ix_message_recipients_unread", "recipient_id", "read_at", "message_id"),
        **MYSQL_TABLE_ARGS,
    )


def downgrade() -> None:
    for table in ("message_recipients", "messages", "meeting_participants", "meetings", "users"):
        op.drop_table(table)
