"""queue failures: the last error of each queued job's latest failed run (procrastinate keeps none)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 01:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'queue_failures',
        sa.Column('queue_job_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('task', sa.String(length=128), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=False),
        sa.Column('error', sa.Text(), nullable=False),
        sa.Column('failed_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('queue_job_id', name=op.f('pk_queue_failures')),
    )


def downgrade() -> None:
    op.drop_table('queue_failures')
