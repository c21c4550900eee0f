"""model identity of jobs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 23:04:19.965138
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # jobs from before this revision: model named only in the free-text `model` column
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_name', sa.String(length=128), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('model_version', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('model_weights_sha256', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('model_test', sa.Boolean(), nullable=False, server_default=sa.false()))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('model_test')
        batch_op.drop_column('model_weights_sha256')
        batch_op.drop_column('model_version')
        batch_op.drop_column('model_name')

