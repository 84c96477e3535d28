"""bench/split: assign train/valid for 1M catalog rows, grow by 20% and extend, then freeze a snapshot.

Run: .venv/bin/python bench/split.py [--images 1000000] [--labels 100]   (writes "Split and snapshot")
The catalog is filled with plain sqlite3 (synthetic rows: 1% of images are near-duplicate pairs of
a keeper and a duplicate). Each timed step runs in a fresh child process so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, peak_rss_mib, write_section  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "split"


def fill(location: Path, first: int, count: int, labels: int) -> None:
    """Insert `count` ok images (ids first..first+count-1); every 200th and the next form a duplicate pair."""
    now = "2026-01-01 00:00:00"
    conn = sqlite3.connect(location)
    with conn:
        if first == 1:
            conn.executemany("INSERT INTO labels (id, name, created_at) VALUES (?, ?, ?)",
                             [(i + 1, f"class_{i:03d}", now) for i in range(labels)])
        groups, rows, members = [], [], {}
        for image_id in range(first, first + count):
            if image_id % 200 == 0 and image_id + 1 < first + count:
                groups.append((image_id, "phash", 10, 0, image_id, 2, 1, 0, now))
                members[image_id] = members[image_id + 1] = image_id
        conn.executemany("INSERT INTO duplicate_groups (id, hash_kind, threshold, flip, keeper_id, size, "
                         "label_count, is_conflict, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", groups)
        for image_id in range(first, first + count):
            sha = hashlib.sha256(image_id.to_bytes(8, "big")).hexdigest()
            group = members.get(image_id)
            label = (group or image_id) % labels + 1
            status = "duplicate" if group is not None and group != image_id else "ok"
            rows.append((image_id, sha, f"{sha[:2]}/{sha}.jpg", "JPEG", 640, 480, "RGB", 50_000, status, label,
                         group, now, now))
        conn.executemany("INSERT INTO images (id, sha256, store_path, format, width, height, mode, bytes, status, "
                         "label_id, dup_group_id, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()


def child(step: str, location: str) -> None:
    from fastclass.catalog import open_catalog
    from fastclass.dataset.snapshot import create_snapshot
    from fastclass.dataset.split import assign_splits

    catalog = open_catalog(location)
    started = time.perf_counter()
    with catalog.session() as session:
        if step == "snapshot":
            info = create_snapshot(session, "bench")
            detail = {"rows": info.images, "valid": info.valid}
        else:
            result = assign_splits(session)
            worst = max(abs(r.valid - round(r.total * result.params.valid_pct)) for r in result.labels)
            detail = {"assigned": result.assigned, "worst_label_offset": worst}
    seconds = time.perf_counter() - started
    catalog.close()
    print(json.dumps({"seconds": seconds, "rss": peak_rss_mib(), **detail}))


def run_step(step: str, location: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, str(location)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def checks(location: Path, before: dict[int, int]) -> tuple[int, int]:
    """(old images that changed side, duplicate groups split across sides) after the growth step."""
    conn = sqlite3.connect(location)
    moved = sum(1 for image_id, side in conn.execute("SELECT image_id, is_valid FROM split_assignments")
                if image_id in before and before[image_id] != side)
    straddling = conn.execute("SELECT count(*) FROM (SELECT i.dup_group_id FROM images i JOIN split_assignments a "
                              "ON a.image_id = i.id WHERE i.dup_group_id IS NOT NULL GROUP BY i.dup_group_id "
                              "HAVING count(DISTINCT a.is_valid) > 1)").fetchone()[0]
    conn.close()
    return moved, straddling


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from fastclass.catalog import init_catalog

    OUT.mkdir(parents=True, exist_ok=True)
    location = OUT / "catalog.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{location}{suffix}").unlink(missing_ok=True)
    init_catalog(str(location), str(OUT / "store"))
    grown = args.images // 5
    fill(location, 1, args.images, args.labels)
    first = run_step("split", location)
    conn = sqlite3.connect(location)
    before = dict(conn.execute("SELECT image_id, is_valid FROM split_assignments").fetchall())
    conn.close()
    fill(location, args.images + 1, grown, args.labels)
    second = run_step("split", location)
    moved, straddling = checks(location, before)
    snap = run_step("snapshot", location)
    target = 30.0
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Catalog: SQLite, {args.images:,} ok images in {args.labels} labels (1% in near-duplicate pairs), "
        f"then {grown:,} more. `python bench/split.py --images {args.images}`; each step in a fresh process.",
        "",
        "| step | rows | seconds | peak RSS MiB | target |",
        "|---|---|---|---|---|",
        f"| `split` (first, all rows) | {first['assigned']:,} assigned | {first['seconds']:.1f} | {first['rss']:.0f} | "
        f"< {target:.0f} s, < 2048 MiB |",
        f"| `split` after +20% | {second['assigned']:,} assigned | {second['seconds']:.1f} | {second['rss']:.0f} | |",
        f"| `snapshot create` | {snap['rows']:,} rows | {snap['seconds']:.1f} | {snap['rss']:.0f} | "
        f"< {target:.0f} s, < 2048 MiB |",
        "",
        f"Checks: {moved} old image(s) changed side after growth (must be 0); {straddling} duplicate group(s) "
        f"straddle train and valid (must be 0); largest per-label offset from round(0.2 x n): "
        f"{first['worst_label_offset']} then {second['worst_label_offset']} image(s).",
    ]
    body = "\n".join(lines)
    print(body)
    if args.images >= 1_000_000:
        write_section("Split and snapshot", body)


if __name__ == "__main__":
    main()
