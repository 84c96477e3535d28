"""Queued crawls: `crawl --queue` adds jobs to the catalog; `fastclass worker`s on any machine claim and run them.

The queue is the `crawl_jobs` table. A worker claims a job with one compare-and-set UPDATE (status queued,
or running with an expired lease -> running, its name, a lease), after `SELECT ... FOR UPDATE SKIP LOCKED`
on PostgreSQL so that workers do not queue up behind each other's locks; so no job runs twice at once, on
SQLite or PostgreSQL. While it runs, a thread renews the lease; a worker that dies stops renewing, and when
the lease runs out another worker claims the job again. The re-run fetches no URL the first run recorded
(the crawl's fetch log) and ingest is idempotent by sha256, so nothing is stored twice.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import CrawlJob, utcnow
from fastclass.catalog import Catalog
from fastclass.crawl.crawler import CrawlReport, check_options, run_crawl
from fastclass.crawl.jobs import job_params
from fastclass.crawl.options import CrawlOptions
from fastclass.labels import label_ids

log = logging.getLogger(__name__)

QUEUED, RUNNING, FAILED = "queued", "running", "failed"
DEFAULT_LEASE_SECONDS = 60.0
MAX_ATTEMPTS = 3


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def enqueue_crawl(session: Session, options: CrawlOptions) -> int:
    """Add a crawl job for a worker to run; checked now, so a bad job fails here, not on a worker."""
    check_options(options)
    label_id = label_ids(session, [options.label])[options.label]
    job = CrawlJob(query=options.query, label_id=label_id, engines=",".join(options.engines),
                   params=job_params(options), status=QUEUED, attempts=0)
    session.add(job)
    session.commit()
    return job.id


def _claimable(now: dt.datetime):
    expired = and_(CrawlJob.status == RUNNING, CrawlJob.lease_until.is_not(None), CrawlJob.lease_until < now)
    return or_(CrawlJob.status == QUEUED, expired)


def claim_job(session: Session, worker: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> CrawlJob | None:
    """Take the oldest claimable job for `worker`, or None. A job whose workers died MAX_ATTEMPTS times is
    marked failed instead of being tried again."""
    now = utcnow()
    candidates = (select(CrawlJob.id, CrawlJob.attempts).where(_claimable(now)).order_by(CrawlJob.id).limit(8))
    if session.get_bind().dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    for job_id, attempts in session.execute(candidates).all():
        if attempts >= MAX_ATTEMPTS:
            session.execute(update(CrawlJob).where(CrawlJob.id == job_id, _claimable(now)).values(
                status=FAILED, lease_until=None, finished_at=now,
                last_error=f"abandoned: its worker stopped during each of {attempts} attempts"))
            continue
        claimed = session.execute(update(CrawlJob).where(CrawlJob.id == job_id, _claimable(now)).values(
            status=RUNNING, worker=worker, lease_until=now + dt.timedelta(seconds=lease_seconds),
            attempts=CrawlJob.attempts + 1))
        if claimed.rowcount == 1:
            session.commit()
            return session.get(CrawlJob, job_id)
    session.commit()
    return None


def open_jobs(session: Session) -> int:
    """Jobs still to run or running (a running one may yet come back to the queue)."""
    return session.scalar(select(func.count()).select_from(CrawlJob).where(
        CrawlJob.status.in_([QUEUED, RUNNING]), CrawlJob.lease_until.is_not(None) | (CrawlJob.status == QUEUED)))


class LeaseKeeper:
    """Renews a claimed job's lease every third of its length, on its own connection, until stopped."""

    def __init__(self, catalog: Catalog, job_id: int, worker: str, lease_seconds: float) -> None:
        self.catalog, self.job_id, self.worker, self.lease = catalog, job_id, worker, lease_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _renew(self) -> None:
        while not self.stopped.wait(self.lease / 3):
            try:
                with self.catalog.engine.begin() as conn:
                    kept = conn.execute(update(CrawlJob).where(
                        CrawlJob.id == self.job_id, CrawlJob.worker == self.worker, CrawlJob.status == RUNNING,
                    ).values(lease_until=utcnow() + dt.timedelta(seconds=self.lease))).rowcount
                if not kept:
                    log.warning("crawl job %s is no longer held by %s", self.job_id, self.worker)
                    return
            except Exception:  # a database hiccup: try again at the next beat, the lease has room
                log.warning("could not renew the lease of crawl job %s", self.job_id, exc_info=True)


@dataclass
class WorkerResult:
    worker: str
    reports: list[CrawlReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"worker": self.worker, "jobs": [r.as_dict() for r in self.reports], "errors": self.errors}


def run_worker(catalog: Catalog, log_dir: Path, worker: str | None = None, concurrency: int = 1,
               lease_seconds: float = DEFAULT_LEASE_SECONDS, poll_seconds: float = 2.0, until_empty: bool = False,
               on_job: Callable[[CrawlReport], None] | None = None, allow_private: bool = False) -> WorkerResult:
    """Claim and run queued crawl jobs, `concurrency` at a time, until stopped (Ctrl-C) or, with
    until_empty, until no job is queued or running anywhere (a running one may come back to the queue).

    allow_private is the worker's own choice, never the job's: whoever queues a job cannot make a worker
    inside a company network fetch from private addresses."""
    result = WorkerResult(worker or default_worker_name())
    stop = threading.Event()
    lock = threading.Lock()

    def slot() -> None:
        while not stop.is_set():
            with catalog.session() as session:
                job = claim_job(session, result.worker, lease_seconds)
                remaining = open_jobs(session) if job is None else 1
            if job is None:
                if until_empty and remaining == 0:
                    return
                stop.wait(poll_seconds)
                continue
            report = _run_claimed(catalog, job, log_dir, result.worker, lease_seconds, allow_private)
            with lock:
                if isinstance(report, str):
                    result.errors.append(report)
                else:
                    result.reports.append(report)
                    if on_job is not None:
                        on_job(report)

    threads = [threading.Thread(target=slot, name=f"worker-slot-{n}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        stop.set()
        _release(catalog, result.worker)
        raise
    return result


def _run_claimed(catalog: Catalog, job: CrawlJob, log_dir: Path, worker: str,
                 lease_seconds: float, allow_private: bool) -> CrawlReport | str:
    options = CrawlOptions.from_json(job.params)
    with LeaseKeeper(catalog, job.id, worker, lease_seconds):
        try:
            with catalog.session() as session:
                return run_crawl(session, catalog.store, options, log_dir, job_id=job.id,
                                 allow_private=allow_private)
        except Exception as exc:  # one bad job must not stop the worker; the job row records why
            message = f"crawl job {job.id} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            log.warning(message)
            with catalog.session() as session:
                session.execute(update(CrawlJob).where(CrawlJob.id == job.id, CrawlJob.status == RUNNING).values(
                    status=FAILED, last_error=message, finished_at=utcnow()))
            return message
        finally:
            with catalog.session() as session:
                session.execute(update(CrawlJob).where(CrawlJob.id == job.id).values(lease_until=None))


def _release(catalog: Catalog, worker: str) -> None:
    """On Ctrl-C: put this worker's running jobs back in the queue at once (their work so far is kept)."""
    try:
        with catalog.session() as session:
            session.execute(update(CrawlJob).where(CrawlJob.worker == worker, CrawlJob.status == RUNNING).values(
                status=QUEUED, lease_until=None))
    except Exception:
        log.warning("could not put the jobs of %s back in the queue; they return when their lease runs out",
                    worker, exc_info=True)
