"""`fastclass check`: re-hash the image store against the catalog; find missing, altered and orphan files.

The catalog names every file by its sha256, so a file whose bytes no longer hash to its name was changed
behind the catalog's back (an editor saving over a hard-linked export, a disk fault). `check` reads every
stored file in worker processes and compares; with `repair` it does what can be done safely: orphans
(files no row claims) are removed, and images whose file is missing or altered are rejected with that
reason (through the lifecycle, like verify), their altered bytes moved aside to .quarantine/ rather than
deleted. Deleted images are expected to have no file (prune freed it).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image
from fastclass.lifecycle import Actor, Status, move, snapshots_holding
from fastclass.workers import map_in_workers

QUARANTINE = ".quarantine"
MISSING_REASON = "file missing from the image store"
ALTERED_REASON = "file altered in the image store (its bytes no longer match its sha256)"
Progress = Callable[[int, int], None]


@dataclass
class CheckResult:
    files: int = 0
    rows: int = 0
    missing: list[int] = field(default_factory=list)
    """Images (not deleted) whose file is not in the store."""
    altered: list[int] = field(default_factory=list)
    """Images whose file's bytes no longer hash to its sha256."""
    orphans: list[str] = field(default_factory=list)
    """Stored files that no catalog row claims."""
    in_snapshots: dict[str, int] = field(default_factory=dict)
    """Missing or altered images per snapshot that holds them (those snapshots cannot be exported whole)."""
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.altered or self.orphans)

    def as_dict(self) -> dict:
        return {"files": self.files, "rows": self.rows, "missing": self.missing, "altered": self.altered,
                "orphans": self.orphans, "in_snapshots": self.in_snapshots, "repaired": self.repaired,
                "clean": self.clean}


def file_sha256(path: str) -> str | None:
    """The sha256 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _hash_task(task: tuple[int, str]) -> tuple[int, str | None]:
    image_id, path = task
    return image_id, file_sha256(path)


def find_damage(store, rows: Sequence[tuple[int, str, str]], present: set[str], workers: int | None = None,
                progress: Progress | None = None) -> tuple[list[int], list[int]]:
    """(missing, altered) image ids among rows of (image id, sha256, relpath): not among the present
    relpaths, or bytes that no longer hash to the sha256 (hashed in worker processes)."""
    missing = sorted(image_id for image_id, _, rel in rows if rel not in present)
    stored = [(image_id, sha, rel) for image_id, sha, rel in rows if rel in present]
    store.fetch(rel for _, _, rel in stored)
    expected = {image_id: sha for image_id, sha, _ in stored}
    tasks = [(image_id, str(store.path(rel))) for image_id, _, rel in stored]
    altered = []
    for done, (image_id, digest) in enumerate(
            map_in_workers(_hash_task, tasks, workers or os.cpu_count() or 1, chunksize=32), start=1):
        if digest != expected[image_id]:
            altered.append(image_id)
        if progress:
            progress(done, len(tasks))
    return missing, sorted(altered)


def check_store(session: Session, store, repair: bool = False, workers: int | None = None,
                progress: Progress | None = None) -> CheckResult:
    """Compare every stored file with its catalog row; with repair, fix what can be fixed (commits)."""
    rows = session.execute(select(Image.id, Image.sha256, Image.store_path, Image.status)).all()
    result = CheckResult(rows=len(rows))
    present = set(store.iter_files())
    result.orphans = sorted(present - {row.store_path for row in rows})
    # A deleted image is expected to have no file (prune freed it); one that still has it is hashed.
    wanted = [(row.id, row.sha256, row.store_path) for row in rows
              if row.status != Status.DELETED or row.store_path in present]
    result.missing, result.altered = find_damage(store, wanted, present, workers, progress)
    result.files = len(wanted) - len(result.missing)
    per_snapshot: dict[str, int] = defaultdict(int)
    for names in snapshots_holding(session, result.missing + result.altered).values():
        for name in names:
            per_snapshot[name] += 1
    result.in_snapshots = dict(sorted(per_snapshot.items()))
    if repair:
        _repair(session, store, result, {row.id: row.store_path for row in rows})
    return result


def _repair(session: Session, store, result: CheckResult, paths: dict[int, str]) -> None:
    live = [Status.PENDING, Status.OK, Status.DUPLICATE]
    result.repaired["missing_rejected"] = move(session, Actor.CHECK, result.missing, live, Status.REJECTED,
                                               reason=MISSING_REASON)
    result.repaired["altered_rejected"] = move(session, Actor.CHECK, result.altered, live, Status.REJECTED,
                                               reason=ALTERED_REASON)
    session.commit()
    for image_id in result.altered:
        _quarantine(store, paths[image_id])
    result.repaired["altered_quarantined"] = len(result.altered)
    for rel in result.orphans:
        store.remove(rel)
    result.repaired["orphans_removed"] = len(result.orphans)


def _quarantine(store, relpath: str) -> None:
    """Move an altered file out of the store's namespace (local stores); S3 objects are removed."""
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        target = root / QUARANTINE / relpath.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / relpath, target)
    else:
        store.remove(relpath)
