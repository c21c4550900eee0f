"""Alembic environment: runs on the connection that lpm_node.core.migrations hands over (no URL, no ini)."""

from __future__ import annotations

from alembic import context

from lpm_node.core.audit import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through lpm_node.core.migrations (a connection is needed)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
