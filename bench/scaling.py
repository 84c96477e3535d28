"""bench/scaling: the same import on SQLite and PostgreSQL, and crawl workers on one PostgreSQL catalog.

Run: .venv/bin/python bench/scaling.py [--images 2000] [--jobs 12] [--per-job 100] [--workers 1,2,4]
         [--repeat 1] [--baseline CHECKOUT]
(writes "Scaling" in docs/benchmarks.md; needs the PostgreSQL server of FASTCLASS_TEST_POSTGRES, default
postgresql+psycopg://postgres@127.0.0.1:5432/test, where it creates and drops its own databases)

Import: `fastclass import` of --images distinct 640x480 JPEGs into a fresh catalog, whole command.
Workers: --jobs crawl jobs of --per-job distinct 800x600 JPEGs each (the `urls` engine) queued with
`crawl --queue`, then N `fastclass worker --until-empty --allow-private` processes started together; the time
from their start to the last one's end, and the CPU-seconds they used, against a local server that adds
--latency to every response. --baseline runs the same worker measurement with the fastclass of another
checkout (e.g. `git worktree add /tmp/before <commit>`), for a before/after table on the same machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "scaling"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def fastclass(catalog: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; with cwd, the fastclass package of that checkout (`-m` imports from cwd)."""
    return subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", *args], check=True,
                          capture_output=True, text=True, cwd=cwd)


@contextlib.contextmanager
def pg_database(server: str) -> Iterator[str]:
    import psycopg

    name = f"fastclass_bench_{uuid.uuid4().hex[:8]}"
    libpq = server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def time_import(catalog: str, store: Path, images: Path) -> float:
    fastclass(catalog, "init", "--store", str(store))
    started = time.perf_counter()
    fastclass(catalog, "import", str(images), "--label", "bench")
    return time.perf_counter() - started


def time_workers(catalog: str, store: Path, url_files: list[Path], workers: int,
                 code: Path | None = None) -> tuple[float, float, int]:
    """(seconds, CPU-seconds of the workers, images stored) for N workers on the queued jobs."""
    fastclass(catalog, "init", "--store", str(store), cwd=code)
    for n, urls in enumerate(url_files):
        fastclass(catalog, "crawl", "--urls", str(urls), "--label", f"class{n}", "--max", "100000", "--queue",
                  cwd=code)
    before = os.times()
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", "worker",
                               "--until-empty", "--poll", "0.2", "--allow-private", "--name", f"bench{w}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=code)
             for w in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed: {err[-2000:]}")
    seconds = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    stored = json.loads(fastclass(catalog, "stats", "--json", cwd=code).stdout)["images"]["total"]
    return seconds, cpu, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--per-job", type=int, default=100)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=1, help="Runs per code and worker count (median shown).")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="Also measure the workers of the fastclass in this checkout (before/after).")
    args = parser.parse_args()
    from bench.ingest import parallelism_probe

    server_url = os.environ.get("FASTCLASS_TEST_POSTGRES", PG_DEFAULT)
    from fastclass.sample import write_web_jpegs

    shutil.rmtree(OUT, ignore_errors=True)
    images = OUT / "import"
    write_web_jpegs(images, args.images)
    sqlite_seconds = time_import(str(OUT / "sqlite.db"), OUT / "sqlite-store", images)
    with pg_database(server_url) as pg:
        pg_seconds = time_import(pg, OUT / "pg-store", images)

    web = OUT / "web"
    write_web_jpegs(web, args.jobs * args.per_job, size=(800, 600), seed=1)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crawl.py")), "--serve", str(web),
                               str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        names = sorted(p.name for p in web.glob("*.jpg"))
        url_files = []
        for job in range(args.jobs):
            urls = OUT / f"urls-{job}.txt"
            chunk = names[job * args.per_job:(job + 1) * args.per_job]
            urls.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in chunk))
            url_files.append(urls)
        counts = [int(w) for w in args.workers.split(",")]
        runs: dict[tuple[str, int], list[tuple[float, float, int, float]]] = {}
        # Repetitions interleave the two codes, so that a slow spell of this VM hits both alike.
        for _ in range(args.repeat):
            for label, code in [("baseline", args.baseline)] * bool(args.baseline) + [("this", None)]:
                for workers in counts:
                    probe = parallelism_probe()
                    with pg_database(server_url) as pg:
                        seconds, cpu, stored = time_workers(pg, OUT / f"workers-{label}-{workers}", url_files,
                                                            workers, code)
                    runs.setdefault((label, workers), []).append((seconds, cpu, stored, probe))
                    print(f"{label}: {workers} worker(s): {stored} images in {seconds:.1f} s, {cpu:.1f} CPU-s "
                          f"(probe {probe:.2f})", flush=True)
    finally:
        server.terminate()
    total = args.jobs * args.per_job
    rows = []
    for (label, workers), samples in runs.items():
        seconds = statistics.median(s for s, *_ in samples)
        rows.append((label, workers, seconds, min(s for s, *_ in samples), max(s for s, *_ in samples),
                     statistics.median(c for _, c, *_ in samples), min(n for _, _, n, _ in samples),
                     min(p for *_, p in samples)))
    ones = {label: s for label, w, s, *_ in rows if w == counts[0]}
    table = "\n".join(
        f"| {'this commit' if label == 'this' else f'before ({_commit(args.baseline)})'} | {w} | {stored:,} of "
        f"{total:,} | {s:.1f} ({low:.1f}-{high:.1f}) | {stored / s:.0f} | {ones[label] / s:.2f}x | {cpu:.1f} | "
        f"{probe:.2f} |" for label, w, s, low, high, cpu, stored, probe in rows)
    body = f"""
`bench/scaling.py` ({time.strftime('%Y-%m-%d')}), machine: {machine()}; PostgreSQL at {server_url.split('@')[-1]}
on the same machine.

`fastclass import` of {args.images:,} distinct 640x480 JPEGs into a fresh catalog (whole command, interpreter
start-up included):

| catalog | seconds | images/s |
|---|---|---|
| SQLite | {sqlite_seconds:.1f} | {args.images / sqlite_seconds:.0f} |
| PostgreSQL | {pg_seconds:.1f} | {args.images / pg_seconds:.0f} |

Crawl workers on one PostgreSQL catalog: {args.jobs} jobs of {args.per_job} distinct 800x600 JPEGs queued with
`crawl --queue` (defaults: 8 downloads, 4 per host), then N `fastclass worker --until-empty` processes
started together; a local server adds {args.latency * 1000:.0f} ms to every response. Seconds from the workers'
start to the last one's end and the CPU-seconds all workers used, median of {args.repeat} runs (the two codes
taking turns), and the lowest of the parallelism probes taken before each run (how many cores' worth of
CPU two processes got: 2.0 on an idle 2-core machine):

| code | workers | images stored | seconds, median (range) | images/s | vs 1 worker | worker CPU-s | lowest probe |
|---|---|---|---|---|---|---|---|
{table}

One worker runs one job at a time, and one job downloads 4 images at once from one host, so it is bound by
the latency; more workers (or `--concurrency`) overlap more jobs until the 2 cores are the limit (each worker
also decodes and hashes in its own processes, and its start-up is inside these seconds).
"""
    print(body)
    write_section("Scaling", body)


def _commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h"], capture_output=True,
                          text=True).stdout.strip() or str(checkout)


if __name__ == "__main__":
    main()
