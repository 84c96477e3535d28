"""Crawl jobs as records: listing them, which ones `--resume` runs again, where each one runs."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import select
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


def list_jobs(session: Session, limit: int | None = None) -> list[dict]:
    names = dict(session.execute(select(Label.id, Label.name)).all())
    query = select(CrawlJob).order_by(CrawlJob.id.desc())
    if limit:
        query = query.limit(limit)
    rows = []
    for job in session.scalars(query):
        params = json.loads(job.params or "{}")
        status = job.status
        if status == "running" and not process_alive(params.get("host"), params.get("pid")):
            status = "interrupted"
        seconds = (job.finished_at - job.started_at).total_seconds() if job.finished_at else None
        engine_stats = json.loads(job.engine_stats or "{}")
        rows.append({"id": job.id, "query": job.query, "label": names.get(job.label_id), "engines": job.engines,
                     "worker": job.worker, "attempts": job.attempts,
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
        # Queued jobs are the workers' to retry (see fastclass/crawl/jobqueue.py), not --resume's.
        unfinished = job.worker is None and (
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
