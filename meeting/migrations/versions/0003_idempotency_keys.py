"""idempotency_keys: the stored response of each POST sent with an Idempotency-Key.

One row per (user, key), written in the transaction that created the message or
meeting, so a replayed request finds it whatever instance it reaches and
whenever (until the TTL prunes it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from meeting.db import MYSQL_TABLE_ARGS, Id, IdempotencyKey, ResponseBody, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", Id, nullable=False, autoincrement=False),
        sa.Column("idempotency_key", IdempotencyKey, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("response", ResponseBody, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "idempotency_key", name="pk_idempotency_keys"),
        sa.Index("ix_idempotency_keys_created", "created_at"),
        **MYSQL_TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
