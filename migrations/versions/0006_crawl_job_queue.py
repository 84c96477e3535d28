"""crawl job queue

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 20:22:55.507663
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index('ix_crawl_jobs_status_id', ['status', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_crawl_jobs_status_id')
        batch_op.drop_column('attempts')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('worker')

