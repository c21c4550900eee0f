"""The receiver process (host:pid) that handled each association, so that the associations of a receiver that
stopped without closing them can be closed in the audit (open ones are found by ``ended_at``).

Revision ID: 0009_receivers
Revises: 0008_console
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_receivers"
down_revision = "0008_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receiver", sa.String(length=300), nullable=False, server_default=""))
        batch_op.create_index(batch_op.f("ix_associations_ended_at"), ["ended_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_associations_ended_at"))
        batch_op.drop_column("receiver")
