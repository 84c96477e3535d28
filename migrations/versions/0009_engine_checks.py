"""engine checks: the figures and verdict of each `fastclass engines check` canary

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 17:15:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'engine_checks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('engine', sa.String(length=32), nullable=False),
        sa.Column('checked_at', sa.DateTime(), nullable=False),
        sa.Column('query', sa.Text(), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('page1', sa.Integer(), nullable=False),
        sa.Column('page2', sa.Integer(), nullable=False),
        sa.Column('sampled', sa.Integer(), nullable=False),
        sa.Column('downloaded', sa.Integer(), nullable=False),
        sa.Column('decoded', sa.Integer(), nullable=False),
        sa.Column('problem', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_engine_checks')),
    )
    op.create_index('ix_engine_checks_engine', 'engine_checks', ['engine'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_engine_checks_engine', table_name='engine_checks')
    op.drop_table('engine_checks')
