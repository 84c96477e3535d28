"""Queued work on a PostgreSQL catalog (procrastinate): crawl jobs run once each by many workers, a killed
worker's job taken over, a job failing past its retry budget, verify in chunks, the periodic engines check,
Ctrl-C releasing a job, old queued jobs carried over; on SQLite, `--queue` refused with what to do."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastclass.catalog import init_catalog, open_catalog
from tests.helpers import catalog_rows, photo_like, run_cli
from tests.test_verify import cases, statuses
from tests.webserver import EngineSite

QUERIES = [f"bird{n}" for n in range(12)]


def queue_site(delay: float, queries: list[str] = QUERIES) -> EngineSite:
    """Ten distinct images per query, plus one image every query finds."""
    site = EngineSite(delay=delay)
    shared = site.add_image("shared.jpg", photo_like(999, (64, 64), "JPEG"))
    for q, query in enumerate(queries):
        site.results[query] = [site.add_image(f"{query}-{i}.jpg", photo_like(100 * q + i, (64, 64), "JPEG"))
                               for i in range(10)] + [shared]
    return site


def enqueue(location: str, site: EngineSite, queries: list[str] = QUERIES) -> None:
    for query in queries:
        result = run_cli(["crawl", query, "--engine", "bing", "--engine-url", f"bing={site.base}", "--threads", "1",
                          "--max", "50", "--queue"], location)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Queued crawl job ")


def worker(location: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", location, "worker", "--poll", "0.2",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(rows, what: str, seconds: float = 60):
    """Poll a query (a callable) until it returns something truthy: the condition itself, not a guessed sleep."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = rows()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def crawl_jobs(location: str) -> list[tuple]:
    """(id, crawl status, worker, procrastinate status, runs ended) of every crawl job."""
    return catalog_rows(location, "SELECT c.id, c.status, c.worker, p.status::text, p.attempts FROM crawl_jobs c "
                                  "JOIN procrastinate_jobs p ON p.id = c.queue_job_id ORDER BY c.id")


def busy_job(location: str, worker_name: str):
    """The job `worker_name` is in the middle of (two URLs of it recorded), if any."""
    return lambda: catalog_rows(location, "SELECT j.id, count(f.url_hash) FROM crawl_jobs j JOIN fetched_urls f ON "
                                          f"f.crawl_job_id = j.id WHERE j.worker = '{worker_name}' AND j.status = "
                                          "'running' GROUP BY j.id HAVING count(f.url_hash) >= 2")


def no_duplicates(location: str) -> None:
    assert catalog_rows(location, "SELECT count(*) FROM (SELECT image_id, uri, label_id FROM sources "
                                  "GROUP BY image_id, uri, label_id HAVING count(*) > 1) d") == [(0,)]


def store_matches_catalog(location: str, store: Path) -> None:
    open_catalog(location).close()  # opening clears what a killed worker left in the store's temp folder
    stored = {f"{p.parent.name}/{p.name}" for p in store.glob("??/*")}
    assert stored == {path for (path,) in catalog_rows(location, "SELECT store_path FROM images")}
    assert not list((store / ".tmp").iterdir())


def sqlite_twin(pg_database: str, tmp_path: Path, folder: Path) -> str:
    """The PostgreSQL catalog and a SQLite one beside it, both initialised and holding `folder` imported:
    a queued run on the first is compared with an in-process run on the second."""
    local = str(tmp_path / "local.db")
    init_catalog(local, str(tmp_path / "local-images"))
    init_catalog(pg_database, str(tmp_path / "images"))
    for location in (local, pg_database):
        assert run_cli(["import", str(folder)], location).exit_code == 0
    return local


@pytest.mark.parametrize("command", [["crawl", "owl", "--queue"], ["verify", "--queue"], ["embed", "--queue"],
                                     ["engines", "check", "--queue"], ["worker", "--until-empty"]])
def test_sqlite_catalogs_refuse_queues_in_one_line(sqlite_catalog, command):
    result = run_cli(command, sqlite_catalog)
    assert result.exit_code == 1
    instead = ("nothing is queued there, every command runs in-process" if command[0] == "worker"
               else "run the command without --queue (it runs here)")
    assert result.stderr == (f"Error: queues need a PostgreSQL catalog and {sqlite_catalog} is SQLite: {instead}, "
                             "or move the catalog to PostgreSQL (docs/scaling.md)\n")
    assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM crawl_jobs") == [(0,)]


@pytest.mark.postgres
def test_queued_crawls_run_once_each_and_jobs_shows_the_queue(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0)
    try:
        bad = run_cli(["crawl", "x", "--engine", "altavista", "--queue"], pg_database)
        assert bad.exit_code == 1 and catalog_rows(pg_database, "SELECT count(*) FROM crawl_jobs") == [(0,)]
        assert catalog_rows(pg_database, "SELECT count(*) FROM procrastinate_jobs") == [(0,)]
        enqueue(pg_database, site)
        jobs = json.loads(run_cli(["jobs", "--json"], pg_database).stdout)
        assert {(j["status"], j["runs"]) for j in jobs} == {("queued", 0)} and len(jobs) == 12
        result = run_cli(["worker", "--until-empty", "--concurrency", "2", "--name", "solo", "--poll", "0.2"],
                         pg_database)
        assert result.exit_code == 0, result.output
        assert result.stdout.count(" done: ") == 12
    finally:
        site.close()
    jobs = json.loads(run_cli(["jobs", "--json"], pg_database).stdout)
    assert {(j["status"], j["worker"], j["runs"]) for j in jobs} == {("done", "solo", 1)}
    assert {row[3] for row in crawl_jobs(pg_database)} == {"succeeded"}
    assert catalog_rows(pg_database, "SELECT count(*) FROM images") == [(121,)]
    assert catalog_rows(pg_database, "SELECT count(*) FROM sources") == [(132,)]
    # Two jobs running at once may both fetch the image they share before either has recorded it.
    assert all(n == 1 for path, n in site.hits.items() if path.startswith("/img/") and path != "/img/shared.jpg")


@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_and_one_killed_run_every_job_exactly_once(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0.25)
    workers: list[subprocess.Popen] = []
    try:
        enqueue(pg_database, site)
        for n, concurrency in enumerate([1, 1, 2]):
            workers.append(worker(pg_database, "--name", f"w{n}", "--concurrency", str(concurrency),
                                  "--stalled-after", "3", "--until-empty"))
        killed_job = wait_for(busy_job(pg_database, "w0"), "worker w0 to get into a job")[0][0]
        os.kill(workers[0].pid, signal.SIGKILL)
        for proc in workers[1:]:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
        site.close()

    jobs = crawl_jobs(pg_database)
    errors = catalog_rows(pg_database, "SELECT id, last_error FROM crawl_jobs WHERE status != 'done'")
    assert [(status, queued) for _, status, _, queued, _ in jobs] == [("done", "succeeded")] * 12, errors
    taken_over = {job_id: (name, runs) for job_id, _, name, _, runs in jobs if runs > 1}
    assert list(taken_over) == [killed_job] and taken_over[killed_job] in (("w1", 2), ("w2", 2))
    assert catalog_rows(pg_database, "SELECT count(*) FROM images") == [(121,)]
    assert catalog_rows(pg_database, "SELECT count(*) FROM sources") == [(132,)]
    no_duplicates(pg_database)
    # Only what the killed worker had downloaded but not yet recorded is fetched again, once; every other
    # image URL once (the shared one may be fetched by two jobs running at the same time).
    killed_query = catalog_rows(pg_database, f"SELECT query FROM crawl_jobs WHERE id = {killed_job}")[0][0]
    again = {path: n for path, n in site.hits.items() if path.startswith("/img/") and n > 1}
    again.pop("/img/shared.jpg", None)
    assert all(path.startswith(f"/img/{killed_query}-") and n == 2 for path, n in again.items()), again
    store_matches_catalog(pg_database, tmp_path / "images")


@pytest.mark.postgres
def test_a_job_failing_past_its_retry_budget_ends_failed_with_its_last_error(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0, queries=["owl"])
    site.refuse_paths.add("/images/async")  # Bing's result pages answer 403 every time
    try:
        enqueue(pg_database, site, ["owl"])
        result = run_cli(["worker", "--until-empty", "--retries", "2", "--retry-wait", "0.2", "--poll", "0.2"],
                         pg_database)
        assert result.exit_code == 0, result.output
    finally:
        site.close()
    assert result.stdout.count("Crawl job 1 failed: owl") == 3
    [(_, status, _, queued, runs)] = crawl_jobs(pg_database)
    assert (status, queued, runs) == ("failed", "failed", 3)
    [job] = json.loads(run_cli(["jobs", "--json"], pg_database).stdout)
    assert (job["status"], job["runs"]) == ("failed", 3)
    assert "refused our requests (HTTP 403" in job["last_error"]
    shown = run_cli(["jobs"], pg_database).stdout
    assert shown.startswith("    1 failed ") and "\n      last error: bing refused our requests (HTTP 403" in shown


@pytest.mark.postgres
def test_queued_verify_in_chunks_across_two_workers_gives_the_in_process_verdicts(pg_database, tmp_path):
    local = sqlite_twin(pg_database, tmp_path, cases(tmp_path / "in"))
    assert run_cli(["verify"], local).exit_code == 0

    queued = json.loads(run_cli(["verify", "--queue", "--chunk", "3", "--json"], pg_database).stdout)
    assert (queued["queued_jobs"], queued["images"]) == (4, 11)
    workers = [worker(pg_database, "--queues", "verify", "--until-empty", "--name", f"v{n}") for n in range(2)]
    lines = []
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        lines += out.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted(f"Verify {a}-{b}" for a, b in queued["chunks"])
    assert statuses(pg_database) == statuses(local)
    assert catalog_rows(pg_database, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 4)]
    assert json.loads(run_cli(["verify", "--queue", "--json"], pg_database).stdout)["queued_jobs"] == 0
    assert "Other queued work: verify done 4 (`fastclass jobs queue` lists each job)" in run_cli(
        ["jobs"], pg_database).stdout


@pytest.mark.postgres
def test_the_periodic_engines_check_runs_and_ctrl_c_stops_the_worker(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = EngineSite()
    site.results["*"] = [site.add_image(f"{n}.jpg", photo_like(n, (64, 64), "JPEG")) for n in range(45)]
    proc = worker(pg_database, "--check-engines", "* * * * * */2", "--check-only", "bing",
                  "--engine-url", f"bing={site.base}", "--allow-private")
    try:
        checks = wait_for(lambda: catalog_rows(pg_database, "SELECT engine, verdict FROM engine_checks"),
                          "the periodic engines check", seconds=60)
        assert checks[0] == ("bing", "ok")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        site.close()
    assert proc.returncode == 0, err[-2000:]
    assert "Engines checked: bing ok" in out
    assert err.strip().splitlines()[-1].startswith("Stopped; ")


@pytest.mark.slow
@pytest.mark.postgres
def test_ctrl_c_puts_the_running_job_back_and_keeps_its_work(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0.4, queries=["owl"])
    try:
        enqueue(pg_database, site, ["owl"])
        proc = worker(pg_database, "--name", "first")
        wait_for(busy_job(pg_database, "first"), "the worker to get into its job")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("Stopped; ")
        [(_, status, _, queued, _)] = crawl_jobs(pg_database)
        assert (status, queued) == ("interrupted", "todo")
        kept = catalog_rows(pg_database, "SELECT count(*) FROM fetched_urls")[0][0]
        assert kept >= 2
        result = run_cli(["worker", "--until-empty", "--name", "second"], pg_database)
        assert result.exit_code == 0, result.output
    finally:
        site.close()
    [(_, status, name, queued, _)] = crawl_jobs(pg_database)
    assert (status, name, queued) == ("done", "second", "succeeded")
    assert catalog_rows(pg_database, "SELECT count(*) FROM images") == [(11,)]
    # What was recorded before the stop is not fetched again; the downloads in flight then (2 at most with
    # one thread) are, once.
    again = [path for path, n in site.hits.items() if path.startswith("/img/") and n > 1]
    assert len(again) <= 2 and all(site.hits[path] == 2 for path in again), site.hits
    no_duplicates(pg_database)
    store_matches_catalog(pg_database, tmp_path / "images")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_jobs_queued_before_the_upgrade_are_carried_over_or_marked_for_resume(backend, tmp_path, request):
    from alembic import command
    from sqlalchemy import text

    from db import open_engine
    from db.migrate import alembic_config
    from fastclass.catalog import catalog_url

    location = str(tmp_path / "old.db") if backend == "sqlite" else request.getfixturevalue("pg_database")
    init_catalog(location, str(tmp_path / "images"))
    site = queue_site(delay=0, queries=["owl"])
    try:
        engine = open_engine(catalog_url(location))
        command.downgrade(alembic_config(engine), "0011")
        params = json.dumps({"query": "owl", "label": "owl", "engines": ["bing"], "max_new": 50, "threads": 1,
                             "engine_urls": {"bing": site.base}})
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO labels (name, created_at) VALUES ('owl', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO crawl_jobs (query, label_id, engines, params, status, found, downloaded, "
                              "new_images, exact_duplicates, rejected, reject_reasons, started_at, engine_stats, "
                              "attempts) VALUES ('owl', 1, 'bing', :p, 'queued', 0, 0, 0, 0, 0, '{}', "
                              "CURRENT_TIMESTAMP, '{}', 0)"), {"p": params})
        engine.dispose()
        upgraded = run_cli(["init"], location)
        assert upgraded.exit_code == 0, upgraded.output
        if backend == "postgres":
            assert "1 queued crawl job(s) carried over to the procrastinate queue" in upgraded.stdout
            assert crawl_jobs(location)[0][1:4] == ("queued", None, "todo")
            result = run_cli(["worker", "--until-empty", "--allow-private"], location)
        else:
            assert "1 queued crawl job(s) marked interrupted: queues need a PostgreSQL catalog now" in upgraded.stdout
            result = run_cli(["crawl", "--resume", "--allow-private"], location)
        assert result.exit_code == 0, result.output
    finally:
        site.close()
    assert catalog_rows(location, "SELECT count(*) FROM images") == [(11,)]


@pytest.mark.postgres
def test_jobs_cancel_drops_a_queued_job_and_stops_a_running_one(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = queue_site(delay=0.4, queries=["owl", "jay"])
    try:
        enqueue(pg_database, site, ["owl", "jay"])
        dropped = run_cli(["jobs", "cancel", "2"], pg_database)
        assert (dropped.exit_code, dropped.stdout) == (0, "Cancelled crawl job 2.\n")
        proc = worker(pg_database, "--name", "w", "--until-empty")
        wait_for(busy_job(pg_database, "w"), "the worker to get into job 1")
        stopped = run_cli(["jobs", "cancel", "1"], pg_database)
        assert stopped.exit_code == 0 and stopped.stdout.startswith("Asked the worker running crawl job 1 to stop")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    finally:
        site.close()
    assert [row[1:4] for row in crawl_jobs(pg_database)] == [("interrupted", "w", "aborted"),
                                                             (("cancelled", None, "cancelled"))]
    assert {j["id"]: j["status"] for j in json.loads(run_cli(["jobs", "--json"], pg_database).stdout)} == {
        1: "aborted", 2: "cancelled"}
    assert 0 < catalog_rows(pg_database, "SELECT count(*) FROM images")[0][0] < 11
    again = run_cli(["jobs", "cancel", "1"], pg_database)
    assert (again.exit_code, again.stderr) == (1, "Error: crawl job 1 has ended (aborted); there is nothing to "
                                                  "cancel\n")
    assert not any(path.startswith("/img/jay-") for path in site.hits)


@pytest.mark.postgres
def test_queued_embed_chunks_compute_each_vector_once_as_in_process(pg_database, tmp_path):
    import numpy as np

    from tests.helpers import digit_images
    from tests.test_audit import embed_args

    folder = tmp_path / "digits"
    for label, images in digit_images({"zero": 0, "one": 1}, 6).items():
        for n, data in enumerate(images):
            (folder / label).mkdir(parents=True, exist_ok=True)
            (folder / label / f"{n}.png").write_bytes(data)
    local = sqlite_twin(pg_database, tmp_path, folder)
    for location in (local, pg_database):
        assert run_cli(["verify"], location).exit_code == 0
    assert run_cli(embed_args("--size", "32"), local).exit_code == 0

    queued = json.loads(run_cli(embed_args("--size", "32", "--queue", "--chunk", "5", "--json"), pg_database).stdout)
    assert (queued["queued_jobs"], queued["images"]) == (3, 12)
    result = run_cli(["worker", "--queues", "embed", "--until-empty", "--concurrency", "2"], pg_database)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Embed ") == 3 and "12 computed" not in result.stdout

    def vectors(location: str) -> dict[str, np.ndarray]:
        rows = catalog_rows(location, "SELECT i.sha256, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id")
        return {sha: np.frombuffer(bytes(vector), dtype=np.float32) for sha, vector in rows}

    here, there = vectors(local), vectors(pg_database)
    assert here.keys() == there.keys() and len(here) == 12
    assert all(np.allclose(here[sha], there[sha], atol=1e-5) for sha in here)
    # A second queueing finds every chunk done: each job computes nothing.
    run_cli(embed_args("--size", "32", "--queue", "--chunk", "5"), pg_database)
    again = run_cli(["worker", "--queues", "embed", "--until-empty"], pg_database)
    assert again.stdout.count(": 0 computed, ") == 3


@pytest.mark.postgres
def test_a_queued_engines_check_is_run_and_recorded_by_a_worker(pg_database, tmp_path):
    init_catalog(pg_database, str(tmp_path / "images"))
    site = EngineSite()
    site.results["*"] = [site.add_image(f"{n}.jpg", photo_like(n, (64, 64), "JPEG")) for n in range(45)]
    try:
        queued = run_cli(["engines", "check", "bing", "--engine-url", f"bing={site.base}", "--queue"], pg_database)
        assert queued.exit_code == 0 and queued.stdout.startswith("Queued the engines check as job ")
        # A schedule that is not due now; --check-only beside --name must leave the worker its name.
        result = run_cli(["worker", "--queues", "engines", "--until-empty", "--allow-private", "--name", "probe",
                          "--check-engines", "0 0 1 1 *", "--check-only", "bing", "--json"], pg_database)
        assert result.exit_code == 0, result.output
    finally:
        site.close()
    assert json.loads(result.stdout) == {"worker": "probe", "jobs": ["Engines checked: bing ok"],
                                         "stopped_by_signal": False}
    assert catalog_rows(pg_database, "SELECT engine, verdict FROM engine_checks") == [("bing", "ok")]


@pytest.mark.postgres
@pytest.mark.parametrize("args, message", [
    (["--queues", "crawl,paint"], "Error: no queue named paint; the queues are crawl, verify, embed, engines\n"),
    (["--check-engines", "every hour"], "Error: --check-engines 'every hour' is not a cron schedule such as "
                                        "'0 * * * *' (hourly; a 6th field gives seconds)\n"),
])
def test_a_worker_refuses_unknown_queues_and_bad_schedules_in_one_line(pg_database, tmp_path, args, message):
    init_catalog(pg_database, str(tmp_path / "images"))
    result = run_cli(["worker", "--until-empty", *args], pg_database)
    assert (result.exit_code, result.stderr) == (1, message)


@pytest.mark.postgres
def test_jobs_queue_lists_every_queued_job_with_the_last_error_of_a_failed_one(pg_database, tmp_path):
    import shutil

    from tests.test_audit import weights

    init_catalog(pg_database, str(tmp_path / "images"))
    folder = cases(tmp_path / "in")
    assert run_cli(["import", str(folder)], pg_database).exit_code == 0
    assert run_cli(["verify", "--queue", "--chunk", "6"], pg_database).exit_code == 0
    copy = tmp_path / "lite0.pth"
    shutil.copy(weights(), copy)
    assert run_cli(["verify"], pg_database).exit_code == 0  # the chunks will find nothing left to check
    queued = run_cli(["embed", "--arch", "tf_efficientnet_lite0", "--weights", str(copy), "--size", "32",
                      "--device", "cpu", "--queue"], pg_database)
    assert queued.exit_code == 0, queued.output
    copy.unlink()  # the workers cannot read the weights: the embed job fails on each run
    result = run_cli(["worker", "--until-empty", "--retries", "1", "--retry-wait", "0.1", "--queues", "verify,embed"],
                     pg_database)
    assert result.exit_code == 0, result.output
    rows = json.loads(run_cli(["jobs", "queue", "--json"], pg_database).stdout)
    [(first, last)] = catalog_rows(pg_database, "SELECT min(id), max(id) FROM images WHERE status = 'ok'")
    assert [(r["task"], r["status"], r["runs"], r["covers"]) for r in rows] == [
        ("embed", "failed", 2, f"images {first}-{last}"), ("verify", "done", 1, "images 7-11"),
        ("verify", "done", 1, "images 1-6")]
    assert rows[0]["last_error"].startswith("FastclassError: ") and str(copy) in rows[0]["last_error"]
    assert rows[1]["last_error"] is None
    shown = run_cli(["jobs", "queue", "--status", "failed"], pg_database).stdout.splitlines()
    assert shown[0].split() == [str(rows[0]["id"]), "embed", "failed", "runs", "2", "images", f"{first}-{last}"]
    assert shown[1].startswith("       last error (on ") and str(copy) in shown[1]
