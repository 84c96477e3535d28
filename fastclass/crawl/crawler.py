"""`fastclass crawl`: one class from web engines into the catalog, resumable, polite and deduplicated.

The main thread walks each engine's result pages and owns the catalog session; a thread pool downloads
through one Fetcher (fastclass/crawl/fetch.py: guarded addresses, byte and time limits, redirect limit,
retries with Retry-After) under per-host concurrency, and each body is analysed and stored in an
isolated worker process (fastclass/workers.py), so the network wait overlaps and a hostile file fails
alone. Every URL's outcome is recorded in `fetched_urls` in the same transaction as its image, which is
what makes a re-run (or `--resume`) skip everything fetched before.
"""
from __future__ import annotations

import concurrent.futures as cf
import enum
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import requests
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import CrawlJob, FetchedUrl, utcnow
from fastclass import __version__
from fastclass.catalog import is_recorded_in
from fastclass.crawl.engines import EngineProblem, EngineRequest, Hit, get_engine, license_filter
from fastclass.crawl.fetch import Fetcher, FetchFailed, RewritingSession, Stopped, http_url
from fastclass.crawl.jobs import job_params
from fastclass.crawl.options import CrawlOptions
from fastclass.errors import FastclassError, StopRequested
from fastclass.ingest.analyze import ImageFacts, NotAnImage, analyze_bytes, reason_kind
from fastclass.ingest.hashsearch import near_copies
from fastclass.ingest.record import (
    PreparedImage,
    SourceInfo,
    commit_batch,
    ids_by_sha256,
    insert_rows,
    open_claim_conflicts,
    record_sources,
    serialize_writes,
)
from fastclass.labels import label_ids
from fastclass.store import Store, StoredFile
from fastclass.workers import IsolatedPool

log = logging.getLogger(__name__)

USER_AGENT = f"fastclass/{__version__} (+https://github.com/fastclass; image dataset builder)"
MAX_PAGE_BYTES = 10 * 1024 * 1024
BATCH_SIZE = 32
BATCH_SECONDS = 0.5
NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/javascript")


@dataclass
class EngineStats:
    """One engine's yield in one crawl: from results seen to new images, and why it stopped."""

    found: int = 0
    """Results listed (a URL listed twice counts twice)."""
    unique: int = 0
    """Distinct URLs among them."""
    skipped: int = 0
    """URLs fetched before (by this class or another): not fetched again."""
    downloaded: int = 0
    decoded: int = 0
    """Downloads that are images fastclass can store (the rest are rejected, by reason)."""
    new: int = 0
    duplicates: int = 0
    """Images already in the catalog (the same bytes), found again."""
    near_duplicates: int = 0
    """New images (new bytes) that are near-copies of an image the catalog already had: the perceptual hash
    within dedup's default threshold (a resize, crop or re-encode). `dedup` groups them."""
    failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    ended: str | None = None
    """Why the engine stopped: class full, no more results, refused, parser empty, downloads failing."""
    problem: str | None = None


@dataclass
class CrawlReport:
    job_id: int
    query: str
    label: str
    status: str = "running"
    found: int = 0
    skipped: int = 0
    downloaded: int = 0
    new_images: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    conflicts: int = 0
    """Images known under another label that this crawl also found: open label conflicts now."""
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    engines: dict[str, EngineStats] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_new: int = 0

    def short_of_max(self) -> str | None:
        """Why the class did not get --max new images, or None when it did."""
        if self.new_images >= self.max_new:
            return None
        if self.found and self.skipped == self.found:
            return "everything the engines listed was fetched before"
        why = [f"{name}: {stats.ended}" for name, stats in self.engines.items() if stats.ended]
        return "; ".join(why) or None

    def as_dict(self) -> dict:
        return {"job": self.job_id, "query": self.query, "label": self.label, "status": self.status,
                "found": self.found, "skipped_known": self.skipped, "downloaded": self.downloaded,
                "new_images": self.new_images, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates,
                "label_conflicts": self.conflicts, "rejected": dict(self.rejected), "failed": dict(self.failed),
                "engines": {name: asdict(stats) for name, stats in self.engines.items()},
                "problems": self.problems, "seconds": round(self.seconds, 2), "short_of_max": self.short_of_max()}


class Fetched(str, enum.Enum):
    """What the fetch log records for a URL; every state but RETRY means a re-run never fetches it again."""

    OK = "ok"
    REJECTED = "rejected"
    """The server answered with something that is not a usable image (too big, HTML, too small)."""
    FAILED = "failed"
    """A permanent failure: 404, 410, too many redirects, a malformed URL."""
    RETRY = "retry"
    """A failure a later run may get past: a timeout, a connection reset, a 503, a refused private address."""


@dataclass
class _Outcome:
    hit: Hit
    engine: str
    rank: int
    stored: StoredFile | None = None
    prepared: PreparedImage | None = None
    reason: str | None = None
    permanent: bool = True
    rejected: bool = False
    http_status: int | None = None
    content_type: str | None = None

    @property
    def state(self) -> Fetched:
        if self.prepared is not None:
            return Fetched.OK
        if not self.permanent:
            return Fetched.RETRY
        return Fetched.REJECTED if self.rejected else Fetched.FAILED


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def analyze_and_store(task: tuple[bytes, Store, tuple[int, int] | None]) -> tuple[ImageFacts, StoredFile] | str:
    """Check, hash and store downloaded bytes (in a worker process); a string is the rejection reason."""
    data, store, min_size = task
    try:
        facts = analyze_bytes(data)
    except NotAnImage as exc:
        return str(exc)
    if min_size and (facts.width < min_size[0] or facts.height < min_size[1]):
        return f"too small ({facts.width}x{facts.height} < {min_size[0]}x{min_size[1]})"
    return facts, store.put(facts.sha256, facts.ext, data)


def fetch_result_page(fetcher: Fetcher, session: RewritingSession, engine: str, url: str) -> requests.Response:
    """An engine's result page (or a greedy page), within the page limits, as the requests.Response
    that icrawler's parsers read. Problems name the URL actually fetched (an --engine-url target)."""
    target = session.rewrite(url)
    try:
        fetched = fetcher.get(target, MAX_PAGE_BYTES)
    except FetchFailed as failure:
        code = failure.status or 0
        if code in (403, 418, 429):
            raise EngineProblem(f"{engine} refused our requests (HTTP {code} on {target}): it is blocking "
                                "or rate-limiting this machine; wait, then re-run to continue") from None
        if code >= 400:
            raise EngineProblem(f"{engine} answered HTTP {code} for its result page {target}") from None
        if failure.rejected and "byte cap" in failure.reason:
            raise EngineProblem(f"{engine}: result page {target} is larger than {MAX_PAGE_BYTES} bytes") from None
        raise EngineProblem(f"{engine}: cannot fetch its result page {target}: {failure.reason}") from None
    response = requests.Response()
    response.status_code = fetched.status
    response.url = fetched.url
    response.headers = requests.structures.CaseInsensitiveDict(fetched.headers)
    response.encoding = requests.utils.get_encoding_from_headers(response.headers)
    response._content = fetched.body
    return response


def crawl_fetcher(options: CrawlOptions, allow_private: bool) -> tuple[Fetcher, RewritingSession]:
    """The Fetcher of a crawl (or an engine check) with these options, and the page session icrawler's
    parsers use, which sends public engine URLs to their --engine-url. An --engine-url is an address the user
    named: reachable even when private. Nothing else is, unless allow_private (intranets, tests)."""
    rewrites, trusted = {}, set()
    for name, base in options.engine_urls.items():
        engine = get_engine(name)
        if engine.public_base:
            rewrites[engine.public_base] = base
        parts = urlsplit(base)
        trusted.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    fetcher = Fetcher(options.timeout, options.connect_timeout, options.max_redirects, options.retries,
                      allow_private, trusted, USER_AGENT, options.per_host)
    return fetcher, fetcher.requests_session(rewrites)


def engine_request(options: CrawlOptions, session: RewritingSession | None = None) -> EngineRequest:
    """What each engine is asked for in a crawl with these options."""
    return EngineRequest(options.query, dict(options.filters), list(options.pages),
                         Path(options.urls_file) if options.urls_file else None, session, options.license)


class _HostLimits:
    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self.lock = threading.Lock()
        self.semaphores: dict[str, threading.Semaphore] = {}

    def __call__(self, host: str) -> threading.Semaphore:
        with self.lock:
            return self.semaphores.setdefault(host, threading.Semaphore(self.per_host))


class Crawler:
    """One class's crawl: engines in order, downloads in a thread pool, catalog writes in this thread."""

    def __init__(self, session: Session, store: Store, options: CrawlOptions, log_dir: Path,
                 progress: Callable[[int, int, str], None] | None = None, allow_private: bool = False) -> None:
        self.session = session
        self.store = store
        self.options = options
        self.log_dir = log_dir
        self.progress = progress
        self.fetcher, self.page_session = crawl_fetcher(options, allow_private)
        self.stop = self.fetcher.stop
        # Decoding and hashing run in worker processes: in the download threads they would hold the
        # interpreter lock that 32 threads reading sockets also need (measured: 330 vs 450+ images/s);
        # isolated, so that a body that hangs or crashes a decoder fails alone.
        self.analysis_pool = IsolatedPool(min(os.cpu_count() or 1, 8))
        self.host_limits = _HostLimits(options.per_host)
        self._license = options.license if options.license != "any" else None
        self.pending: list[_Outcome] = []
        self.failures: list[_Outcome] = []
        self.stored_by: dict[str, str] = {}
        """The engine that found each image this crawl stored new (by sha256), for the near-copy count."""
        self.last_flush = time.monotonic()
        self.consecutive_failures = 0
        self.last_failure = ""
        self.job_id = 0
        self.label_id = 0

    # -- result pages ---------------------------------------------------------------------------
    def fetch_page(self, engine: str, url: str) -> requests.Response:
        return fetch_result_page(self.fetcher, self.page_session, engine, url)

    def save_page(self, engine: str, page: bytes | None, job_id: int) -> Path | None:
        if not page:
            return None
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"crawl-{job_id}-{engine}-{int(time.time())}.html"
            path.write_bytes(page)
            return path
        except OSError as exc:
            log.warning("could not save the engine page for a bug report: %s", exc)
            return None

    # -- downloads (worker threads) ------------------------------------------------------------------
    def download(self, hit: Hit, engine: str, rank: int) -> _Outcome:
        outcome = _Outcome(hit, engine, rank)
        if not http_url(hit.url):
            outcome.reason = "not a well-formed http(s) URL"
            return outcome
        with self.host_limits(urlsplit(hit.url).netloc):
            data = self._fetch_body(hit.url, outcome)
        if data is None or self.stop.is_set():
            return outcome
        verdict, failure = self.analysis_pool.outcome(self.analysis_pool.submit(
            analyze_and_store, (data, self.store, self.options.min_size), hit.url))
        if failure is not None:
            outcome.reason, outcome.rejected = failure, True
            return outcome
        if isinstance(verdict, str):
            outcome.reason, outcome.rejected = verdict, True
            return outcome
        facts, outcome.stored = verdict
        source = SourceInfo(hit.url, engine, self.options.query, None, rank, hit.page_url,
                            outcome.http_status, outcome.content_type, utcnow(), self._license)
        outcome.prepared = PreparedImage(facts, outcome.stored, self.options.label, source)
        return outcome

    def _fetch_body(self, url: str, outcome: _Outcome) -> bytes | None:
        """The body of an image URL, or None with outcome.reason set."""
        try:
            fetched = self.fetcher.get(url, self.options.max_bytes, NOT_IMAGE_TYPES)
        except FetchFailed as failure:
            outcome.reason, outcome.permanent, outcome.rejected = failure.reason, failure.permanent, failure.rejected
            outcome.http_status, outcome.content_type = failure.status, failure.content_type
            return None
        except Stopped:
            return None
        outcome.http_status = fetched.status
        outcome.content_type = fetched.headers.get("Content-Type", "")[:200] or None
        return fetched.body

    # -- the main loop ----------------------------------------------------------------------------
    def run(self, job: CrawlJob, report: CrawlReport) -> None:
        opts = self.options
        executor = cf.ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="fastclass-download")
        in_flight: dict[cf.Future, str] = {}
        try:
            for name in opts.engines:
                if report.new_images >= opts.max_new:
                    break
                stats = report.engines.setdefault(name, EngineStats())
                self._run_engine(name, stats, report, job, executor, in_flight)
            self._drain(in_flight, report, wait_all=True)
            self._flush(report, force=True)
            self._count_near_copies(report)
        except BaseException:
            # Ctrl-C or an error: every connect, read and retry wait in the download threads ends now.
            self.fetcher.abort()
            executor.shutdown(wait=False, cancel_futures=True)
            self._discard_in_flight(in_flight)
            try:
                self._flush(report, force=True)
            except Exception:
                log.debug("could not save the last batch", exc_info=True)
                self.session.rollback()
            raise
        finally:
            self.fetcher.abort()
            executor.shutdown(wait=False, cancel_futures=True)
            self.analysis_pool.close()

    def _run_engine(self, name: str, stats: EngineStats, report: CrawlReport, job: CrawlJob,
                    executor: cf.ThreadPoolExecutor, in_flight: dict) -> None:
        started = time.monotonic()
        try:
            stats.ended = self._crawl_engine(name, stats, report, job, executor, in_flight)
        finally:
            stats.seconds = round(time.monotonic() - started, 2)

    def _crawl_engine(self, name: str, stats: EngineStats, report: CrawlReport, job: CrawlJob,
                      executor: cf.ThreadPoolExecutor, in_flight: dict) -> str:
        """Run one engine's results through the downloads; returns why the engine stopped."""
        opts = self.options
        engine = get_engine(name)
        hits = engine.results(engine_request(opts, self.page_session), lambda url: self.fetch_page(name, url))
        rank = 0
        self.consecutive_failures = 0
        try:
            for chunk in _chunked(hits, max(16, opts.threads * 2)):
                todo = self._filter_known(chunk, name, stats, report)
                for hit in todo:
                    rank += 1
                    while len(in_flight) >= self._window(report):
                        self._drain(in_flight, report)
                        if self._engine_done(name, stats, report):
                            return self._why_done(report)
                    in_flight[executor.submit(self.download, hit, name, rank)] = name
                self._drain(in_flight, report, block=False)
                if self._engine_done(name, stats, report):
                    return self._why_done(report)
            ended = "no more results"
        except EngineProblem as problem:
            saved = self.save_page(name, problem.page, job.id)
            message = str(problem) + (f" (page saved to {saved})" if saved else "")
            stats.problem = message
            report.problems.append(message)
            log.debug("%s", message)  # the report carries it; the command prints it once
            ended = ("refused" if "refused our requests" in message else
                     "parser empty" if "parser found no results" in message else "result pages failing")
        # Let this engine's downloads finish and be recorded before the next engine starts, so its counts
        # are its own and the next engine sees every URL this one fetched.
        self._drain(in_flight, report, wait_all=True)
        self._flush(report, force=True)
        return "class full" if report.new_images >= opts.max_new else ended

    def _why_done(self, report: CrawlReport) -> str:
        return "class full" if report.new_images >= self.options.max_new else "downloads failing"

    def _window(self, report: CrawlReport) -> int:
        """Downloads to keep in flight: enough to overlap the network wait, but never more than the class
        still has room for, so that downloads are not thrown away once --max is reached."""
        room = self.options.max_new - report.new_images - len(self.pending)
        return max(1, min(self.options.threads * 2, room))

    def _engine_done(self, name: str, stats: EngineStats, report: CrawlReport) -> bool:
        if report.new_images >= self.options.max_new:
            return True
        if self.consecutive_failures >= self.options.max_failures and stats.problem is None:
            stats.problem = (f"{name}: stopped after {self.options.max_failures} downloads in a row failed "
                             f"(last: {self.last_failure}); the image hosts may be blocking us")
            report.problems.append(stats.problem)
            log.debug("%s", stats.problem)
        return stats.problem is not None

    def _filter_known(self, hits: list[Hit], engine: str, stats: EngineStats, report: CrawlReport) -> list[Hit]:
        """Hits not fetched before; a URL fetched for another label adds this label as a source, no download."""
        stats.found += len(hits)
        report.found += len(hits)
        hashes = {url_hash(h.url): h for h in hits}
        stats.unique += len(hashes)
        known = {row.url_hash: row for row in self.session.execute(
            select(FetchedUrl.url_hash, FetchedUrl.outcome, FetchedUrl.sha256)
            .where(FetchedUrl.url_hash.in_(list(hashes)))).all()}
        todo, reused = [], []
        for digest, hit in hashes.items():
            row = known.get(digest)
            if row is None or row.outcome == Fetched.RETRY:
                todo.append(hit)
                continue
            stats.skipped += 1
            report.skipped += 1
            if row.outcome == Fetched.OK and row.sha256:
                reused.append((row.sha256, hit))
        if reused:
            self._add_sources(reused, engine, report, stats)
        self.session.commit()
        return todo

    def _add_sources(self, reused: list[tuple[str, Hit]], engine: str, report: CrawlReport,
                     stats: EngineStats) -> None:
        """This label as a source of images fetched before (maybe for another label): no download."""
        serialize_writes(self.session)
        ids = ids_by_sha256(self.session, [sha for sha, _ in reused])
        claims = [(ids[sha], self.label_id, SourceInfo(hit.url, engine, self.options.query, self.job_id,
                                                        page_url=hit.page_url, fetched_at=utcnow(),
                                                        license=self._license))
                  for sha, hit in reused if sha in ids]
        added = record_sources(self.session, claims)
        if added:
            report.exact_duplicates += added
            stats.duplicates += added
            report.conflicts += open_claim_conflicts(self.session, {image_id for image_id, _, _ in claims})

    def _drain(self, in_flight: dict, report: CrawlReport, block: bool = True, wait_all: bool = False) -> None:
        while in_flight:
            done, _ = cf.wait(list(in_flight), timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
            for future in done:
                engine = in_flight.pop(future)
                self._take(future.result(), engine, report)
            self._flush(report)
            if not wait_all:
                return

    def _take(self, outcome: _Outcome, engine: str, report: CrawlReport) -> None:
        stats = report.engines[engine]
        if report.new_images >= self.options.max_new:
            # The class is full: drop what came back late, so that the next run fetches it instead.
            if outcome.stored is not None:
                self.store.discard([outcome.stored], is_recorded_in(self.session))
            return
        if outcome.prepared is not None:
            stats.downloaded += 1
            stats.decoded += 1
            report.downloaded += 1
            self.consecutive_failures = 0
            self.pending.append(outcome)
            return
        if outcome.rejected:
            stats.downloaded += 1
            report.downloaded += 1
            kind = reason_kind(outcome.reason) or "unknown"
            report.rejected[kind] += 1
            stats.rejected[kind] = stats.rejected.get(kind, 0) + 1
            self.consecutive_failures = 0
        else:
            stats.failed += 1
            report.failed[reason_kind(outcome.reason) or "unknown"] += 1
            self.consecutive_failures += 1
            self.last_failure = f"{outcome.reason} for {outcome.hit.url[:100]}"
        self.failures.append(outcome)

    def _flush(self, report: CrawlReport, force: bool = False) -> None:
        room = self.options.max_new - report.new_images
        due = len(self.pending) >= min(BATCH_SIZE, max(room, 1)) or time.monotonic() - self.last_flush > BATCH_SECONDS
        if not (force or due) or not (self.pending or self.failures):
            return
        self.last_flush = time.monotonic()
        batch, self.pending = self.pending[:max(room, 0)], self.pending[max(room, 0):]
        failures, self.failures = self.failures, []
        rows = list({row["url_hash"]: row for row in (
            _fetched_row(o, self.job_id) for o in batch + failures)}.values())
        serialize_writes(self.session)
        if rows:
            self.session.execute(delete(FetchedUrl).where(FetchedUrl.url_hash.in_([r["url_hash"] for r in rows])))
            insert_rows(self.session, FetchedUrl.__table__, rows)
        shas = [o.prepared.facts.sha256 for o in batch]
        known = set(ids_by_sha256(self.session, shas))
        for outcome in batch:
            outcome.prepared.source.crawl_job_id = self.job_id
        result = commit_batch(self.session, self.store, [o.prepared for o in batch])
        report.new_images += result.new_images
        report.exact_duplicates += result.exact_duplicates
        report.conflicts += result.new_claims
        for outcome in batch:
            sha = outcome.prepared.facts.sha256
            stats = report.engines[outcome.engine]
            if sha in known:
                stats.duplicates += 1
            else:
                stats.new += 1
                known.add(sha)
                self.stored_by[sha] = outcome.engine
        if self.pending and report.new_images >= self.options.max_new:
            leftover, self.pending = self.pending, []
            self.store.discard([o.stored for o in leftover], is_recorded_in(self.session))
        if self.progress:
            detail = "  ".join(f"{name}: found {st.found} fetched {st.downloaded} new {st.new}"
                               for name, st in report.engines.items())
            self.progress(min(report.new_images, self.options.max_new), self.options.max_new, detail)

    def _count_near_copies(self, report: CrawlReport) -> None:
        ids = ids_by_sha256(self.session, list(self.stored_by))
        engine_of = {ids[sha]: engine for sha, engine in self.stored_by.items() if sha in ids}
        for image_id in near_copies(self.session, list(engine_of)):
            report.near_duplicates += 1
            report.engines[engine_of[image_id]].near_duplicates += 1

    def _discard_in_flight(self, in_flight: dict) -> None:
        leftovers = [f.result().stored for f in in_flight if f.done() and not f.cancelled()
                     and f.exception() is None and f.result().stored is not None]
        if leftovers:
            self.store.discard(leftovers, is_recorded_in(self.session))


def _fetched_row(outcome: _Outcome, job_id: int) -> dict:
    return {"url_hash": url_hash(outcome.hit.url), "url": outcome.hit.url, "outcome": outcome.state.value,
            "reason": outcome.reason, "http_status": outcome.http_status,
            "sha256": outcome.prepared.facts.sha256 if outcome.prepared else None,
            "crawl_job_id": job_id, "fetched_at": utcnow()}


def _chunked(items: Iterator[Hit], size: int) -> Iterator[list[Hit]]:
    """Hits in chunks; when the engine fails mid-way, the hits it listed before still come out first."""
    chunk: list[Hit] = []
    try:
        for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except EngineProblem:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def check_options(options: CrawlOptions) -> None:
    """Refuse a crawl that cannot work before anything is written (unknown engine, missing key, bad flags)."""
    if not options.engines:
        raise FastclassError("no engine given")
    if options.max_new < 1:
        raise FastclassError("--max must be at least 1")
    for name in options.engines:
        engine = get_engine(name)
        if engine.needs_query and not options.query.strip():
            raise FastclassError(f"the {name} engine needs a search query")
        engine.check(engine_request(options))
        license_filter(engine, options.license)


def run_crawl(session: Session, store: Store, options: CrawlOptions, log_dir: Path,
              progress: Callable[[int, int, str], None] | None = None, resumed_from: int | None = None,
              job_id: int | None = None, allow_private: bool = False) -> CrawlReport:
    """Crawl one class into the catalog; the job row records the run whatever happens. With job_id, the
    run is that existing (queued and claimed) job's; else a new job row is made. allow_private lets
    result URLs and redirects reach loopback, private and link-local addresses (refused by default)."""
    check_options(options)
    label_id = label_ids(session, [options.label])[options.label]
    if job_id is None:
        job = CrawlJob(query=options.query, label_id=label_id, engines=",".join(options.engines),
                       params=job_params(options, resumed_from), status="running")
        session.add(job)
    else:
        job = session.get(CrawlJob, job_id)
        job.params = job_params(options, resumed_from)
    session.commit()
    report = CrawlReport(job.id, options.query, options.label, max_new=options.max_new)
    crawler = Crawler(session, store, options, log_dir, progress, allow_private)
    crawler.job_id, crawler.label_id = job.id, label_id
    started = time.monotonic()
    try:
        crawler.run(job, report)
        report.status = "done" if report.new_images or not report.problems else "failed"
    except (KeyboardInterrupt, StopRequested):
        report.status = "interrupted"
        raise
    except BaseException as exc:
        report.status = "failed"
        report.problems.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        report.seconds = time.monotonic() - started
        _save_job(session, job.id, report)
    return report


def _save_job(session: Session, job_id: int, report: CrawlReport) -> None:
    try:
        session.rollback()
        job = session.get(CrawlJob, job_id)
        job.status = report.status
        job.found, job.downloaded, job.new_images = report.found, report.downloaded, report.new_images
        job.exact_duplicates = report.exact_duplicates
        job.rejected = sum(report.rejected.values())
        job.reject_reasons = json.dumps({**report.rejected, **{f"failed: {k}": v for k, v in report.failed.items()}},
                                        sort_keys=True)
        job.engine_stats = json.dumps({n: asdict(s) for n, s in report.engines.items()}, sort_keys=True)
        job.last_error = report.problems[-1] if report.problems else None
        job.finished_at = utcnow()
        session.commit()
    except Exception:
        log.warning("could not record the end of crawl job %s", job_id, exc_info=True)
