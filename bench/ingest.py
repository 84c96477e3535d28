"""bench/ingest: `fastclass import` of ~2,000 web-sized JPEGs vs a plain Pillow open+load loop, and bulk inserts.

Run: .venv/bin/python bench/ingest.py [--count 2000]   (writes the "Ingest" section of docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from bench.common import machine, peak_rss_mib, write_section  # noqa: E402
from db.models import Image as ImageRow  # noqa: E402
from db.models import Label, utcnow  # noqa: E402
from fastclass.catalog import init_catalog, open_catalog  # noqa: E402
from fastclass.ingest.record import ids_by_sha256, insert_rows  # noqa: E402
from fastclass.sample import write_web_jpegs  # noqa: E402

# The baseline in a fresh process holding only Pillow: the loop, and the peak memory of just that.
BASELINE_CHILD = """
import sys, time
from pathlib import Path
from PIL import Image
sys.path.insert(0, sys.argv[2])
from bench.common import peak_rss_mib
paths = sorted(Path(sys.argv[1]).iterdir())
started = time.perf_counter()
for path in paths:
    with Image.open(path) as img:
        img.load()
print(time.perf_counter() - started, peak_rss_mib())
"""


def run_baseline(root: Path) -> tuple[float, float]:
    """Seconds and peak MiB of a one-process Image.open + load() over the folder, timed inside a fresh child."""
    return _timed_child(["-c", BASELINE_CHILD, str(root), str(Path(__file__).resolve().parents[1])])


def run_import(root: Path, work: Path) -> tuple[float, float]:
    """The import service in a fresh child process, timed inside it as the baseline is (no start-up)."""
    location = str(work / "catalog.db")
    work.mkdir(parents=True, exist_ok=True)
    init_catalog(location)
    return _timed_child([__file__, "--child-import", str(root), location])


def _timed_child(args: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB) as printed by a child Python process run with args."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True).stdout
    elapsed, rss = (float(x) for x in out.split())
    return elapsed, rss


def child_import(root: Path, location: str) -> None:
    from fastclass.ingest.importer import import_folder

    catalog = open_catalog(location)
    started = time.perf_counter()
    with catalog.session() as session:
        result = import_folder(session, catalog.store, root, label="bench")
    elapsed = time.perf_counter() - started
    assert result.new_images == len(list(root.iterdir())), result
    print(elapsed, max(peak_rss_mib(), peak_rss_mib(children=True)))


def image_rows(n: int, label_id: int) -> list[dict]:
    now = utcnow()
    return [{"sha256": f"{i:064x}", "store_path": f"{i % 256:02x}/{i:064x}.jpg", "format": "JPEG", "width": 640,
             "height": 480, "mode": "RGB", "bytes": 50_000, "status": "pending", "reason": None,
             "label_id": label_id, "created_at": now, "updated_at": now} for i in range(n)]


def bulk_insert(work: Path, n: int) -> tuple[float, float, float]:
    """rows/s: SQLAlchemy Core executemany and fastclass's insert path (as record_batch runs it) vs raw sqlite3."""
    location = str(work / "bulk.db")
    init_catalog(location)
    catalog = open_catalog(location)
    results = []
    for fastclass_path in (False, True):
        with catalog.session() as session:
            session.execute(ImageRow.__table__.delete())
            label = session.merge(Label(id=1, name="bench"))
            session.flush()
            rows = image_rows(n, label.id)
            started = time.perf_counter()
            table = ImageRow.__table__
            for start in range(0, n, 500):
                chunk = rows[start:start + 500]
                if fastclass_path:
                    # What record_batch does: driver executemany, then the new ids by sha256.
                    insert_rows(session, table, chunk)
                    ids_by_sha256(session, [r["sha256"] for r in chunk])
                else:
                    session.execute(insert(table), chunk)
            session.commit()
            results.append(n / (time.perf_counter() - started))
    catalog.close()
    conn = sqlite3.connect(location)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("DELETE FROM images")
    conn.commit()
    rows = image_rows(n, 1)
    cols = list(rows[0])
    sql = f"INSERT INTO images ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    tuples = [tuple(r[c] for c in cols) for r in rows]
    started = time.perf_counter()
    for start in range(0, n, 500):
        conn.executemany(sql, tuples[start:start + 500])
    conn.commit()
    raw = n / (time.perf_counter() - started)
    conn.close()
    return results[0], results[1], raw


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallelism_probe() -> float:
    """How many cores' worth of CPU two processes get right now (2.0 on an idle 2-core machine)."""
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    _spin(5_000_000)
    one = time.perf_counter() - started
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_spin, [10, 10]))
        started = time.perf_counter()
        list(pool.map(_spin, [5_000_000] * 2))
        two = time.perf_counter() - started
    return 2 * one / two


def file_create_probe(folder: Path, data: bytes, n: int = 512) -> float:
    """ms to create and write one new file, spread over 256 new folders as the store spreads images. On ext4
    without a journal (this VM's disk) it grows tenfold for minutes after many files were deleted nearby:
    the kernel steps over recently freed inodes."""
    folders = [folder / f"{i:02x}" for i in range(256)]
    started = time.perf_counter()
    for sub in folders:
        sub.mkdir(parents=True)
    for i in range(n):
        (folders[i % 256] / str(i)).write_bytes(data)
    return (time.perf_counter() - started) / n * 1e3


def wait_for_quiet_file_system(work: Path, data: bytes, limit_s: float = 420, slow_ms: float = 0.1) -> float:
    """Seconds waited until creating a file costs under slow_ms (~0.04 ms when quiet). Freed inodes count as
    recent for 60 s, or 6 minutes while their inode table block is unwritten: a sync shortens the wait.
    Gives up after limit_s and lets the probes in the report tell."""
    os.sync()
    started = time.perf_counter()
    for attempt in itertools.count():
        cost = file_create_probe(work / f"settle{attempt}", data)
        waited = time.perf_counter() - started
        if cost < slow_ms or waited > limit_s:
            return waited
        print(f"creating a file costs {cost:.2f} ms (files were deleted nearby?): waiting for the file system "
              f"to settle ({waited:.0f} s so far)", file=sys.stderr)
        time.sleep(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child-import", nargs=2, metavar=("DIR", "CATALOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_import:
        child_import(Path(args.child_import[0]), args.child_import[1])
        return
    work = Path(tempfile.mkdtemp(prefix="fastclass-bench-"))
    try:
        images = work / "jpegs"
        paths = write_web_jpegs(images, args.count)
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        for path in paths:  # both contenders read the files from the page cache
            path.read_bytes()
        sample = paths[0].read_bytes()
        waited = wait_for_quiet_file_system(work, sample)
        # This machine's CPU share varies from minute to minute: interleave rounds; report best and median.
        loops, imports, probes, creates = [], [], [], []
        for attempt in range(args.rounds):
            probes.append(parallelism_probe())
            creates.append(file_create_probe(work / f"probe{attempt}", sample))
            os.sync()  # no write-back of earlier rounds' files during either contender's clock
            loops.append(run_baseline(images))
            os.sync()
            imports.append(run_import(images, work / f"import{attempt}"))
        loop_s, loop_rss = min(t for t, _ in loops), max(rss for _, rss in loops)
        import_s, import_rss = min(t for t, _ in imports), max(rss for _, rss in imports)
        ratios = [loop / t for (loop, _), (t, _) in zip(loops, imports)]
        inserts = [bulk_insert(work, args.rows) for _ in range(args.rounds)]
        core, core_returning, raw = (max(column) for column in zip(*inserts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # writes the freed inodes out, so a next run waits 1 minute for them instead of 6
    loop_rate, import_rate = args.count / loop_s, args.count / import_s
    body = f"""
`bench/ingest.py` ({time.strftime('%Y-%m-%d')}), machine: {machine()}.

{args.count} distinct 640x480 JPEGs ({size_mb:.0f} MB, random crops of the scikit-learn sample photos).

| contender | images/s | peak memory |
|---|---|---|
| baseline: one process, `Image.open` + `load()` | {loop_rate:.0f} | {loop_rss:.0f} MiB |
| `fastclass import` (sha256, header, draft decode, 3 perceptual hashes, store write, catalog rows) | {import_rate:.0f} | {import_rss:.0f} MiB (largest of parent, workers) |

Ingest / baseline: **{import_rate / loop_rate:.2f}x** best of {args.rounds} interleaved rounds (each contender's
fastest), **{statistics.median(ratios):.2f}x** median of the rounds' own ratios; target >= 1.5x. Per round,
ingest / baseline: {", ".join(f"{r:.2f}" for r in ratios)}.
Each contender runs in a fresh child process, timed inside it, so interpreter start-up (~0.5 s) counts for
neither: the baseline with only Pillow loaded, `import_folder` (the service behind `fastclass import`) with its
worker pool. Peak memory is the largest resident set of the child (Linux VmHWM) and, for the import, of its
workers. Each contender starts after a `sync`, so that neither pays for writing back an earlier round's files.

This VM's CPU share and file system vary from minute to minute, so each round also records two probes. Cores'
worth of CPU that two processes got (2.00 on an idle 2-core machine): {", ".join(f"{p:.2f}" for p in probes)}.
ms to create one new 48 KB file (ext4 without a journal steps over recently freed inodes, so this grows
tenfold for minutes after a mass delete, such as the test suite's clean-up; ~0.05 ms otherwise):
{", ".join(f"{c:.2f}" for c in creates)} (the bench first waited {waited:.0f} s for it to drop under 0.1 ms). Ingest writes
every image into the store; the baseline writes nothing.

Catalog bulk insert of {args.rows:,} image rows in batches of 500, one transaction:

| path | rows/s | vs raw |
|---|---|---|
| raw `sqlite3` executemany | {raw:,.0f} | 1.00 |
| SQLAlchemy Core `insert(images)` executemany through the session | {core:,.0f} | {core / raw:.2f} |
| fastclass `record_batch`'s path: `insert_rows` (driver executemany in the session) + ids by sha256 | {core_returning:,.0f} | {core_returning / raw:.2f} |

Target: fastclass's bulk insert >= 0.65x raw: **{"met" if core_returning / raw >= 0.65 else "not met"}**
({core_returning / raw:.2f}x). Best of {args.rounds} runs each; the rows are built before the clock starts.
"""
    print(body)
    write_section("Ingest", body)


if __name__ == "__main__":
    main()
