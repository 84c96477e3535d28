"""Queued work on PostgreSQL catalogs: procrastinate carries it from `--queue` to `fastclass worker`s.

procrastinate keeps its jobs in the catalog's own database (its schema is applied by migration 0012), so a
team needs nothing it does not already run. What can be queued, and on which procrastinate queue:

    crawl     one job per class (`crawl --queue`, `crawl --from FILE.csv --queue`); its record is a crawl_jobs row
    verify    chunks of image ids to decode-check (`verify --queue`)
    embed     chunks of image ids to embed (`embed --queue`; GPU machines run `worker --queues embed`)
    engines   the engines' canary check (`engines check --queue`, or `worker --check-engines CRON`)

Every task may run more than once and does nothing twice: a crawl's re-run fetches no URL an earlier run
recorded and stores images by sha256; verify and embed take only the images of their chunk still without a
verdict or a vector. That is what procrastinate's delivery needs: a worker killed mid-job stops sending its
heartbeat, and once it is stale another worker puts the job back in the queue (`_recover_stalled`). A job
that keeps failing is retried with a doubling wait until the worker's retry budget is spent, then `failed`.

SQLite catalogs have no queue: one machine runs every command in-process, and `--queue` says so.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.orm import Session

from fastclass.errors import FastclassError

if TYPE_CHECKING:
    from fastclass.catalog import Catalog

QUEUES = ("crawl", "verify", "embed", "engines")
CRAWL_TASK, VERIFY_TASK, EMBED_TASK, ENGINES_TASK = (
    "fastclass.crawl", "fastclass.verify", "fastclass.embed", "fastclass.engines_check")


def needs_postgres(catalog: "Catalog", for_worker: bool = False) -> None:
    """Refuse queueing (or a worker) on a SQLite catalog, with what to do instead."""
    if catalog.engine.dialect.name == "postgresql":
        return
    instead = ("nothing is queued there, every command runs in-process" if for_worker
               else "run the command without --queue (it runs here)")
    raise FastclassError(f"queues need a PostgreSQL catalog and {catalog.display} is SQLite: {instead}, or move "
                         "the catalog to PostgreSQL (docs/scaling.md)")


def conninfo(catalog: "Catalog") -> str:
    """The catalog's SQLAlchemy URL as the libpq URI procrastinate's psycopg pool takes."""
    return catalog.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def other_work(session: Session) -> list[dict]:
    """Queued work besides crawls: per task and status, how many jobs (PostgreSQL catalogs)."""
    if session.get_bind().dialect.name != "postgresql":
        return []
    rows = session.execute(text(
        "SELECT task_name, status::text AS status, count(*) AS n FROM procrastinate_jobs "
        "WHERE task_name != :crawl GROUP BY task_name, status ORDER BY task_name, status"),
        {"crawl": CRAWL_TASK}).mappings().all()
    return [{"task": row["task_name"].removeprefix("fastclass."), "status": row["status"], "jobs": row["n"]}
            for row in rows]
