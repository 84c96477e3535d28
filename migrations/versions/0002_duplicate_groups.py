"""duplicate groups from dedup

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:56:53.299172
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('duplicate_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hash_kind', sa.String(length=32), nullable=False),
    sa.Column('threshold', sa.Integer(), nullable=False),
    sa.Column('flip', sa.Boolean(), nullable=False),
    sa.Column('keeper_id', sa.Integer(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('label_count', sa.Integer(), nullable=False),
    sa.Column('is_conflict', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['keeper_id'], ['images.id'], name=op.f('fk_duplicate_groups_keeper_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_duplicate_groups'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dup_group_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_images_dup_group_id'), ['dup_group_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_images_dup_group_id_duplicate_groups'), 'duplicate_groups', ['dup_group_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_images_dup_group_id_duplicate_groups'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_images_dup_group_id'))
        batch_op.drop_column('dup_group_id')

    op.drop_table('duplicate_groups')
