"""Recovery: operator actions, starts cut short by an orderly stop, re-queue time and "redirected" deliveries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

The delivery states are written out here, as they are at this revision (0002 holds the earlier list).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DELIVERY_STATES_BEFORE = ("pending", "sent", "dead")
DELIVERY_STATES = ("pending", "sent", "dead", "redirected")


def _delivery_check(batch, words: tuple[str, ...]) -> None:  # noqa: ANN001
    batch.drop_constraint(op.f("ck_deliveries_status"), type_="check")
    listed = ", ".join(f"'{w}'" for w in words)
    batch.create_check_constraint(op.f("ck_deliveries_status"), f"status IN ({listed})")


def upgrade() -> None:
    op.create_table(
        "operator_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_actions")),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        _delivery_check(batch, DELIVERY_STATES)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stopped_starts", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stopped_starts")
    op.execute("UPDATE deliveries SET status = 'dead' WHERE status = 'redirected'")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("queued_at")
        _delivery_check(batch, DELIVERY_STATES_BEFORE)
    op.drop_table("operator_actions")
