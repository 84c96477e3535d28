"""bench/verify: `verify` of ~2,000 640x480 JPEGs vs a plain one-process Pillow open+load loop.

Run: .venv/bin/python bench/verify.py [--count 2000]   (writes the "Verify" section of docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from bench.ingest import parallelism_probe, pillow_loop  # noqa: E402
from fastclass.catalog import init_catalog, open_catalog  # noqa: E402
from fastclass.sample import write_web_jpegs  # noqa: E402


def child_verify(location: str) -> None:
    from sqlalchemy import update

    from db.models import Image
    from fastclass.curate.verify import verify_images

    catalog = open_catalog(location)
    with catalog.session() as session:
        session.execute(update(Image).values(status="pending"))
        session.commit()
        started = time.perf_counter()
        result = verify_images(session, catalog.store)
        elapsed = time.perf_counter() - started
    assert result.ok == result.checked, result
    print(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child-verify", metavar="CATALOG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_verify:
        child_verify(args.child_verify)
        return
    work = Path(tempfile.mkdtemp(prefix="fastclass-bench-"))
    try:
        paths = write_web_jpegs(work / "jpegs", args.count)
        location = str(work / "catalog.db")
        init_catalog(location)
        subprocess.run([sys.executable, "-m", "fastclass", "--catalog", location, "-q", "import",
                        str(work / "jpegs"), "--label", "bench"], check=True, stdout=subprocess.DEVNULL)
        pillow_loop(paths[:50])
        loops, verifies, probes = [], [], []
        for _ in range(args.rounds):
            probes.append(parallelism_probe())
            loops.append(pillow_loop(paths))
            out = subprocess.run([sys.executable, __file__, "--child-verify", location],
                                 check=True, capture_output=True, text=True).stdout
            verifies.append(float(out.split()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loop_rate, verify_rate = args.count / min(loops), args.count / min(verifies)
    body = f"""
`bench/verify.py` ({time.strftime('%Y-%m-%d')}), machine: {machine()}.

{args.count} distinct 640x480 JPEGs; best of {args.rounds} interleaved rounds; parallelism probe per round:
{", ".join(f"{p:.2f}" for p in probes)} (cores' worth of CPU two processes got).

| contender | images/s |
|---|---|
| baseline: one process, `Image.open` + `load()` | {loop_rate:.0f} |
| `verify_images` (worker pool, reduced-size JPEG decode of every block, EXIF, rules, catalog updates) | {verify_rate:.0f} |

Verify / baseline: **{verify_rate / loop_rate:.2f}x** (target >= 1.6x on 2 cores).
"""
    print(body)
    write_section("Verify", body)


if __name__ == "__main__":
    main()
