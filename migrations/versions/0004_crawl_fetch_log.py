"""crawl fetch log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 13:00:42.115413
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fetched_urls',
    sa.Column('url_hash', sa.String(length=64), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('crawl_job_id', sa.Integer(), nullable=True),
    sa.Column('fetched_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['crawl_job_id'], ['crawl_jobs.id'], name=op.f('fk_fetched_urls_crawl_job_id_crawl_jobs')),
    sa.PrimaryKeyConstraint('url_hash', name=op.f('pk_fetched_urls'))
    )
    with op.batch_alter_table('fetched_urls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fetched_urls_crawl_job_id'), ['crawl_job_id'], unique=False)

    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('engine_stats', sa.Text(), server_default='{}', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.drop_column('engine_stats')

    with op.batch_alter_table('fetched_urls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fetched_urls_crawl_job_id'))

    op.drop_table('fetched_urls')
