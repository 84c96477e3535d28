"""procrastinate queue: queued work moves from our crawl_jobs lease columns to procrastinate (PostgreSQL)

On PostgreSQL this applies procrastinate's schema (the version pinned in setup.cfg) and carries every crawl
job still queued, or held by a worker's lease, over to a procrastinate job. SQLite catalogs have no queue
any more (one machine runs everything in-process): such jobs become `interrupted`, which `crawl --resume`
runs. Either way the outcome is reported through the alembic config's "notes" (`fastclass init` prints them).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 01:30:00
"""
import json

from alembic import op
import sqlalchemy as sa

from fastclass.errors import FastclassError


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

CRAWL_TASK, CRAWL_QUEUE = "fastclass.crawl", "crawl"
STILL_QUEUED = "status = 'queued' OR (status = 'running' AND lease_until IS NOT NULL)"


def _note(text: str) -> None:
    op.get_context().config.attributes.setdefault("notes", []).append(text)


def _apply_procrastinate_schema(conn) -> None:
    try:
        from procrastinate.schema import SchemaManager
    except ImportError as exc:
        raise FastclassError("a PostgreSQL catalog needs procrastinate for its job queue: "
                           "pip install 'fastclass[postgres]'") from exc
    if sa.inspect(conn).has_table("procrastinate_jobs"):
        return  # a database that already hosts procrastinate (its own migrations keep it current)
    # Executed without parameters, so psycopg sends the script as it is (its '%' and '::' included).
    conn.connection.driver_connection.execute(SchemaManager.get_schema())


def upgrade() -> None:
    conn = op.get_bind()
    waiting = conn.execute(sa.text(f"SELECT id FROM crawl_jobs WHERE {STILL_QUEUED} ORDER BY id")).scalars().all()
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_job_id', sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f('ix_crawl_jobs_queue_job_id'), ['queue_job_id'], unique=False)
    if conn.dialect.name == "postgresql":
        _apply_procrastinate_schema(conn)
        for job_id in waiting:
            queue_job = conn.execute(sa.text(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
                "VALUES (:queue, :task, CAST(:args AS jsonb)) RETURNING id"),
                {"queue": CRAWL_QUEUE, "task": CRAWL_TASK, "args": json.dumps({"crawl_job_id": job_id})}).scalar()
            conn.execute(sa.text("UPDATE crawl_jobs SET status = 'queued', queue_job_id = :q WHERE id = :id"),
                         {"q": queue_job, "id": job_id})
        if waiting:
            _note(f"{len(waiting)} queued crawl job(s) carried over to the procrastinate queue "
                  "(`fastclass worker` runs them)")
    elif waiting:
        conn.execute(sa.text(
            f"UPDATE crawl_jobs SET status = 'interrupted', last_error = :why WHERE {STILL_QUEUED}"),
            {"why": "was queued for a worker; queues need a PostgreSQL catalog now: run `fastclass crawl --resume`"})
        _note(f"{len(waiting)} queued crawl job(s) marked interrupted: queues need a PostgreSQL catalog now; "
              "`fastclass crawl --resume` runs them here")
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('attempts')


def downgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table('crawl_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(), nullable=True))
        batch_op.drop_index(batch_op.f('ix_crawl_jobs_queue_job_id'))
        batch_op.drop_column('queue_job_id')
    if conn.dialect.name == "postgresql":
        # Jobs still in procrastinate's queue go back to ours (queued, no lease) before its schema goes.
        conn.execute(sa.text(
            "UPDATE crawl_jobs SET status = 'queued', worker = NULL WHERE id IN (SELECT (args->>'crawl_job_id')::int "
            "FROM procrastinate_jobs WHERE task_name = :task AND status IN ('todo', 'doing'))"), {"task": CRAWL_TASK})
        conn.execute(sa.text("DROP TABLE IF EXISTS procrastinate_events, procrastinate_periodic_defers, "
                             "procrastinate_jobs, procrastinate_workers CASCADE"))
        functions = conn.execute(sa.text("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON "
                                         "n.oid = p.pronamespace WHERE n.nspname = current_schema() AND "
                                         "p.proname LIKE 'procrastinate\\_%'")).scalars().all()
        for function in functions:
            conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {function} CASCADE"))
        conn.execute(sa.text("DROP TYPE IF EXISTS procrastinate_job_to_defer_v1, procrastinate_job_event_type, "
                             "procrastinate_job_status CASCADE"))
