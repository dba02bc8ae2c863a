"""messages.recipient_count and messages.read_count: the sender's receipts without counting rows.

A sender's sent box shows, per message, how many received it and how many read
it. Counting message_recipients rows for each message on each read of the box
costs O(recipients); the counters are kept in the rows instead: recipient_count
is fixed at the send, read_count goes up in the transaction that marks a
recipient row read (meeting.storage.receipts.count_reads, called by
meeting.messages._mark right after storage.messages.mark_read). Existing
messages are counted once here. Instances of the previous version must be
stopped before it runs (README, "Upgrading"): they would insert messages with
recipient_count 0 and never bump read_count.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("recipient_count", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("read_count", sa.Integer, nullable=False, server_default="0"))
    # Backfill: correlated subqueries, one statement on both backends (MariaDB allows them
    # in an UPDATE as long as they read another table).
    op.execute(
        "UPDATE messages SET "
        "recipient_count = (SELECT COUNT(*) FROM message_recipients r WHERE r.message_id = messages.id), "
        "read_count = (SELECT COUNT(*) FROM message_recipients r WHERE r.message_id = messages.id AND r.read_at IS NOT NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("read_count")
        batch.drop_column("recipient_count")
