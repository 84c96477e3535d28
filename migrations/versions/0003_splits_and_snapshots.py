"""splits and snapshots

Snapshots are sealed by database triggers, so that no code path (ours, a script, a SQL shell) can change
one: once its digest is set, the row cannot be updated, and its items cannot be inserted, updated or
deleted, except by deleting the whole snapshot.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:34:42.322975
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

IMMUTABLE = "snapshots are immutable: create a new snapshot instead"

SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER snapshots_sealed BEFORE UPDATE ON snapshots WHEN OLD.digest IS NOT NULL
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
    f"""CREATE TRIGGER snapshot_items_no_update BEFORE UPDATE ON snapshot_items
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
    f"""CREATE TRIGGER snapshot_items_sealed_insert BEFORE INSERT ON snapshot_items
        WHEN (SELECT digest FROM snapshots WHERE id = NEW.snapshot_id) IS NOT NULL
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
    # While the snapshot row exists; deleting the snapshot itself cascades (the row is gone by then).
    f"""CREATE TRIGGER snapshot_items_sealed_delete BEFORE DELETE ON snapshot_items
        WHEN (SELECT digest FROM snapshots WHERE id = OLD.snapshot_id) IS NOT NULL
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
]

POSTGRES_TRIGGERS = [
    f"""CREATE FUNCTION fastclass_snapshot_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.digest IS NOT NULL THEN RAISE EXCEPTION '{IMMUTABLE}'; END IF;
            RETURN NEW;
        END $$""",
    """CREATE TRIGGER snapshots_sealed BEFORE UPDATE ON snapshots
        FOR EACH ROW EXECUTE FUNCTION fastclass_snapshot_sealed()""",
    f"""CREATE FUNCTION fastclass_snapshot_item_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE sid integer;
        BEGIN
            IF TG_OP = 'UPDATE' THEN RAISE EXCEPTION '{IMMUTABLE}'; END IF;
            IF TG_OP = 'INSERT' THEN sid := NEW.snapshot_id; ELSE sid := OLD.snapshot_id; END IF;
            IF EXISTS (SELECT 1 FROM snapshots WHERE id = sid AND digest IS NOT NULL) THEN
                RAISE EXCEPTION '{IMMUTABLE}';
            END IF;
            IF TG_OP = 'INSERT' THEN RETURN NEW; END IF;
            RETURN OLD;
        END $$""",
    """CREATE TRIGGER snapshot_items_sealed BEFORE INSERT OR UPDATE OR DELETE ON snapshot_items
        FOR EACH ROW EXECUTE FUNCTION fastclass_snapshot_item_sealed()""",
]


def upgrade() -> None:
    op.create_table('splits',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('valid_pct', sa.Float(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('min_valid', sa.Integer(), nullable=False),
    sa.Column('is_current', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_splits'))
    )
    op.create_table('snapshots',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('split_id', sa.Integer(), nullable=False),
    sa.Column('valid_pct', sa.Float(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('min_valid', sa.Integer(), nullable=False),
    sa.Column('label_filter', sa.Text(), nullable=True),
    sa.Column('min_per_label', sa.Integer(), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('digest', sa.String(length=64), nullable=True),
    sa.Column('image_count', sa.Integer(), nullable=False),
    sa.Column('train_count', sa.Integer(), nullable=False),
    sa.Column('valid_count', sa.Integer(), nullable=False),
    sa.Column('label_counts', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['split_id'], ['splits.id'], name=op.f('fk_snapshots_split_id_splits')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_snapshots')),
    sa.UniqueConstraint('name', name=op.f('uq_snapshots_name'))
    )
    op.create_table('snapshot_items',
    sa.Column('snapshot_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('is_valid', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_snapshot_items_image_id_images')),
    sa.ForeignKeyConstraint(['snapshot_id'], ['snapshots.id'], name=op.f('fk_snapshot_items_snapshot_id_snapshots'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('snapshot_id', 'image_id', name=op.f('pk_snapshot_items')),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('snapshot_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_snapshot_items_image_id'), ['image_id'], unique=False)
    for statement in (SQLITE_TRIGGERS if op.get_bind().dialect.name == "sqlite" else POSTGRES_TRIGGERS):
        op.execute(statement)

    op.create_table('split_assignments',
    sa.Column('split_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('is_valid', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_split_assignments_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['split_id'], ['splits.id'], name=op.f('fk_split_assignments_split_id_splits'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('split_id', 'image_id', name=op.f('pk_split_assignments')),
    sqlite_with_rowid=False
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("snapshots_sealed", "snapshot_items_no_update", "snapshot_items_sealed_insert",
                     "snapshot_items_sealed_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS snapshots_sealed ON snapshots")
        op.execute("DROP TRIGGER IF EXISTS snapshot_items_sealed ON snapshot_items")
        op.execute("DROP FUNCTION IF EXISTS fastclass_snapshot_sealed()")
        op.execute("DROP FUNCTION IF EXISTS fastclass_snapshot_item_sealed()")
    op.drop_table('split_assignments')
    with op.batch_alter_table('snapshot_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_snapshot_items_image_id'))

    op.drop_table('snapshot_items')
    op.drop_table('snapshots')
    op.drop_table('splits')
