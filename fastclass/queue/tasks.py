"""procrastinate's side of fastclass: the tasks workers run, their retry policy, and queueing them."""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy.orm import Session

from db.models import CrawlJob, QueueFailure, utcnow
from fastclass.errors import FastclassError, NotFoundError, StopRequested, first_line
from fastclass.queue import CRAWL_TASK, EMBED_TASK, ENGINES_TASK, VERIFY_TASK, conninfo, needs_postgres

if TYPE_CHECKING:
    from procrastinate import App

    from fastclass.catalog import Catalog
    from fastclass.crawl.options import CrawlOptions

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What a worker's tasks share: the catalog, this worker's choices, and what it has run."""

    catalog: "Catalog"
    name: str
    allow_private: bool = False
    on_job: Callable[[str], None] | None = None
    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def log_dir(self) -> Path:
        return self.catalog.work_dir / "logs"

    def done(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)
        if self.on_job is not None:
            self.on_job(line)


def _state(context) -> WorkerState:
    return context.additional_context["fastclass"]


def _stop_check(context) -> Callable[..., None]:
    """A progress callback that stops the job when the worker shuts down (procrastinate's abort request)."""

    def check(*_: Any) -> None:
        if context.should_abort():
            raise StopRequested("the worker is shutting down")

    return check


def _job(task: Callable[..., dict]) -> Callable[..., dict]:
    """A task's body as procrastinate runs it: a stop the worker asked for becomes JobAborted (the job is
    released), and any failure is recorded with its error (`jobs queue`) before procrastinate retries it."""

    @functools.wraps(task)
    def run(context, **arguments: Any) -> dict:
        try:
            return task(context, **arguments)
        except StopRequested as exc:
            from procrastinate.exceptions import JobAborted

            raise JobAborted(str(exc)) from exc
        except Exception as exc:
            _record_failure(context, exc)
            raise

    return run


def _record_failure(context, exc: Exception) -> None:
    state = _state(context)
    error = f"{type(exc).__name__}: {first_line(exc)}"[:2000]
    try:
        with state.catalog.session() as session:
            session.merge(QueueFailure(queue_job_id=context.job.id, task=context.job.task_name, worker=state.name,
                                       error=error, failed_at=utcnow()))
    except Exception:  # the catalog itself failing: the worker's log line still says why
        log.warning("could not record the failure of job %s", context.job.id, exc_info=True)


@_job
def crawl_task(context, crawl_job_id: int) -> dict:
    """Run (or go on with) one queued crawl job; a crawl no engine could deliver for fails, to be retried."""
    from fastclass.crawl.crawler import run_crawl
    from fastclass.crawl.options import CrawlOptions

    state = _state(context)
    catalog = state.catalog
    with catalog.session() as session:
        job = session.get(CrawlJob, crawl_job_id)
        if job is None:
            raise NotFoundError(f"crawl job {crawl_job_id} is not in the catalog")
        if job.status == "done":  # finished before its worker could report it: nothing to do twice
            return {"crawl_job": crawl_job_id, "status": "done"}
        options = CrawlOptions.from_json(job.params)
        job.status, job.worker, job.started_at, job.finished_at = "running", state.name, utcnow(), None
        session.commit()
        report = run_crawl(session, catalog.store, options, state.log_dir, _stop_check(context), job_id=crawl_job_id,
                           allow_private=state.allow_private)
    line = (f"Crawl job {report.job_id} {report.status}: {report.label}: {report.new_images} new, "
            f"{report.exact_duplicates} already known, {sum(report.rejected.values())} rejected, "
            f"{sum(report.failed.values())} failed; {report.seconds:.1f} s")
    state.done(line)
    if report.status == "failed":
        raise FastclassError(report.problems[-1] if report.problems else "no engine could deliver")
    return {"crawl_job": crawl_job_id, "status": report.status, "new": report.new_images}


@_job
def verify_task(context, first_id: int, last_id: int, rules: dict, recheck: bool = False,
                file_timeout: float = 30.0, file_memory: int = 2048) -> dict:
    """Verify the images of one id chunk that still need it (each verdict compare-and-set, as in-process)."""
    from fastclass.curate.verify import VerifyRules, verify_images
    from fastclass.workers import Budget

    state = _state(context)
    with state.catalog.session() as session:
        result = verify_images(session, state.catalog.store, VerifyRules(**rules), recheck=recheck,
                               id_range=(first_id, last_id), progress=_stop_check(context),
                               budget=Budget(file_timeout, file_memory))
    state.done(f"Verify {first_id}-{last_id}: {result.checked} checked, {result.ok} ok, "
               f"{sum(result.rejected.values())} rejected")
    return {"checked": result.checked, "ok": result.ok}


@_job
def embed_task(context, first_id: int, last_id: int, arch: str, weights: str, size: int, bs: int,
               device: str = "auto", label: str | None = None) -> dict:
    """Embed the ok images of one id chunk that have no vector under this model yet."""
    from trainer.embed import embed_images

    state = _state(context)
    with state.catalog.session() as session:
        result = embed_images(session, state.catalog.store, arch, weights, size, bs, device, label,
                              progress=_stop_check(context), id_range=(first_id, last_id))
    state.done(f"Embed {first_id}-{last_id}: {result.computed} computed, {result.already} already had one, "
               f"{len(result.failed)} failed ({result.arch}, {result.device})")
    if result.failed:
        log.warning("embed %s-%s: %d image(s) failed, e.g. image %s: %s", first_id, last_id, len(result.failed),
                    result.failed[0]["image"], result.failed[0]["reason"])
    return {"computed": result.computed}


@_job
def engines_task(context, timestamp: int | None = None, engines: list[str] | None = None, query: str | None = None,
                 engine_urls: dict | None = None, timeout: float = 10.0) -> dict:
    """The engines' canary check (`engines check`), recorded; run on demand or by the periodic schedule."""
    from fastclass.crawl import CANARY_QUERY
    from fastclass.crawl.health import check_engines, checkable_engines
    from fastclass.crawl.options import CrawlOptions

    state = _state(context)
    chosen = list(engines or checkable_engines())
    options = CrawlOptions(query=query or CANARY_QUERY, label="canary", engines=chosen,
                           engine_urls=dict(engine_urls or {}), timeout=timeout)
    with state.catalog.session() as session:
        results = check_engines(session, chosen, options, state.log_dir, state.allow_private)
    verdicts = {r.engine: r.verdict for r in results}
    state.done("Engines checked: " + ", ".join(f"{name} {verdict}" for name, verdict in verdicts.items()))
    return verdicts


class RetryPolicy:
    """A failed job runs again after `wait` seconds, doubling each time, `retries` times at most; a job
    released by a worker shutting down goes back to the queue at once; a job whose record is gone never.
    (procrastinate's RetryStrategy counts a release as a failure and cannot tell the missing record.)"""

    def __init__(self, retries: int, wait: float) -> None:
        self.retries, self.wait = retries, wait

    def get_retry_decision(self, *, exception: BaseException, job):
        from procrastinate.exceptions import JobAborted
        from procrastinate.retry import RetryDecision

        if isinstance(exception, JobAborted):
            return RetryDecision(retry_in={"seconds": 0})
        if isinstance(exception, NotFoundError) or job.attempts >= self.retries:
            return None
        return RetryDecision(retry_in={"seconds": self.wait * 2 ** job.attempts})


def make_app(catalog: "Catalog", retries: int = 3, retry_wait: float = 30.0, pool_size: int = 4) -> "App":
    """A procrastinate App on the catalog's database with fastclass's tasks."""
    from procrastinate import App, PsycopgConnector
    from procrastinate.retry import BaseRetryStrategy

    needs_postgres(catalog)
    policy = type("FastclassRetry", (RetryPolicy, BaseRetryStrategy), {})(retries, retry_wait)
    app = App(connector=PsycopgConnector(conninfo=conninfo(catalog), min_size=1, max_size=pool_size))
    for name, queue, func in ((CRAWL_TASK, "crawl", crawl_task), (VERIFY_TASK, "verify", verify_task),
                              (EMBED_TASK, "embed", embed_task), (ENGINES_TASK, "engines", engines_task)):
        app.task(name=name, queue=queue, pass_context=True, retry=policy)(func)
    return app


# -- queueing -------------------------------------------------------------------------------------


def _driver_connection(session: Session):
    """The psycopg connection under the session's transaction: jobs deferred on it commit with our rows."""
    return session.connection().connection.driver_connection


def _deferrer(catalog: "Catalog", session: Session, task: str):
    """procrastinate's deferrer of `task`, deferring in the session's transaction."""
    return make_app(catalog).configure_task(task, connection=_driver_connection(session))


def enqueue_crawls(catalog: "Catalog", session: Session, runs: list["CrawlOptions"]) -> list[int]:
    """Record a crawl job per class and queue it, all in one transaction (all queued, or none); every
    job is checked first, so a bad one fails here, not on a worker. Returns the crawl job ids."""
    from fastclass.crawl.crawler import check_options
    from fastclass.crawl.jobs import job_params
    from fastclass.labels import label_ids

    needs_postgres(catalog)
    for options in runs:
        check_options(options)
    ids = label_ids(session, sorted({o.label for o in runs}))
    jobs = [CrawlJob(query=o.query, label_id=ids[o.label], engines=",".join(o.engines), params=job_params(o),
                     status="queued") for o in runs]
    session.add_all(jobs)
    session.flush()
    queue_ids = _deferrer(catalog, session, CRAWL_TASK).batch_defer(*({"crawl_job_id": job.id} for job in jobs))
    for job, queue_id in zip(jobs, queue_ids):
        job.queue_job_id = queue_id
    session.commit()
    return [job.id for job in jobs]


def cancel_crawl(catalog: "Catalog", session: Session, crawl_job_id: int) -> str:
    """Cancel a queued crawl job ("cancelled"), or ask the worker running it to stop it ("stopping": it
    ends `aborted`, its work so far kept, and is not retried)."""
    needs_postgres(catalog)
    job = session.get(CrawlJob, crawl_job_id)
    if job is None:
        raise NotFoundError(f"no crawl job {crawl_job_id} (see `fastclass jobs`)")
    if job.queue_job_id is None:
        raise FastclassError(f"crawl job {crawl_job_id} was not queued: stop an in-process crawl with Ctrl-C")
    connection = _driver_connection(session)
    app = make_app(catalog)
    cancelled = app.job_manager.cancel_job_by_id(job.queue_job_id, abort=True, connection=connection)
    state = app.job_manager.get_job_status(job.queue_job_id, connection=connection).value
    if not cancelled:
        raise FastclassError(f"crawl job {crawl_job_id} has ended ({state}); there is nothing to cancel")
    outcome = "stopping" if state == "doing" else "cancelled"
    if outcome == "cancelled":
        job.status, job.finished_at = "cancelled", utcnow()
    session.commit()
    return outcome


def id_chunks(ids: list[int], size: int) -> list[tuple[int, int]]:
    """Sorted ids in (first, last) ranges of `size` ids each."""
    ids = sorted(ids)
    return [(ids[i], ids[min(i + size, len(ids)) - 1]) for i in range(0, len(ids), size)]


def enqueue_chunks(catalog: "Catalog", session: Session, task: str, ids: list[int], chunk: int,
                   **arguments: Any) -> list[tuple[int, int]]:
    """Queue `task` over `ids` in chunks of `chunk` ids (one transaction); returns the chunks."""
    needs_postgres(catalog)
    chunks = id_chunks(ids, chunk)
    if chunks:
        _deferrer(catalog, session, task).batch_defer(
            *({"first_id": first, "last_id": last, **arguments} for first, last in chunks))
        session.commit()
    return chunks


def enqueue_engines_check(catalog: "Catalog", session: Session, **arguments: Any) -> int:
    job_id = _deferrer(catalog, session, ENGINES_TASK).defer(**arguments)
    session.commit()
    return job_id


def pending_verify_ids(session: Session, recheck: bool, label: str | None) -> list[int]:
    """The images a queued verify splits into chunks: those an in-process verify would check now."""
    from db.models import Image
    from fastclass.curate.verify import to_verify

    return list(session.scalars(to_verify(session, (Image.id,), recheck, label)))


def embed_ids(session: Session, label: str | None) -> list[int]:
    """The ok images (of `label`) a queued embed splits into chunks; each chunk skips those already done."""
    from db.models import Image
    from trainer.embed import to_embed

    return list(session.scalars(to_embed(session, (Image.id,), label)))
