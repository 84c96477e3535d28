"""bench/startup: how fast commands that only read the catalog answer, against Python itself and --help.

Run: .venv/bin/python bench/startup.py [--images 200] [--rounds 15]   (writes "Startup" in docs/benchmarks.md)
A real catalog of 200 imported images; each command runs as a fresh process, rounds interleaved, and the
median wall time is reported with its ratio to `python -c pass` (the floor no command can beat) and to
`fastclass --help`. Ratios hold on a busy machine better than seconds do. Target: `stats` <= 0.4 s.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402


def make_catalog(folder: Path, images: int) -> str:
    import random

    from fastclass.sample import jpeg_bytes, load_photo, random_crop

    catalog = str(folder / "catalog.db")
    source = folder / "in" / "things"
    source.mkdir(parents=True)
    photo, rng = load_photo("china.jpg"), random.Random(0)
    for n in range(images):
        (source / f"{n}.jpg").write_bytes(jpeg_bytes(random_crop(photo, (96, 96), rng), 85))
    for args in (["init"], ["import", str(source.parent)], ["verify"]):
        subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", *args], check=True,
                       capture_output=True)
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        catalog = make_catalog(Path(tmp), args.images)
        commands = {
            "`python -c pass`": [sys.executable, "-c", "pass"],
            "`fastclass --help`": [sys.executable, "-m", "fastclass", "--help"],
            "`fastclass stats`": [sys.executable, "-m", "fastclass", "--catalog", catalog, "stats"],
            "`fastclass labels`": [sys.executable, "-m", "fastclass", "--catalog", catalog, "labels"],
            "`fastclass jobs`": [sys.executable, "-m", "fastclass", "--catalog", catalog, "jobs"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True)
                times[name].append(time.perf_counter() - started)
                assert done.returncode == 0, done.stderr
        for name, command in commands.items():
            probe = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; "
                                    "subprocess.run(sys.argv[1:], capture_output=True); "
                                    "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
                                    "print(r.ru_utime + r.ru_stime)", *command], capture_output=True, text=True)
            cpu[name].append(float(probe.stdout))
    floor = statistics.median(times["`python -c pass`"])
    helped = statistics.median(times["`fastclass --help`"])
    rows = [f"| {name} | {statistics.median(t):.3f} | {cpu[name][0]:.2f} | {statistics.median(t) / floor:.1f}x | "
            f"{statistics.median(t) / helped:.1f}x |" for name, t in times.items()]
    stats = statistics.median(times["`fastclass stats`"])
    body = (f"`bench/startup.py` ({time.strftime('%Y-%m-%d')}), machine: {machine()}.\n\n"
            f"A catalog of {args.images} imported and verified images; each command a fresh process, "
            f"{args.rounds} interleaved rounds, median wall seconds; CPU seconds from one more run.\n\n"
            "| command | median s | CPU s | / `python -c pass` | / `--help` |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n"
            f"`fastclass stats`: **{stats:.2f} s** (target <= 0.4 s). Commands that only read the catalog import "
            "neither Pillow, NumPy, SciPy, alembic nor torch (tests/test_cli.py checks the imports); what is left "
            "is the interpreter, click and SQLAlchemy. Before: `stats` imported Pillow, NumPy and SciPy (through the "
            "ingest module) and alembic parsed every migration on each open, about 1 s.")
    write_section("Startup", body)
    print(body)


if __name__ == "__main__":
    main()
