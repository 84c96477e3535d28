"""embeddings and audits: pooled backbone features per image and model, and the audits made from them

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 19:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'embedding_models',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('arch', sa.String(length=100), nullable=False),
        sa.Column('weights', sa.String(length=200), nullable=False),
        sa.Column('weights_loaded', sa.Text(), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('dim', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_embedding_models')),
        sa.UniqueConstraint('arch', 'weights', 'size', name=op.f('uq_embedding_models_arch_weights_size')),
    )
    op.create_table(
        'embeddings',
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('vector', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['embedding_models.id'], ondelete='CASCADE',
                                name=op.f('fk_embeddings_model_id_embedding_models')),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE',
                                name=op.f('fk_embeddings_image_id_images')),
        sa.PrimaryKeyConstraint('model_id', 'image_id', name=op.f('pk_embeddings')),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_embeddings_image_id', 'embeddings', ['image_id'], unique=False)
    op.create_table(
        'audits',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('folds', sa.Integer(), nullable=False),
        sa.Column('seed', sa.BigInteger(), nullable=False),
        sa.Column('params', sa.Text(), nullable=False),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('label_issues', sa.Integer(), nullable=False),
        sa.Column('outliers', sa.Integer(), nullable=False),
        sa.Column('near_copies', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['embedding_models.id'], name=op.f('fk_audits_model_id_embedding_models')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audits')),
    )
    op.create_index('ix_audits_model_id', 'audits', ['model_id'], unique=False)
    op.create_table(
        'audit_scores',
        sa.Column('audit_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('label', sa.String(length=200), nullable=False),
        sa.Column('suggested', sa.String(length=200), nullable=False),
        sa.Column('label_quality', sa.Float(), nullable=False),
        sa.Column('label_issue', sa.Boolean(), nullable=False),
        sa.Column('outlier_score', sa.Float(), nullable=False),
        sa.Column('outlier', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_scores_audit_id_audits')),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_scores_image_id_images')),
        sa.PrimaryKeyConstraint('audit_id', 'image_id', name=op.f('pk_audit_scores')),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_audit_scores_image_id', 'audit_scores', ['image_id'], unique=False)
    op.create_table(
        'audit_pairs',
        sa.Column('audit_id', sa.Integer(), nullable=False),
        sa.Column('image_a', sa.Integer(), nullable=False),
        sa.Column('image_b', sa.Integer(), nullable=False),
        sa.Column('similarity', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_pairs_audit_id_audits')),
        sa.ForeignKeyConstraint(['image_a'], ['images.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_pairs_image_a_images')),
        sa.ForeignKeyConstraint(['image_b'], ['images.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_pairs_image_b_images')),
        sa.PrimaryKeyConstraint('audit_id', 'image_a', 'image_b', name=op.f('pk_audit_pairs')),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table('audit_pairs')
    op.drop_index('ix_audit_scores_image_id', table_name='audit_scores')
    op.drop_table('audit_scores')
    op.drop_index('ix_audits_model_id', table_name='audits')
    op.drop_table('audits')
    op.drop_index('ix_embeddings_image_id', table_name='embeddings')
    op.drop_table('embeddings')
    op.drop_table('embedding_models')
