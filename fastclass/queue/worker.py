"""`fastclass worker`: a procrastinate worker with the catalog and store, stalled jobs queued again, and
--until-empty."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from fastclass.errors import FastclassError, first_line
from fastclass.queue import ENGINES_TASK, QUEUES, needs_postgres
from fastclass.queue.tasks import WorkerState, make_app

if TYPE_CHECKING:
    from procrastinate import App

    from fastclass.catalog import Catalog

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
"""How often every worker tells it is alive: the same for all, so that no worker's --stalled-after (3 s at
least) can take a live worker for a dead one."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerOptions:
    name: str | None = None
    queues: list[str] | None = None
    """None: every queue."""
    concurrency: int = 1
    until_empty: bool = False
    allow_private: bool = False
    stalled_after: float = 30.0
    """Seconds without a heartbeat after which a worker counts as dead and its jobs are queued again."""
    retries: int = 3
    retry_wait: float = 30.0
    check_engines: str | None = None
    """A cron schedule for the periodic engines check (None: none from this worker)."""
    check_only: list[str] = field(default_factory=list)
    """The engines the periodic check covers (empty: every checkable one)."""
    engine_urls: dict[str, str] = field(default_factory=dict)
    poll: float = 2.0


@dataclass
class WorkerResult:
    name: str
    lines: list[str]
    stopped_by_signal: bool

    def as_dict(self) -> dict:
        return {"worker": self.name, "jobs": self.lines, "stopped_by_signal": self.stopped_by_signal}


OUTSTANDING = ("SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
               "AND (%(queues)s::varchar[] IS NULL OR queue_name = ANY(%(queues)s))")


async def _outstanding(app: "App", queues: list[str] | None) -> int:
    row = await app.connector.execute_query_one_async(query=OUTSTANDING, queues=queues)
    return int(row["n"])


async def _recover_stalled(app: "App", stalled_after: float) -> None:
    """Queue again the jobs of workers whose heartbeat is older than stalled_after (killed, frozen, cut off)."""
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after):
        try:
            await app.job_manager.retry_job(job)
            log.warning("job %s (%s) of a worker that stopped sending heartbeats is queued again", job.id,
                        job.task_name)
        except Exception:  # another worker queued it again first
            log.debug("stalled job %s was already taken care of", job.id, exc_info=True)


class _OneLine(logging.Filter):
    """procrastinate logs a job's final failure with its traceback; without -v the user gets one line: the
    job, and the exception's type and first line (the crawl job's own line and `jobs` say the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not logging.getLogger("fastclass").isEnabledFor(logging.DEBUG):
            exc = record.exc_info[1]
            first = first_line(exc)[:300]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {first}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def run_worker(catalog: "Catalog", options: WorkerOptions, on_job: Callable[[str], None] | None = None
               ) -> WorkerResult:
    """Run queued jobs until Ctrl-C / SIGTERM (a running job is released to the queue, its work so far
    kept), or with until_empty until no job of these queues is queued, waiting to retry or running anywhere."""
    needs_postgres(catalog, for_worker=True)
    unknown = sorted(set(options.queues or []) - set(QUEUES))
    if unknown:
        raise FastclassError(f"no queue named {', '.join(unknown)}; the queues are {', '.join(QUEUES)}")
    state = WorkerState(catalog, options.name or default_worker_name(), options.allow_private, on_job)
    one_line = _OneLine()
    logging.getLogger("procrastinate.worker").addFilter(one_line)
    app = make_app(catalog, options.retries, options.retry_wait, pool_size=options.concurrency + 3)
    if options.check_engines:
        _schedule_engines_check(app, options)
    stop_reason: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Sync tasks run in the loop's default executor: one thread per job this worker may run at once.
        loop.set_default_executor(cf.ThreadPoolExecutor(options.concurrency + 1, thread_name_prefix="fastclass-job"))
        async with app.open_async():
            worker = asyncio.create_task(app.run_worker_async(
                queues=options.queues, name=state.name, concurrency=options.concurrency, wait=True,
                additional_context={"fastclass": state}, shutdown_graceful_timeout=0,
                update_heartbeat_interval=HEARTBEAT_SECONDS,
                stalled_worker_timeout=options.stalled_after, fetch_job_polling_interval=options.poll,
                abort_job_polling_interval=options.poll))
            keeper = asyncio.create_task(_keep(app, worker))
            try:
                await worker
            except asyncio.CancelledError:
                if not stop_reason:
                    raise
            finally:
                keeper.cancel()

    async def _keep(app: "App", worker: asyncio.Task) -> None:
        """Beside the worker: requeue stalled workers' jobs; with until_empty, stop when nothing is left."""
        while True:
            await asyncio.sleep(min(options.poll, HEARTBEAT_SECONDS))
            try:
                await _recover_stalled(app, options.stalled_after)
                if options.until_empty and await _outstanding(app, options.queues) == 0:
                    stop_reason.append("empty")
                    worker.cancel()
                    return
            except Exception:
                log.warning("could not look at the queue; trying again", exc_info=True)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("procrastinate.worker").removeFilter(one_line)
    return WorkerResult(state.name, state.lines, stopped_by_signal=not stop_reason)


def _schedule_engines_check(app: "App", options: WorkerOptions) -> None:
    from croniter import croniter

    if not croniter.is_valid(options.check_engines):
        raise FastclassError(f"--check-engines {options.check_engines!r} is not a cron schedule such as "
                             "'0 * * * *' (hourly; a 6th field gives seconds)")
    task = app.tasks[ENGINES_TASK]
    app.periodic_registry.register_task(task=task, cron=options.check_engines, periodic_id="canary",
                                        configure_kwargs={"task_kwargs": {"engines": options.check_only or None,
                                                                      "engine_urls": options.engine_urls}})
