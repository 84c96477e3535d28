"""source licence: the --license filter a crawl asked its engines for, recorded with each source

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 17:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.add_column(sa.Column('license', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.drop_column('license')
