"""`fastclass crawl` and `fastclass jobs` against a real HTTP server on 127.0.0.1 serving each engine's
result format, driving icrawler's real feeders and parsers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.helpers import catalog_rows, photo_like, run_cli
from tests.webserver import EngineSite


@pytest.fixture
def site():
    server = EngineSite()
    yield server
    server.close()


def jpegs(site: EngineSite, names, size=(64, 64)) -> list[str]:
    return [site.add_image(f"{n}.jpg", photo_like(n, size, "JPEG")) for n in names]


def crawl(catalog: str, site: EngineSite, *args: str, engine: str = "bing"):
    return run_cli(["crawl", *args, "--engine", engine, "--engine-url", f"{engine}={site.base}", "--json"], catalog)


@pytest.mark.parametrize("engine", ["bing", "baidu", "google", "flickr"])
def test_each_engine_format_yields_its_images(sqlite_catalog, site, engine, monkeypatch):
    """One engine per case, so that one engine whose format broke does not hide the others."""
    site.results["*"] = jpegs(site, range(6))
    if engine == "flickr":
        assert crawl(sqlite_catalog, site, "owl", engine=engine).stderr == (
            "Error: the flickr engine needs an API key: set FLICKR_API_KEY "
            "(get one at https://www.flickr.com/services/apps/create/)\n")
        monkeypatch.setenv("FLICKR_API_KEY", "test-key")
    result = crawl(sqlite_catalog, site, "owl", "--label", engine, engine=engine)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["found"] == 6 and report["status"] == "done" and report["new_images"] == 6, report
    rows = catalog_rows(sqlite_catalog, "SELECT s.engine, s.rank, s.page_url, s.http_status, s.content_type "
                                        "FROM sources s ORDER BY s.id")
    assert {r[0] for r in rows} == {engine} and sorted(r[1] for r in rows) == list(range(1, 7))
    assert all(r[3] == 200 and r[4] == "image/jpeg" for r in rows)
    if engine == "bing":
        assert all(r[2].startswith(site.url("/page/source")) for r in rows)


def test_engines_share_what_was_fetched_and_list_and_greedy_engines_work(initialized_catalog, site, tmp_path):
    site.results["*"] = jpegs(site, range(6))
    for engine in ("bing", "baidu", "google"):
        report = json.loads(crawl(initialized_catalog, site, "owl", "--label", engine, engine=engine).stdout)
        # The first engine downloads; the others find the same URLs and only add their label as a source.
        assert (report["new_images"], report["exact_duplicates"]) == ((6, 0) if engine == "bing" else (0, 6))
    assert site.hits["/img/0.jpg"] == 1, "a URL fetched once is never fetched again"
    rows = catalog_rows(initialized_catalog, "SELECT s.engine FROM sources s")
    assert {r[0] for r in rows} == {"bing", "baidu", "google"} and len(rows) == 18

    urls = tmp_path / "urls.txt"
    urls.write_text("# my list\n\n" + "\n".join(jpegs(site, range(6, 9))) + "\nftp://nope/x.jpg\n")
    listed = json.loads(run_cli(["crawl", "--urls", str(urls), "--label", "listed", "--allow-private", "--json"],
                                initialized_catalog).stdout)
    assert listed["new_images"] == 3 and listed["engines"]["urls"]["found"] == 3

    site.pages["gallery"] = ('<html><body><img src="/img/9.jpg"><a href="/page/more">more</a>'
                             f'<img src="{site.url("/img/10.jpg")}"></body></html>')
    site.pages["more"] = '<html><body><a href="/img/11.jpg">big</a></body></html>'
    jpegs(site, range(9, 12))
    greedy = run_cli(["crawl", "--url", site.url("/page/gallery"), "--label", "greedy", "--allow-private", "--json"],
                     initialized_catalog)
    assert json.loads(greedy.stdout)["new_images"] == 3, greedy.stdout


def test_downloads_that_go_wrong(initialized_catalog, site, tmp_path):
    good = jpegs(site, range(3))
    site.add_image("busy.jpg", photo_like(50, (64, 64), "JPEG"))
    site.add_image("tiny.jpg", photo_like(51, (20, 20), "JPEG"))
    site.results["*"] = good + [site.url(p) for p in (
        "/special/html.jpg", "/special/html-typed.jpg", "/special/missing.jpg", "/special/slow.jpg",
        "/special/huge.jpg", "/special/loop.jpg", "/special/busy/busy.jpg", "/img/tiny.jpg")] + [good[0] + "?again"]
    site.slow_seconds = 2.5
    site.add_image("0.jpg?again", b"")  # the same bytes under another URL (query strings reach the same file)
    result = crawl(initialized_catalog, site, "guitar", "--timeout", "0.5", "--max-bytes", "1MB", "--min-size", "32x32",
                   "--retries", "2")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["new_images"] == 4 and report["exact_duplicates"] == 1
    assert report["rejected"] == {"not an image": 2, "larger than the byte cap": 1, "too small": 1}
    assert report["failed"] == {"HTTP 404": 1, "timed out": 1, "too many redirects": 1}
    assert site.hits["/special/busy/busy.jpg"] == 2, "429 with Retry-After, then success"
    outcomes = dict(catalog_rows(initialized_catalog, "SELECT url, outcome FROM fetched_urls"))
    assert outcomes[site.url("/special/slow.jpg")] == "retry"
    assert outcomes[site.url("/special/missing.jpg")] == "failed"
    assert outcomes[site.url("/special/html.jpg")] == "rejected"
    assert catalog_rows(initialized_catalog, "SELECT count(*) FROM images") == [(4,)]
    store = tmp_path / "images"
    assert len([p for p in store.rglob("*.jpg")]) == 4 and not list((store / ".tmp").iterdir())

    # The re-run retries only the temporary failure.
    before = site.hits.copy()
    again = json.loads(crawl(initialized_catalog, site, "guitar", "--timeout", "0.5").stdout)
    fetched = {path for path in site.hits if site.hits[path] > before[path] and path.startswith(("/img", "/special"))}
    assert fetched == {"/special/slow.jpg"} and again["new_images"] == 0


def test_changed_markup_is_reported_and_other_engines_go_on(initialized_catalog, site, tmp_path):
    site.results["*"] = jpegs(site, range(3))
    site.broken_markup = True
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(jpegs(site, range(3, 5))))
    result = run_cli(["crawl", "kestrel", "--engine", "bing", "--engine", "urls", "--urls", str(urls),
                      "--engine-url", f"bing={site.base}"], initialized_catalog)
    assert result.exit_code == 0
    warning = result.stderr.strip().splitlines()[-1]
    assert warning.startswith(f"Warning: parser found no results on {site.base}/images/async?q=kestrel&first=0; "
                              "the engine's page format may have changed (page saved to ")
    saved = Path(warning.rsplit("page saved to ", 1)[1].rstrip(")"))
    assert saved.parent == tmp_path / "logs" and b"newlayout" in saved.read_bytes()
    assert "Crawl job 1 done: kestrel ('kestrel'): 2 new of --max 100" in result.stdout
    jobs = json.loads(run_cli(["jobs", "--json"], initialized_catalog).stdout)
    assert jobs[0]["last_error"].startswith("parser found no results") and jobs[0]["new"] == 2


def test_failing_hosts_and_a_refusing_engine_stop_that_engine(initialized_catalog, site):
    site.results["*"] = [site.url("/special/missing.jpg") + f"?{n}" for n in range(40)]
    failed = crawl(initialized_catalog, site, "lynx", "--max-failures", "5")
    report = json.loads(failed.stdout)
    assert report["engines"]["bing"]["problem"].startswith("bing: stopped after 5 downloads in a row failed")
    assert report["status"] == "failed" and report["engines"]["bing"]["failed"] < 40
    # No engine delivered: exit 1 after the JSON summary, each problem printed once.
    assert failed.exit_code == 1 and failed.stderr.count("stopped after 5 downloads") == 1
    assert failed.stderr.splitlines()[-1] == "Error: no engine could deliver for lynx (the problems are listed above)"

    site.engine_refusal = 429
    pages_before = site.hits["/images/async"]
    refused = json.loads(crawl(initialized_catalog, site, "ocelot", "--retries", "2").stdout)
    assert refused["engines"]["bing"]["problem"] == (
        f"bing refused our requests (HTTP 429 on {site.base}/images/async?q=ocelot&first=0): it is "
        "blocking or rate-limiting this machine; wait, then re-run to continue")
    assert site.hits["/images/async"] - pages_before == 3, "the first try and two retries"


def test_max_counts_new_images_and_a_rerun_continues(initialized_catalog, site):
    site.results["*"] = jpegs(site, range(30))
    first = json.loads(crawl(initialized_catalog, site, "heron", "--max", "12", "--threads", "4").stdout)
    assert first["new_images"] == 12
    fetched = {p for p, n in site.hits.items() if p.startswith("/img/")}
    assert len(fetched) == 12, "no download is thrown away at --max"
    second = json.loads(crawl(initialized_catalog, site, "heron", "--max", "12").stdout)
    assert second["new_images"] == 12 and second["skipped_known"] == 12
    assert all(n == 1 for p, n in site.hits.items() if p.startswith("/img/"))
    assert catalog_rows(initialized_catalog, "SELECT count(*) FROM images") == [(24,)]


def test_csv_of_classes_with_a_bad_row(initialized_catalog, site, tmp_path):
    site.results["fender jazzmaster -bass"] = jpegs(site, range(3))
    site.results["g&l -asat -classic"] = jpegs(site, range(3, 5))
    site.results['les paul -"gold top" -custom'] = jpegs(site, range(6, 8))
    site.results["*"] = jpegs(site, range(5, 6))
    table = tmp_path / "guitars.csv"
    table.write_text('searchterm,exclude\n"fender jazzmaster",bass\n,nothing\n"g&l","asat classic"\n'
                     'a,b,c,d\ntelecaster,,\n"les paul","""gold top"" custom"\n', encoding="utf-8")
    result = run_cli(["crawl", "--from", str(table), "--engine", "bing", "--engine-url", f"bing={site.base}"],
                     initialized_catalog)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[:2] == [f"Warning: {table}:3: empty searchterm",
                                              f"Warning: {table}:5: 4 fields, the header has 2 "
                                              "(quote a search term that holds a comma)"]
    assert result.stderr.splitlines()[-1] == f"Error: 2 bad row(s) in {table} (listed above); the other classes were crawled"
    labels = dict(catalog_rows(initialized_catalog, "SELECT l.name, count(*) FROM images i JOIN labels l ON l.id = i.label_id "
                                              "GROUP BY l.name"))
    assert labels == {"fender_jazzmaster": 3, "g&l": 2, "telecaster": 1, "les_paul": 2}


@pytest.fixture
def slow_site(tmp_path):
    """60 images served with 50 ms latency each, and an initialised catalog."""
    server = EngineSite(delay=0.05)
    server.results["*"] = jpegs(server, range(60))
    catalog = str(tmp_path / "catalog.db")
    assert run_cli(["init"], catalog).exit_code == 0
    yield server, catalog
    server.close()


def start_crawl_and_wait(site: EngineSite, catalog: str, images: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fastclass", "--catalog", catalog, "crawl", "bittern", "--engine", "bing",
               "--engine-url", f"bing={site.base}", "--threads", "2", "--max", "60"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if catalog_rows(catalog, "SELECT count(*) FROM images")[0][0] >= images:
            break
    return proc


@pytest.mark.slow
def test_ctrl_c_marks_the_job_interrupted_and_keeps_what_was_ingested(slow_site, tmp_path):
    site, catalog = slow_site
    proc = start_crawl_and_wait(site, catalog, 5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert stderr.splitlines()[-1] == "Error: interrupted; everything committed so far is kept, re-run to continue"
    job = json.loads(run_cli(["jobs", "--json"], catalog).stdout)[0]
    kept = catalog_rows(catalog, "SELECT count(*) FROM images")[0][0]
    assert job["status"] == "interrupted" and job["new"] == kept >= 5
    store = tmp_path / "images"
    assert len(list(store.rglob("*.jpg"))) == kept and not list((store / ".tmp").iterdir())


@pytest.mark.slow
def test_a_killed_crawl_resumes_without_fetching_anything_twice(slow_site, tmp_path):
    site, catalog = slow_site
    proc = start_crawl_and_wait(site, catalog, 10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = {url for (url,) in catalog_rows(catalog, "SELECT url FROM fetched_urls WHERE outcome = 'ok'")}
    assert 10 <= len(recorded) < 60
    before = site.hits.copy()
    jobs = json.loads(run_cli(["jobs", "--json"], catalog).stdout)
    assert jobs[0]["status"] == "interrupted"
    resumed = run_cli(["crawl", "--resume", "--json"], catalog)
    assert resumed.exit_code == 0, resumed.stderr
    again = {p for p in site.hits if site.hits[p] > before[p] and p.startswith("/img/")}
    assert not again & {u[len(site.base):] for u in recorded}, "a recorded URL was fetched again"
    assert catalog_rows(catalog, "SELECT count(*) FROM images") == [(60,)]
    assert json.loads(resumed.stdout)[0]["new_images"] == 60 - len(recorded)
    assert run_cli(["crawl", "--resume"], catalog).stderr == "Nothing to resume: every crawl finished.\n"
    store = tmp_path / "images"
    assert len(list(store.rglob("*.jpg"))) == 60 and not list((store / ".tmp").iterdir())


def test_usage_errors(initialized_catalog, site):
    assert run_cli(["crawl"], initialized_catalog).exit_code == 2
    assert run_cli(["crawl", "x", "--engine", "altavista"], initialized_catalog).stderr == \
        "Error: unknown engine 'altavista'; use one of: baidu, bing, ddg, flickr, google, greedy, urls\n"
    assert run_cli(["crawl", "x", "--filter", "type"], initialized_catalog).stderr == \
        "Error: --filter 'type' is not KEY=VALUE, e.g. type=photo\n"
    bad_filter = crawl(initialized_catalog, site, "x", "--filter", "type=hologram")
    assert bad_filter.exit_code == 1 and bad_filter.stderr.startswith("Error: bad --filter for this engine: ")
    assert run_cli(["crawl", "x", "--engine-url", "bing=ftp://x"], initialized_catalog).stderr == \
        "Error: --engine-url 'bing=ftp://x' is not ENGINE=http(s)://HOST[:PORT]\n"
    assert catalog_rows(initialized_catalog, "SELECT count(*) FROM crawl_jobs") == [(0,)], "refused before any job row"


def test_crawl_and_resume_on_each_backend(catalog, site):
    """The crawl's SQL (resume log, sources, job rows) on SQLite and on PostgreSQL."""
    site.results["*"] = jpegs(site, range(15)) + [site.url("/special/missing.jpg")]
    location = catalog.location
    first = json.loads(crawl(location, site, "owl", "--max", "10").stdout)
    second = json.loads(crawl(location, site, "owl", "--max", "10").stdout)
    other = json.loads(crawl(location, site, "bird", engine="baidu").stdout)
    assert (first["new_images"], second["new_images"], second["skipped_known"]) == (10, 5, 10)
    assert second["failed"] == {"HTTP 404": 1}
    assert (other["new_images"], other["exact_duplicates"]) == (0, 15)
    assert all(n == 1 for p, n in site.hits.items() if p.startswith(("/img/", "/special/")))
    jobs = json.loads(run_cli(["jobs", "--json"], location).stdout)
    assert [(j["label"], j["status"], j["new"]) for j in jobs] == [("bird", "done", 0), ("owl", "done", 5),
                                                                   ("owl", "done", 10)]


def test_ddg_engine_reads_its_token_pages_through_next_and_stops_when_refused(sqlite_catalog, site):
    site.results["*"] = jpegs(site, range(10))
    site.ddg_per_page, site.ddg_refuse_from = 4, 8
    result = crawl(sqlite_catalog, site, "owl", "--max", "50", engine="ddg")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # Two pages of four, then the third page is refused (403): the engine stops with that message.
    assert report["found"] == 8 and report["new_images"] == 8, report
    assert report["engines"]["ddg"]["problem"].startswith(f"ddg refused our requests (HTTP 403 on {site.base}/i.js?")
    assert result.stderr.count("refused our requests") == 1, "each problem is printed once"
    assert [q.get("s", ["0"])[0] for q in site.ddg_requests] == ["0", "4", "8"]
    assert all(q["vqd"] == [site.DDG_VQD] for q in site.ddg_requests)
    pages = catalog_rows(sqlite_catalog, "SELECT page_url FROM sources ORDER BY rank")
    assert pages[0] == (site.url("/page/ddg0"),)


def test_license_filter_reaches_the_engine_and_the_provenance(sqlite_catalog, site, monkeypatch):
    site.results["*"] = jpegs(site, range(3))
    result = crawl(sqlite_catalog, site, "owl", "--license", "share-commercial", engine="ddg")
    assert json.loads(result.stdout)["new_images"] == 3
    assert site.ddg_requests[0]["f"] == [",,,,license:ShareCommercially"]
    assert catalog_rows(sqlite_catalog, "SELECT DISTINCT license FROM sources") == [("share-commercial",)]
    bing = crawl(sqlite_catalog, site, "heron", "--license", "public", engine="bing")
    assert bing.exit_code == 0
    assert any(path.startswith("/images/async?") and "filterui%3Alicense-L1" in path.replace(":", "%3A")
               for path in site.requests), site.requests
    monkeypatch.setenv("FLICKR_API_KEY", "test-key")
    flickr = crawl(sqlite_catalog, site, "owl", "--label", "flickr", "--license", "modify-commercial",
                   engine="flickr")
    assert flickr.exit_code == 0, flickr.stderr
    searches = [parse_qs(urlsplit(path).query) for path in site.requests if "flickr.photos.search" in path]
    # Flickr's licence ids: CC BY, CC BY-SA, no known copyright, US government, CC0, public domain mark.
    assert searches and all(q["license"] == ["4,5,7,8,9,10"] for q in searches), searches
    assert catalog_rows(sqlite_catalog, "SELECT DISTINCT s.license FROM sources s JOIN labels l "
                                        "ON l.id = s.label_id WHERE l.name = 'flickr'") == [("modify-commercial",)]
    refused = run_cli(["crawl", "owl", "--engine", "baidu", "--license", "public"], sqlite_catalog)
    assert refused.exit_code == 1 and refused.stderr == (
        "Error: the baidu engine cannot filter by licence (--license public); engines that can: bing, ddg, flickr\n")


def test_yield_per_engine_is_recorded_exactly_and_jobs_show_tells_it(sqlite_catalog, site):
    good = jpegs(site, range(5))
    known = jpegs(site, range(5, 7))
    site.results["earlier"] = known
    assert json.loads(crawl(sqlite_catalog, site, "earlier").stdout)["new_images"] == 2
    same_bytes = site.add_image("copy.jpg", photo_like(0, (64, 64), "JPEG"))  # the bytes of good[0] again
    # New bytes, same pictures: larger copies of an image this crawl found first and of one known before.
    near = [site.add_image("big0.jpg", photo_like(0, (96, 96), "JPEG")),
            site.add_image("big5.jpg", photo_like(5, (96, 96), "JPEG"))]
    site.results["kite"] = good + [good[1], same_bytes, site.url("/special/missing.jpg"),
                                   site.url("/special/html-typed.jpg"), known[0]] + near
    result = crawl(sqlite_catalog, site, "kite", "--max", "50")
    report = json.loads(result.stdout)
    bing = report["engines"]["bing"]
    assert {k: bing[k] for k in ("found", "unique", "skipped", "downloaded", "decoded", "new", "duplicates",
                                 "near_duplicates", "failed", "rejected", "ended")} == {
        "found": 11, "unique": 11, "skipped": 1, "downloaded": 9, "decoded": 8, "new": 7, "duplicates": 2,
        "near_duplicates": 2, "failed": 1, "rejected": {"not an image": 1}, "ended": "no more results"}, bing
    assert report["near_duplicates"] == 2
    assert report["short_of_max"] == "bing: no more results"
    shown = run_cli(["jobs", "show", str(report["job"])], sqlite_catalog)
    assert shown.exit_code == 0, shown.output
    assert "no more results" in shown.stdout and "bing" in shown.stdout
    record = json.loads(run_cli(["jobs", "show", str(report["job"]), "--json"], sqlite_catalog).stdout)
    assert record["engine_stats"]["bing"]["decoded"] == 8 and record["near_duplicates"] == 2
    assert "2 near-copies" in shown.stdout
    assert run_cli(["jobs", "show", "99"], sqlite_catalog).stderr == "Error: no crawl job 99 (see `fastclass jobs`)\n"


def test_google_says_in_one_line_why_it_yields_nothing(sqlite_catalog, site):
    site.results["*"] = []
    result = crawl(sqlite_catalog, site, "owl", engine="google")
    assert result.exit_code == 1
    assert result.stderr.count("Google's result pages need JavaScript now, which no scraper runs: use bing, ddg "
                               "or baidu") == 1, result.stderr
