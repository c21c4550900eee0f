"""Console: the series search index (identifying header values, opaque ids) and the node's operator switches.

Revision ID: 0008_console
Revises: 0006_roles
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_console"
down_revision = "0006_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "series_lookup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("patient_name", sa.String(length=256), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_description", sa.Text(), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_series_lookup_series_id_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_lookup")),
        sa.UniqueConstraint("series_id", name=op.f("uq_series_lookup_series_id")),
        sa.UniqueConstraint("public_id", name=op.f("uq_series_lookup_public_id")),
    )
    for column in ("accession_number", "patient_id", "study_date"):
        op.create_index(op.f(f"ix_series_lookup_{column}"), "series_lookup", [column], unique=False)
    op.create_table(
        "node_controls",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("set_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_node_controls")),
    )


def downgrade() -> None:
    op.drop_table("node_controls")
    for column in ("accession_number", "patient_id", "study_date"):
        op.drop_index(op.f(f"ix_series_lookup_{column}"), table_name="series_lookup")
    op.drop_table("series_lookup")
