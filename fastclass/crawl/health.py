"""`fastclass engines check`: one small canary query per engine, and a verdict on how it works today.

Search engines change under scrapers without notice. A canary fetches the first two result pages of a
query, downloads a sample of the first page's images and decodes them, and judges: `broken` (no results,
refused, or nothing downloads as an image), `degraded` (fewer than half of the sample downloads or
decodes, or no second page), `ok`. Each check is recorded (`engine_checks`), `fastclass engines` shows the
latest per engine, and `crawl` warns before it uses an engine whose latest check was broken.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import EngineCheck, utcnow
from fastclass.crawl.engines import DEFAULT_ENGINES, ENGINES, EngineProblem, get_engine
from fastclass.crawl.fetch import FetchFailed, http_url
from fastclass.crawl.options import CrawlOptions
from fastclass.errors import FastclassError
from fastclass.ingest.analyze import analyze_bytes
from fastclass.workers import IsolatedPool

SAMPLE = 10


@dataclass
class CheckResult:
    engine: str
    verdict: str = "broken"
    page1: int = 0
    page2: int = 0
    page2_differs: bool = False
    sampled: int = 0
    downloaded: int = 0
    decoded: int = 0
    problem: str | None = None
    saved_page: str | None = None
    checked_at: dt.datetime = field(default_factory=utcnow)

    @property
    def download_share(self) -> float | None:
        return self.downloaded / self.sampled if self.sampled else None

    @property
    def decode_share(self) -> float | None:
        return self.decoded / self.sampled if self.sampled else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["checked_at"] = str(self.checked_at)
        data["download_share"], data["decode_share"] = self.download_share, self.decode_share
        return data


def _verdict(result: CheckResult) -> str:
    if result.page1 == 0 or result.decoded == 0:
        return "broken"
    if (result.download_share or 0) < 0.5 or (result.decode_share or 0) < 0.5 or not result.page2_differs:
        return "degraded"
    return "ok"


def check_engine(name: str, options: CrawlOptions, log_dir: Path, allow_private: bool = False,
                 pool: IsolatedPool | None = None) -> CheckResult:
    """One canary for one engine: results on pages 1 and 2, a sample downloaded and decoded."""
    from fastclass.crawl.crawler import check_options, crawl_fetcher, engine_request, fetch_result_page

    engine = get_engine(name)
    if engine.needs and not engine.needs.isupper():
        raise FastclassError(f"the {name} engine needs {engine.needs}; a canary query cannot check it")
    check_options(replace(options, engines=[name]))
    result = CheckResult(name)
    fetcher, session = crawl_fetcher(options, allow_private)
    fetches = [0]

    def fetch(url: str):
        fetches[0] += 1
        return fetch_result_page(fetcher, session, name, url)

    # Each hit belongs to the result page fetched last before it: page 1 and page 2 are the first two
    # fetches that listed anything (ddg's token page lists nothing).
    by_fetch: dict[int, list[str]] = {}
    try:
        for hit in engine.results(engine_request(options, session), fetch):
            by_fetch.setdefault(fetches[0], []).append(hit.url)
            if len(by_fetch) > 2:
                break
        pages = [by_fetch[n] for n in sorted(by_fetch)]
        page1, page2 = (pages + [[], []])[:2]
        result.page1, result.page2 = len(page1), len(page2)
        result.page2_differs = bool(page2) and set(page2) != set(page1)
        sample = [url for url in page1 if http_url(url)][:SAMPLE]
        result.sampled = len(sample)
        own = pool is None
        pool = pool or IsolatedPool(min(os.cpu_count() or 1, 4))
        try:
            for url in sample:
                try:
                    body = fetcher.get(url, options.max_bytes).body
                except FetchFailed:
                    continue
                result.downloaded += 1
                facts, failure = pool.outcome(pool.submit(analyze_bytes, body, url))
                if failure is None and not facts.decode_error:
                    result.decoded += 1
        finally:
            if own:
                pool.close()
    except EngineProblem as problem:
        result.problem = str(problem)
        result.saved_page = _save_page(log_dir, name, problem.page)
    finally:
        fetcher.abort()
    result.verdict = _verdict(result)
    return result


def _save_page(log_dir: Path, engine: str, page: bytes | None) -> str | None:
    if not page:
        return None
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"check-{engine}-{utcnow():%Y%m%d-%H%M%S}.html"
        path.write_bytes(page)
        return str(path)
    except OSError:
        return None


def checkable_engines() -> list[str]:
    """Engines a canary query can check: those that need no --url or --urls (flickr only with its key)."""
    return [name for name, engine in sorted(ENGINES.items())
            if not engine.needs or (engine.needs.isupper() and os.environ.get(engine.needs))]


def check_engines(session: Session, names: list[str], options: CrawlOptions, log_dir: Path,
                  allow_private: bool = False) -> list[CheckResult]:
    """Run the canary for each engine and record each result (committed one by one)."""
    results = []
    with IsolatedPool(min(os.cpu_count() or 1, 4)) as pool:
        for name in names:
            result = check_engine(name, options, log_dir, allow_private, pool)
            session.add(EngineCheck(engine=name, checked_at=result.checked_at, query=options.query,
                                    verdict=result.verdict, page1=result.page1, page2=result.page2,
                                    sampled=result.sampled, downloaded=result.downloaded, decoded=result.decoded,
                                    problem=result.problem))
            session.commit()
            results.append(result)
    return results


def latest_checks(session: Session) -> dict[str, EngineCheck]:
    """The newest recorded check of each engine."""
    latest: dict[str, EngineCheck] = {}
    for check in session.scalars(select(EngineCheck).order_by(EngineCheck.checked_at, EngineCheck.id)):
        latest[check.engine] = check
    return latest


def list_engines(session: Session) -> list[dict]:
    """Every engine: what it searches, whether it needs a key or input, its base URL, its latest health."""
    latest = latest_checks(session)
    rows = []
    for name in sorted(ENGINES):
        engine = ENGINES[name]
        check = latest.get(name)
        rows.append({"name": name, "summary": engine.summary, "base_url": engine.public_base,
                     "needs": engine.needs, "license_filter": bool(engine.licenses),
                     "default": name in DEFAULT_ENGINES,
                     "health": None if check is None else {
                         "verdict": check.verdict, "checked_at": str(check.checked_at), "page1": check.page1,
                         "page2": check.page2, "sampled": check.sampled, "downloaded": check.downloaded,
                         "decoded": check.decoded, "problem": check.problem}})
    return rows


def broken_warnings(session: Session, names: list[str]) -> list[str]:
    """One line for each of these engines whose latest check was broken, said before a crawl uses it."""
    latest = latest_checks(session)
    return [f"the {name} engine was broken at its last check ({latest[name].checked_at:%Y-%m-%d %H:%M}: "
            f"{latest[name].problem or 'nothing decoded'}); using it anyway (`fastclass engines check {name}` "
            "checks it again)"
            for name in dict.fromkeys(names) if name in latest and latest[name].verdict == "broken"]
