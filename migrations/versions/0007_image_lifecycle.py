"""image lifecycle: reviewed flag, open label conflicts, stable relabel digits, label history

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reviewed', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('conflict', sa.String(length=16), nullable=True))
        batch_op.create_index('ix_images_conflict', ['conflict'], unique=False)
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('old_conflict', sa.String(length=16), nullable=True))
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('digit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(), nullable=True))
    op.create_table(
        'label_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('action', sa.String(length=16), nullable=False),
        sa.Column('old_name', sa.String(length=200), nullable=True),
        sa.Column('new_name', sa.String(length=200), nullable=True),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.Column('reviewer', sa.String(length=100), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_label_events')),
    )
    # Existing catalogs: an image with a standing (not undone) review decision is reviewed; an image whose
    # sources claim several labels, or a member of a duplicate group spanning labels, is an open conflict
    # unless a reviewer decided it; the first nine labels by creation get the relabel digits 1-9.
    op.execute(
        "UPDATE images SET reviewed = " + _true() + " WHERE id IN (SELECT image_id FROM reviews "
        "WHERE action <> 'undo' AND id NOT IN (SELECT undoes_id FROM reviews WHERE undoes_id IS NOT NULL))")
    op.execute(
        "UPDATE images SET conflict = 'labels' WHERE reviewed = " + _false() + " AND id IN "
        "(SELECT image_id FROM sources GROUP BY image_id HAVING COUNT(DISTINCT label_id) > 1)")
    op.execute(
        "UPDATE images SET conflict = 'group' WHERE reviewed = " + _false() + " AND conflict IS NULL "
        "AND dup_group_id IN (SELECT id FROM duplicate_groups WHERE is_conflict = " + _true() + ")")
    connection = op.get_bind()
    ids = [row[0] for row in connection.execute(sa.text("SELECT id FROM labels ORDER BY id LIMIT 9"))]
    for digit, label_id in enumerate(ids, start=1):
        connection.execute(sa.text("UPDATE labels SET digit = :d WHERE id = :i"), {"d": digit, "i": label_id})


def _true() -> str:
    return "TRUE" if op.get_bind().dialect.name == "postgresql" else "1"


def _false() -> str:
    return "FALSE" if op.get_bind().dialect.name == "postgresql" else "0"


def downgrade() -> None:
    op.drop_table('label_events')
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
        batch_op.drop_column('digit')
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_column('old_conflict')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_conflict')
        batch_op.drop_column('conflict')
        batch_op.drop_column('reviewed')
