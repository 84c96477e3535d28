"""Crawl engines, registered by name: which result pages to fetch and which image URLs they list.

Result-page URLs come from icrawler's feeders and image URLs from icrawler's parsers, so engine markup
knowledge stays in one maintained place; fastclass owns fetching (limits, retries, blocks) and
downloading. Each engine's public address can be replaced (`--engine-url bing=http://127.0.0.1:8000`)
by a mirror, a proxy or a test server: the fetch session rewrites the public base URL, which also
reaches requests an icrawler parser makes itself (Flickr's size lookups); see fastclass/crawl/fetch.py.
"""
from __future__ import annotations

import html
import json
import logging
import os
import queue
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote_plus, urljoin, urlsplit

import requests

from fastclass.crawl.fetch import http_url
from fastclass.errors import FastclassError
from fastclass.registry import Registry
from fastclass.text import printable, read_text_file

log = logging.getLogger(__name__)

MAX_RESULTS = 1000
MAX_GREEDY_PAGES = 200


class EngineProblem(Exception):
    """An engine cannot go on (blocked, failing, or its page format changed); the message says which."""

    def __init__(self, message: str, page: bytes | None = None) -> None:
        super().__init__(message)
        self.page = page


@dataclass(frozen=True)
class Hit:
    """One image URL an engine listed, with the page that listed it when known."""

    url: str
    page_url: str | None = None


FetchPage = Callable[[str], requests.Response]


@dataclass
class EngineRequest:
    """What one engine is asked for in one crawl."""

    query: str
    filters: dict[str, str] = field(default_factory=dict)
    pages: list[str] = field(default_factory=list)
    urls_file: Path | None = None
    session: requests.Session | None = None
    license: str = "any"
    """One of LICENSES: which reuse the images' licences must allow ("any": no filter)."""


@dataclass(frozen=True)
class Engine:
    name: str
    summary: str
    public_base: str | None
    results: Callable[[EngineRequest, FetchPage], Iterator[Hit]]
    check: Callable[[EngineRequest], None] = lambda request: None
    needs_query: bool = True
    licenses: dict[str, str] | None = None
    """The engine's own filter value for each of LICENSES it can filter by; None: it has no licence filter."""
    needs: str | None = None
    """What it needs besides a query: an environment variable (upper case) or an option."""


# The engines that work without a key today, in the order a crawl asks them.
DEFAULT_ENGINES = ("bing", "ddg", "baidu")


def license_filter(engine: Engine, license: str) -> str | None:
    """The engine's filter value for a --license, None for "any"; refuses an engine without a licence filter."""
    if license == "any":
        return None
    if not engine.licenses or license not in engine.licenses:
        raise FastclassError(f"the {engine.name} engine cannot filter by licence (--license {license}); "
                             f"engines that can: {', '.join(n for n, e in ENGINES.items() if e.licenses)}")
    return engine.licenses[license]


def register_engine(engine: Engine) -> Engine:
    return ENGINES.register(engine.name, engine)


def get_engine(name: str) -> Engine:
    return ENGINES.lookup(name)


def _icrawler(component_cls, session: requests.Session):
    """An icrawler feeder or parser used as a plain object (no threads): feeders fill `out_queue`."""
    component = component_cls(thread_num=1, signal=None, session=session)
    component.out_queue = queue.Queue()
    return component


def _drain(component) -> list[str]:
    urls = []
    while not component.out_queue.empty():
        urls.append(component.out_queue.get())
    return urls


def _check_filters(feeder_cls, sep: str = "") -> Callable[[EngineRequest], None]:
    def check(request: EngineRequest) -> None:
        if not request.filters:
            return
        try:
            feeder_cls.get_filter(None).apply(request.filters, sep=sep)
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise FastclassError(f"bad --filter for this engine: {str(exc).strip(chr(39))}") from None
    return check


def _paged(request: EngineRequest, fetch: FetchPage, page_urls: Iterator[str],
           parse: Callable[[requests.Response], list[Hit]], hint: str = "") -> Iterator[Hit]:
    """Fetch result pages in order; an empty first page means the markup changed, a later one the end."""
    seen: set[str] = set()
    for number, page_url in enumerate(page_urls, start=1):
        response = fetch(page_url)
        hits = [hit for hit in parse(response) if hit.url not in seen]
        if not hits:
            if number == 1:
                raise EngineProblem(f"parser found no results on {response.url}; the engine's page format may "
                                    f"have changed{hint}", response.content)
            return
        for hit in hits:
            seen.add(hit.url)
            yield hit


def _feeder_pages(request: EngineRequest, feeder_cls, step: int,
                  feed: Callable[[object, int], None]) -> Iterator[str]:
    """Result-page URLs one page at a time, from an icrawler feeder fed with each offset in turn."""
    for offset in range(0, MAX_RESULTS, step):
        feeder = _icrawler(feeder_cls, request.session)
        feed(feeder, offset)
        yield from _drain(feeder)


def _bing_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    from icrawler.builtin.bing import BingFeeder, BingParser

    # icrawler puts the keyword into Bing's (and Baidu's) URL unencoded: "g&l" would search for "g".
    filters = dict(request.filters)
    if request.license != "any":
        filters["license"] = license_filter(ENGINES.lookup("bing"), request.license)
    pages = _feeder_pages(request, BingFeeder, 20, lambda feeder, offset: feeder.feed(
        quote_plus(request.query), offset, 20, filters or None))
    parser = _icrawler(BingParser, request.session)

    def parse(response: requests.Response) -> list[Hit]:
        # icrawler's Bing parser keeps only URLs ending in .jpg; the same `m` attribute also names PNG/WebP
        # images and the page each image is on, so both are read here and merged in page order.
        jpgs = {item["file_url"] for item in parser.parse(response)}
        hits, seen = [], set()
        for m in re.findall(r'class="iusc"[^>]*?\sm="([^"]+)"|\sm="([^"]+)"[^>]*?class="iusc"',
                            response.content.decode("utf-8", "ignore")):
            try:
                meta = json.loads(html.unescape(m[0] or m[1]))
            except ValueError:
                continue
            url = meta.get("murl")
            if isinstance(url, str) and url not in seen:
                seen.add(url)
                hits.append(Hit(url, meta.get("purl") if isinstance(meta.get("purl"), str) else None))
        hits += [Hit(url) for url in sorted(jpgs - seen)]
        return hits

    return _paged(request, fetch, pages, parse)


def _baidu_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    from icrawler.builtin.baidu import BaiduFeeder, BaiduParser

    pages = _feeder_pages(request, BaiduFeeder, 30, lambda feeder, offset: feeder.feed(
        quote_plus(request.query), offset, 30, request.filters or None))
    parser = _icrawler(BaiduParser, request.session)
    return _paged(request, fetch, pages, lambda r: [Hit(i["file_url"]) for i in parser.parse(r) or []])


def _google_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    from icrawler.builtin.google import GoogleFeeder, GoogleParser

    pages = _feeder_pages(request, GoogleFeeder, 100, lambda feeder, offset: feeder.feed(
        request.query, offset, 100, filters=request.filters or None))
    parser = _icrawler(GoogleParser, request.session)
    return _paged(request, fetch, pages, lambda r: [Hit(i["file_url"]) for i in parser.parse(r) or []],
                  hint=" (Google's result pages need JavaScript now, which no scraper runs: use bing, ddg or baidu)")


DDG_BASE = "https://duckduckgo.com"
DDG_MAX_PAGES = 20
_VQD = re.compile(r"""vqd=["']([\w-]+)["']|vqd=([\w-]+)&""")


def _ddg_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    """DuckDuckGo images: the search page holds a `vqd` token; `i.js` pages of JSON results follow, each
    naming the next one. Its refusals (403, 418, 429) end the engine as "refused our requests"."""
    page = fetch(f"{DDG_BASE}/?q={quote_plus(request.query)}&iax=images&ia=images")
    found = _VQD.search(page.content.decode("utf-8", "ignore"))
    if not found:
        raise EngineProblem(f"ddg: no vqd token on its search page {page.url}; its page format may have changed",
                            page.content)
    vqd = found.group(1) or found.group(2)
    license = license_filter(ENGINES.lookup("ddg"), request.license)
    # f= size,color,type,layout,license
    filters = ",".join([request.filters.get(k, "") for k in ("size", "color", "type", "layout")]
                       + [f"license:{license}" if license else ""])
    url: str | None = (f"{DDG_BASE}/i.js?l=us-en&o=json&q={quote_plus(request.query)}&vqd={vqd}"
                       f"&f={quote_plus(filters, safe=',:')}&p=1")
    seen: set[str] = set()
    for number in range(1, DDG_MAX_PAGES + 1):
        if url is None:
            return
        response = fetch(url)
        try:
            data = json.loads(response.content)
            results = data["results"]
        except (ValueError, KeyError, TypeError):
            raise EngineProblem(f"ddg answered {response.url} with something that is not its image JSON",
                                response.content) from None
        hits = [Hit(item["image"], item.get("url") if isinstance(item.get("url"), str) else None)
                for item in results if isinstance(item, dict) and isinstance(item.get("image"), str)]
        hits = [hit for hit in hits if hit.url not in seen]
        if not hits:
            if number == 1:
                raise EngineProblem(f"parser found no results on {response.url}; the engine's page format may "
                                    "have changed", response.content)
            return
        for hit in hits:
            seen.add(hit.url)
            yield hit
        following = data.get("next") if isinstance(data, dict) else None
        url = None
        if isinstance(following, str) and following:
            url = urljoin(DDG_BASE + "/", following)
            if "vqd=" not in url:
                url += f"&vqd={vqd}"


FLICKR_KEY_ENV = "FLICKR_API_KEY"


def _flickr_check(request: EngineRequest) -> None:
    if not os.environ.get(FLICKR_KEY_ENV):
        raise FastclassError(f"the flickr engine needs an API key: set {FLICKR_KEY_ENV} "
                             "(get one at https://www.flickr.com/services/apps/create/)")


def _flickr_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    from icrawler.builtin.flickr import FlickrFeeder, FlickrParser

    key = os.environ[FLICKR_KEY_ENV]
    feeder = _icrawler(FlickrFeeder, request.session)
    feeder.signal = _NeverDone()
    filters = dict(request.filters)
    if request.license != "any":
        filters["license"] = license_filter(ENGINES.lookup("flickr"), request.license)
    feeder.feed(key, MAX_RESULTS, text=request.query, per_page=100, **filters)
    parser = _icrawler(FlickrParser, request.session)
    sizes = ["original", "large 2048", "large 1600", "large", "medium 800", "medium"]

    def parse(response: requests.Response) -> list[Hit]:
        try:
            return [Hit(i["file_url"]) for i in parser.parse(response, key, sizes) or []]
        except (ValueError, KeyError) as exc:
            raise EngineProblem(f"flickr answered {response.url} with something that is not its API's JSON "
                                f"({exc})", response.content) from None

    return _paged(request, fetch, iter(_drain(feeder)), parse)


class _NeverDone(dict):
    """The `signal` icrawler's Flickr feeder polls; fastclass stops by not asking for more pages."""

    def get(self, key, default=None):
        return False


def _greedy_check(request: EngineRequest) -> None:
    if not request.pages:
        raise FastclassError("the greedy engine needs at least one --url PAGE")
    for page in request.pages:
        if not http_url(page):
            raise FastclassError(f"--url {page!r} is not a well-formed http(s) URL")


def _greedy_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    """Every image on the given pages and on the pages they link to on the same hosts (breadth first)."""
    from icrawler.builtin.greedy import GreedyParser

    parser = _icrawler(GreedyParser, request.session)
    domains = sorted({urlsplit(page).netloc for page in request.pages})
    todo, visited, seen = list(request.pages), set(), set()
    while todo and len(visited) < MAX_GREEDY_PAGES:
        page = todo.pop(0)
        if page in visited:
            continue
        visited.add(page)
        try:
            response = fetch(page)
        except EngineProblem as exc:
            log.warning("greedy: skipping %s: %s", page, exc)
            continue
        found = []
        try:
            for item in parser.parse(response, domains):
                if isinstance(item, dict):
                    found.append(item["file_url"])
                elif item not in visited and http_url(item):
                    todo.append(item)
        except ValueError as exc:  # a malformed link on a hostile page: keep what was read before it
            log.warning("greedy: a malformed link on %s (%s); the page's other links are skipped", page, exc)
        # icrawler skips relative <img src>; resolve them against the page.
        text = response.content.decode("utf-8", "ignore")
        for src in re.findall(r"<img[^>]+src=[\"']([^\"']+)[\"']", text, re.I):
            try:
                found.append(urljoin(response.url, html.unescape(src)))
            except ValueError:
                continue
        for url in found:
            if url not in seen and http_url(url):
                seen.add(url)
                yield Hit(url, page)


def _urls_check(request: EngineRequest) -> None:
    if request.urls_file is None:
        raise FastclassError("the urls engine needs --urls FILE (one image URL per line)")
    if not request.urls_file.is_file():
        raise FastclassError(f"--urls file {request.urls_file} does not exist")


def read_url_list(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """(line number, URL) of each usable line, and one message per bad line; blank lines and # comments skipped."""
    good, bad = [], []
    for number, line in enumerate(read_text_file(path, "--urls file").splitlines(), start=1):
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        if not http_url(url):
            bad.append(f"{path}:{number}: not a well-formed http(s) URL: {printable(url[:80])!r}")
            continue
        good.append((number, url))
    return good, bad


def _urls_results(request: EngineRequest, fetch: FetchPage) -> Iterator[Hit]:
    good, bad = read_url_list(request.urls_file)
    for message in bad:
        log.warning("%s", message)
    for _, url in good:
        yield Hit(url)


def _register_builtin() -> None:
    from icrawler.builtin.baidu import BaiduFeeder
    from icrawler.builtin.bing import BingFeeder
    from icrawler.builtin.google import GoogleFeeder

    register_engine(Engine("bing", "Bing image search (no key)", "https://www.bing.com", _bing_results,
                           _check_filters(BingFeeder), licenses={
                               "public": "publicdomain", "share": "noncommercial", "share-commercial": "commercial",
                               "modify": "noncommercial,modify", "modify-commercial": "commercial,modify"}))
    register_engine(Engine("ddg", "DuckDuckGo image search (no key; rate-limits hard)", DDG_BASE, _ddg_results,
                           licenses={"public": "Public", "share": "Share", "share-commercial": "ShareCommercially",
                                     "modify": "Modify", "modify-commercial": "ModifyCommercially"}))
    register_engine(Engine("baidu", "Baidu image search (no key)", "http://image.baidu.com", _baidu_results,
                           _check_filters(BaiduFeeder, "&")))
    register_engine(Engine("google", "Google image search (no key; unreliable: its pages need JavaScript)",
                           "https://www.google.com", _google_results, _check_filters(GoogleFeeder, ",")))
    # Flickr licence ids: 1-6 Creative Commons (3 and 6 no derivatives, 1-3 non-commercial), 7 no known
    # copyright, 8 US government, 9 CC0, 10 public domain mark.
    register_engine(Engine("flickr", "the Flickr API (flickr.photos.search)", "https://api.flickr.com",
                           _flickr_results, _flickr_check, needs=FLICKR_KEY_ENV, licenses={
                               "public": "7,8,9,10", "share": "1,2,3,4,5,6,7,8,9,10",
                               "share-commercial": "4,5,6,7,8,9,10", "modify": "1,2,4,5,7,8,9,10",
                               "modify-commercial": "4,5,7,8,9,10"}))
    register_engine(Engine("greedy", "every image on --url pages and the pages they link to on the same hosts",
                           None, _greedy_results, _greedy_check, needs_query=False, needs="--url"))
    register_engine(Engine("urls", "the image URLs listed in --urls FILE", None, _urls_results, _urls_check,
                           needs_query=False, needs="--urls"))


ENGINES: Registry[Engine] = Registry("engine", load=_register_builtin)
