"""Per-recipient sequence numbers: message_recipients.seq and users.last_seq.

Auto-increment message ids are not a safe resume cursor (two transactions may
commit 101 before 100). `seq` counts each recipient's messages 1, 2, 3... in
commit order with no holes; `users.last_seq` is the counter the send
transaction increments under the user row's lock. Existing rows are numbered
in message id order.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from meeting.db import Id

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("last_seq", Id, nullable=False, server_default="0"))
    with op.batch_alter_table("message_recipients") as batch:
        batch.add_column(sa.Column("seq", Id, nullable=True))

    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT recipient_id, message_id FROM message_recipients ORDER BY recipient_id, message_id")).all()
    last: dict[int, int] = defaultdict(int)
    updates = []
    for recipient_id, message_id in rows:
        last[recipient_id] += 1
        updates.append({"r": recipient_id, "m": message_id, "s": last[recipient_id]})
    if updates:
        bind.execute(sa.text("UPDATE message_recipients SET seq = :s WHERE recipient_id = :r AND message_id = :m"), updates)
        bind.execute(sa.text("UPDATE users SET last_seq = :s WHERE id = :r"), [{"r": r, "s": s} for r, s in last.items()])

    with op.batch_alter_table("message_recipients") as batch:
        batch.alter_column("seq", existing_type=Id, nullable=False)
        batch.create_index("uq_message_recipients_seq", ["recipient_id", "seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("message_recipients") as batch:
        batch.drop_index("uq_message_recipients_seq")
        batch.drop_column("seq")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("last_seq")
