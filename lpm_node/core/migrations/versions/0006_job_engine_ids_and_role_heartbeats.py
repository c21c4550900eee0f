"""Job engine ids of measurement jobs (PostgreSQL runs them on procrastinate) and the heartbeats of the node's
processes (roles).

Revision ID: 0006_roles
Revises: 0005
Create Date: 2026-12-02 12:02:26.227720
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_roles'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('role_heartbeats',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=256), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('data_marker', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_role_heartbeats'))
    )
    with op.batch_alter_table('role_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_role_heartbeats_last_seen_at'), ['last_seen_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('engine_job_id', sa.Integer(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('engine_job_id')

    with op.batch_alter_table('role_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_role_heartbeats_last_seen_at'))

    op.drop_table('role_heartbeats')
