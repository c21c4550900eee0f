"""instance checksums and TLS associations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 22:55:56.741902
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # rows from before this revision: no checksum recorded (not verified), not TLS
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tls', sa.Boolean(), nullable=False, server_default=sa.false()))

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checksum', sa.String(length=64), nullable=False, server_default=''))



def downgrade() -> None:
    # rows from before this revision: no checksum recorded (not verified), not TLS
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('checksum')

    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.drop_column('tls')

