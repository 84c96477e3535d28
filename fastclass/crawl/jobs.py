"""Crawl jobs as records: listing them, which ones `--resume` runs again, where each one runs."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from db.models import CrawlJob, Label
from fastclass.crawl.options import CrawlOptions, label_from_query, read_class_csv
from fastclass.labels import normalize_label
from fastclass.store import process_alive


def job_params(options: CrawlOptions, resumed_from: int | None = None) -> str:
    """A job's params: its options, plus where it runs (so a dead job can be told from a running one)."""
    params = json.loads(options.to_json())
    params.update({"host": socket.gethostname(), "pid": os.getpid(), "resumed_from": resumed_from})
    return json.dumps(params, sort_keys=True)


def queue_states(session: Session, queue_job_ids: list[int | None]) -> dict[int, dict]:
    """procrastinate's view of queued crawl jobs (status, attempts, next run), on PostgreSQL catalogs."""
    ids = [i for i in queue_job_ids if i is not None]
    if not ids or session.get_bind().dialect.name != "postgresql":
        return {}
    rows = session.execute(text(
        "SELECT id, status::text AS status, attempts, scheduled_at, worker_id FROM procrastinate_jobs "
        "WHERE id IN :ids").bindparams(bindparam("ids", expanding=True)), {"ids": ids}).mappings().all()
    return {row["id"]: dict(row) for row in rows}


QUEUE_STATUS = {"todo": "queued", "doing": "running", "succeeded": "done", "failed": "failed",
                "cancelled": "cancelled", "aborted": "aborted"}


def queue_status(queued: dict) -> tuple[str, int, object]:
    """A queued job's status, runs and next try from procrastinate's row (status, attempts, worker_id,
    scheduled_at): `retrying` while it waits for another try after a failure, `stalled` while its worker
    has stopped sending heartbeats."""
    status, attempts = queued["status"], queued["attempts"]
    runs = attempts + 1 if status == "doing" else attempts  # procrastinate counts a run when it ends
    shown = QUEUE_STATUS.get(status, status)
    if status == "todo" and attempts:
        shown = "retrying"
    elif status == "doing" and queued["worker_id"] is None:
        shown = "stalled"
    return shown, runs, queued["scheduled_at"] if status == "todo" else None


def list_jobs(session: Session, limit: int | None = None) -> list[dict]:
    """Crawl jobs, newest first; a queued one's status, runs and next try come from the queue."""
    names = dict(session.execute(select(Label.id, Label.name)).all())
    query = select(CrawlJob).order_by(CrawlJob.id.desc())
    if limit:
        query = query.limit(limit)
    jobs = list(session.scalars(query))
    queued = queue_states(session, [job.queue_job_id for job in jobs])
    rows = []
    for job in jobs:
        params = json.loads(job.params or "{}")
        state = queued.get(job.queue_job_id)
        status, runs, next_try = queue_status(state) if state else (job.status, 0, None)
        if job.queue_job_id is None and status == "running" and not process_alive(params.get("host"),
                                                                                  params.get("pid")):
            status = "interrupted"
        seconds = (job.finished_at - job.started_at).total_seconds() if job.finished_at else None
        engine_stats = json.loads(job.engine_stats or "{}")
        rows.append({"id": job.id, "query": job.query, "label": names.get(job.label_id), "engines": job.engines,
                     "queue_job": job.queue_job_id, "worker": job.worker, "runs": runs, "next_try": next_try,
                     "status": status, "found": job.found, "downloaded": job.downloaded, "new": job.new_images,
                     "exact_duplicates": job.exact_duplicates,
                     "near_duplicates": sum(e.get("near_duplicates", 0) for e in engine_stats.values()),
                     "rejected": job.rejected,
                     "reasons": json.loads(job.reject_reasons or "{}"),
                     "engine_stats": engine_stats, "max": params.get("max_new"),
                     "started_at": job.started_at, "finished_at": job.finished_at, "seconds": seconds,
                     "last_error": job.last_error})
    return rows


def jobs_to_resume(session: Session) -> list[tuple[int, CrawlOptions]]:
    """The latest run of each class whose last run did not finish, with the options it ran with."""
    latest: dict[tuple[str, int], CrawlJob] = {}
    for job in session.scalars(select(CrawlJob).order_by(CrawlJob.id)):
        latest[(job.query, job.label_id)] = job
    todo = []
    for job in latest.values():
        params = json.loads(job.params or "{}")
        # Queued jobs are procrastinate's to retry (see fastclass/queue.py), not --resume's.
        unfinished = job.queue_job_id is None and (
            job.status == "interrupted" or (job.status == "running" and not process_alive(params.get("host"),
                                                                                     params.get("pid"))))
        if unfinished:
            todo.append((job.id, CrawlOptions.from_json(job.params)))
    return todo


@dataclass
class CrawlPlan:
    runs: list[tuple[int | None, CrawlOptions]]
    """(the job a run resumes, or None; its options), in order."""
    bad_rows: list[str] = field(default_factory=list)
    """One message per bad row of a --from CSV (the good rows are planned)."""


def plan_crawls(session: Session, template: CrawlOptions, query: str | None, label: str | None,
                from_csv: Path | None, resume: bool) -> CrawlPlan:
    """The crawls one `crawl` command runs: every unfinished class (resume), a class per CSV row, or the
    one class of QUERY / --label, each with the template's options."""
    if resume:
        return CrawlPlan(jobs_to_resume(session))
    if from_csv is not None:
        rows, bad_rows = read_class_csv(from_csv)
        return CrawlPlan([(None, replace(template, query=row.query, label=row.label)) for row in rows], bad_rows)
    text = query or ""
    name = normalize_label(label) if label else label_from_query(text)
    return CrawlPlan([(None, replace(template, query=text, label=name))])
