"""`crawl --queue` and `fastclass worker`: jobs claimed once, leases, a killed worker's job taken over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastclass.catalog import init_catalog, open_catalog
from fastclass.crawl.jobqueue import claim_job, enqueue_crawl
from fastclass.crawl.options import CrawlOptions
from tests.helpers import catalog_rows, photo_like, run_cli
from tests.webserver import EngineSite

QUERIES = [f"bird{n}" for n in range(12)]


def queue_site(delay: float) -> EngineSite:
    """Ten distinct images per query, plus one image every query finds."""
    site = EngineSite(delay=delay)
    shared = site.add_image("shared.jpg", photo_like(999, (64, 64), "JPEG"))
    for q, query in enumerate(QUERIES):
        site.results[query] = [site.add_image(f"{query}-{i}.jpg", photo_like(100 * q + i, (64, 64), "JPEG"))
                               for i in range(10)] + [shared]
    return site


def enqueue_all(location: str, site: EngineSite) -> None:
    for query in QUERIES:
        result = run_cli(["crawl", query, "--engine", "bing", "--engine-url", f"bing={site.base}", "--threads", "1",
                          "--max", "50", "--queue"], location)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Queued crawl job ")


def wait_for_lease_to_end(session, job_id: int) -> None:
    """Wait on the condition itself (the recorded lease has run out), not a guessed sleep."""
    from db.models import CrawlJob, utcnow

    session.expire_all()
    lease_until = session.get(CrawlJob, job_id).lease_until
    session.commit()
    while utcnow() <= lease_until.replace(tzinfo=None):  # naive UTC, as the catalog stores it
        time.sleep(0.02)


def test_a_claimed_job_is_not_claimed_again_until_its_lease_runs_out(catalog, tmp_path):
    options = CrawlOptions(query="owl", label="owl", engines=["bing"])
    with catalog.session() as session:
        job_id = enqueue_crawl(session, options)
        first = claim_job(session, "w1", lease_seconds=0.5)
        assert (first.id, first.worker, first.attempts, first.status) == (job_id, "w1", 1, "running")
        assert claim_job(session, "w2", lease_seconds=0.5) is None
        wait_for_lease_to_end(session, job_id)
        second = claim_job(session, "w2", lease_seconds=0.5)
        assert (second.id, second.worker, second.attempts) == (job_id, "w2", 2)
        wait_for_lease_to_end(session, job_id)
        assert claim_job(session, "w3", lease_seconds=0.5).attempts == 3
        wait_for_lease_to_end(session, job_id)
        assert claim_job(session, "w4", lease_seconds=0.5) is None
    status, error = catalog_rows(catalog.location, f"SELECT status, last_error FROM crawl_jobs WHERE id = {job_id}")[0]
    assert status == "failed" and error == "abandoned: its worker stopped during each of 3 attempts"


def test_queue_refuses_a_bad_job_and_worker_runs_the_good_ones(sqlite_catalog):
    site = queue_site(delay=0)
    try:
        bad = run_cli(["crawl", "x", "--engine", "altavista", "--queue"], sqlite_catalog)
        assert bad.exit_code == 1 and catalog_rows(sqlite_catalog, "SELECT count(*) FROM crawl_jobs") == [(0,)]
        enqueue_all(sqlite_catalog, site)
        jobs = json.loads(run_cli(["jobs", "--json"], sqlite_catalog).stdout)
        assert {j["status"] for j in jobs} == {"queued"} and len(jobs) == 12
        result = run_cli(["worker", "--until-empty", "--concurrency", "2", "--name", "solo", "--poll", "0.2"],
                         sqlite_catalog)
        assert result.exit_code == 0, result.output
        assert result.stdout.count(" done: ") == 12
    finally:
        site.close()
    jobs = json.loads(run_cli(["jobs", "--json"], sqlite_catalog).stdout)
    assert {(j["status"], j["worker"], j["attempts"]) for j in jobs} == {("done", "solo", 1)}
    assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM images") == [(121,)]
    assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM sources") == [(132,)]
    # Two jobs running at once may both fetch the image they share before either has recorded it.
    assert all(n == 1 for path, n in site.hits.items() if path.startswith("/img/") and path != "/img/shared.jpg")


@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_and_one_killed_run_every_job_exactly_once(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0.25)
    workers: list[subprocess.Popen] = []
    try:
        enqueue_all(pg_database, site)
        for n, concurrency in enumerate([1, 1, 2]):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "fastclass", "--catalog", pg_database, "worker", "--name", f"w{n}",
                 "--concurrency", str(concurrency), "--lease", "3", "--poll", "0.2", "--until-empty"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = catalog_rows(pg_database, "SELECT j.id, count(f.url_hash) FROM crawl_jobs j JOIN fetched_urls f "
                                     "ON f.crawl_job_id = j.id WHERE j.worker = 'w0' AND j.status = 'running' "
                                     "GROUP BY j.id")
            if busy and busy[0][1] >= 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("worker w0 never got into a job")
        killed_job = busy[0][0]
        os.kill(workers[0].pid, signal.SIGKILL)
        for proc in workers[1:]:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
        site.close()

    jobs = catalog_rows(pg_database, "SELECT id, status, worker, attempts FROM crawl_jobs ORDER BY id")
    errors = catalog_rows(pg_database, "SELECT id, last_error FROM crawl_jobs WHERE status != 'done'")
    assert [status for _, status, _, _ in jobs] == ["done"] * 12, errors
    taken_over = {job_id: (worker, attempts) for job_id, _, worker, attempts in jobs if attempts > 1}
    assert list(taken_over) == [killed_job] and taken_over[killed_job][0] in ("w1", "w2")
    assert catalog_rows(pg_database, "SELECT count(*) FROM images") == [(121,)]
    assert catalog_rows(pg_database, "SELECT count(*) FROM sources") == [(132,)]
    assert catalog_rows(pg_database, "SELECT count(*) FROM (SELECT image_id, uri, label_id FROM sources "
                             "GROUP BY image_id, uri, label_id HAVING count(*) > 1) d") == [(0,)]
    # Only what the killed worker had downloaded but not yet recorded is fetched again, once; every other
    # image URL once (the shared one may be fetched by two jobs running at the same time).
    killed_query = catalog_rows(pg_database, f"SELECT query FROM crawl_jobs WHERE id = {killed_job}")[0][0]
    again = {path: n for path, n in site.hits.items() if path.startswith("/img/") and n > 1}
    again.pop("/img/shared.jpg", None)
    assert all(path.startswith(f"/img/{killed_query}-") and n == 2 for path, n in again.items()), again

    open_catalog(pg_database).close()  # opening clears what the killed worker left in the store's temp folder
    store = tmp_path / "images"
    stored = {f"{p.parent.name}/{p.name}" for p in store.glob("??/*")}
    assert stored == {path for (path,) in catalog_rows(pg_database, "SELECT store_path FROM images")}
    assert not list((store / ".tmp").iterdir())
