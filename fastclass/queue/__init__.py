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

import json
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
    from fastclass.crawl.jobs import QUEUE_STATUS

    return [{"task": row["task_name"].removeprefix("fastclass."), "status": QUEUE_STATUS.get(row["status"],
                                                                                           row["status"]),
             "jobs": row["n"]} for row in rows]


def _describe(task: str, args: dict) -> str:
    if task == CRAWL_TASK:
        return f"crawl job {args.get('crawl_job_id')}"
    if task in (VERIFY_TASK, EMBED_TASK):
        return f"images {args.get('first_id')}-{args.get('last_id')}"
    if task == ENGINES_TASK:
        engines = args.get("engines")
        return ("engines " + ", ".join(engines) if engines else "every checkable engine") + (
            " (periodic)" if args.get("timestamp") else "")
    return json.dumps(args, sort_keys=True)[:80]


def list_queue(session: Session, limit: int | None = None, status: str | None = None) -> list[dict]:
    """Every queued job of every task, newest first: its state as `jobs` shows it, what it covers, and the
    last error of its latest failed run (PostgreSQL catalogs; empty on SQLite)."""
    from fastclass.crawl.jobs import queue_status

    if session.get_bind().dialect.name != "postgresql":
        return []
    rows = session.execute(text(
        "SELECT j.id, j.task_name, j.queue_name, j.status::text AS status, j.attempts, j.scheduled_at, "
        "j.worker_id, j.args, f.error, f.worker AS failed_on, f.failed_at FROM procrastinate_jobs j "
        "LEFT JOIN queue_failures f ON f.queue_job_id = j.id WHERE j.task_name LIKE 'fastclass.%' "
        "ORDER BY j.id DESC")).mappings().all()
    jobs = []
    for row in rows:
        shown, runs, next_try = queue_status(row)
        if status is not None and shown != status:
            continue
        args = row["args"] or {}
        failed = row["error"] is not None and shown in ("retrying", "failed")
        jobs.append({"id": row["id"], "task": row["task_name"].removeprefix("fastclass."), "queue": row["queue_name"],
                     "status": shown, "runs": runs, "next_try": next_try, "covers": _describe(row["task_name"], args),
                     "args": args, "last_error": row["error"] if failed else None,
                     "failed_on": row["failed_on"] if failed else None})
        if limit and len(jobs) >= limit:
            break
    return jobs
