"""Status columns checked against lpm_node.core.states; one delivery per (SOPInstanceUID, destination).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Duplicate deliveries of an older database (same object, same destination) are merged first: the oldest
row is kept, with the attempts of the others, and takes the newest state of the group.
The state words are written out here, as they were at this revision, so that a later change to the enums
needs a revision of its own.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHECKS = {
    # table: (column, words)
    "associations": ("outcome", ("open", "released", "aborted", "rejected")),
    "series": ("status", ("receiving", "complete", "rejected", "eligible", "not_selected", "queued", "processing",
                          "done", "failed")),
    "series_decisions": ("status", ("receiving", "complete", "rejected", "eligible", "not_selected", "queued",
                                    "processing", "done", "failed")),
    "jobs": ("status", ("queued", "running", "done", "failed", "cancelled")),
    "deliveries": ("status", ("pending", "sent", "dead")),
}


def _merge_duplicate_deliveries() -> None:
    bind = op.get_bind()
    groups = bind.execute(sa.text(
        "SELECT sop_instance_uid, destination FROM deliveries GROUP BY sop_instance_uid, destination "
        "HAVING COUNT(*) > 1"
    )).fetchall()
    for sop_uid, destination in groups:
        ids = [row[0] for row in bind.execute(
            sa.text("SELECT id FROM deliveries WHERE sop_instance_uid = :u AND destination = :d ORDER BY id"),
            {"u": sop_uid, "d": destination},
        )]
        keep, newest, others = ids[0], ids[-1], ids[1:]
        if newest != keep:
            bind.execute(sa.text(
                "UPDATE deliveries SET (job_id, series_instance_uid, object_kind, path, status, attempts, "
                "next_attempt_at, last_error, sent_at) = (SELECT job_id, series_instance_uid, object_kind, path, "
                "status, attempts, next_attempt_at, last_error, sent_at FROM deliveries WHERE id = :newest) "
                "WHERE id = :keep"
            ), {"newest": newest, "keep": keep})
        for other in others:
            bind.execute(sa.text("UPDATE delivery_attempts SET delivery_id = :keep WHERE delivery_id = :other"),
                         {"keep": keep, "other": other})
            bind.execute(sa.text("DELETE FROM deliveries WHERE id = :other"), {"other": other})


def upgrade() -> None:
    _merge_duplicate_deliveries()
    for table, (column, words) in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            listed = ", ".join(f"'{w}'" for w in words)
            batch.create_check_constraint(op.f(f"ck_{table}_{column}"), f"{column} IN ({listed})")
            if table == "deliveries":
                batch.create_unique_constraint(
                    op.f("uq_deliveries_sop_instance_uid_destination"), ["sop_instance_uid", "destination"]
                )


def downgrade() -> None:
    for table, (column, _words) in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            if table == "deliveries":
                batch.drop_constraint(op.f("uq_deliveries_sop_instance_uid_destination"), type_="unique")
            batch.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
