"""fold losses: out-of-fold predictions and losses of a run's snapshot (`train --folds K`)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 22:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fold_losses',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('fold', sa.Integer(), nullable=False),
        sa.Column('label', sa.String(length=200), nullable=False),
        sa.Column('predicted', sa.String(length=200), nullable=False),
        sa.Column('probability', sa.Float(), nullable=False),
        sa.Column('loss', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_fold_losses_image_id_images'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_fold_losses_run_id_runs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'image_id', name=op.f('pk_fold_losses')),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table('fold_losses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fold_losses_image_id'), ['image_id'], unique=False)
        batch_op.create_index('ix_fold_losses_run_id_loss', ['run_id', 'loss'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fold_losses', schema=None) as batch_op:
        batch_op.drop_index('ix_fold_losses_run_id_loss')
        batch_op.drop_index(batch_op.f('ix_fold_losses_image_id'))
    op.drop_table('fold_losses')
