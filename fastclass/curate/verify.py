"""`fastclass verify`: fully decode images, mark them ok or rejected with a precise reason; `--prune` frees rejects."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from db.models import Image as ImageRow
from fastclass.errors import FastclassError, StopRequested
from fastclass.ingest import MAX_PIXELS
from fastclass.ingest.analyze import MEMORY_REASON, decode_reason, fits_memory_budget, reason_kind
from fastclass.labels import existing_label_id
from fastclass.lifecycle import Actor, Status, move, move_each, snapshots_holding, take_write_lock
from fastclass.store import Store
from fastclass.workers import Budget, IsolatedPool

BATCH_SIZE = 500
EXIF_ORIENTATION = 0x0112
SWAPPED_ORIENTATIONS = {5, 6, 7, 8}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerifyRules:
    """What makes an image unusable; the defaults suit photo classification."""

    min_width: int = 32
    min_height: int = 32
    max_pixels: int = MAX_PIXELS
    max_aspect: float = 10.0
    animated: str = "reject"  # or "first-frame"


@dataclass(frozen=True)
class Verdict:
    image_id: int
    expect: str
    """The status the image had when it was read: the verdict applies only if it still has it."""
    status: str
    reason: str | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None


@dataclass
class VerifyResult:
    checked: int = 0
    ok: int = 0
    rejected: Counter = field(default_factory=Counter)
    changed_meanwhile: int = 0
    """Verdicts not written because another command (a reviewer, dedup) changed the image while it was checked."""
    pruned: "PruneResult | None" = None

    def as_dict(self) -> dict:
        data = {"checked": self.checked, "ok": self.ok, "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()), "changed_meanwhile": self.changed_meanwhile}
        if self.pruned is not None:
            data["pruned"] = self.pruned.removed
            data["held_by_snapshot"] = dict(self.pruned.held)
        return data


def parse_size(text: str) -> tuple[int, int]:
    """'200x150' -> (200, 150)."""
    try:
        w, h = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise FastclassError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 100x100") from exc
    if w < 1 or h < 1:
        raise FastclassError(f"size {text!r} must be positive")
    return w, h


def check_image(path: Path, rules: VerifyRules) -> tuple[str, str | None, int | None, int | None, str | None]:
    """(status, reason, width, height, mode) for one stored file; never raises for a bad image.

    Run it in an IsolatedPool for untrusted files: a decoder that hangs, exhausts memory or crashes its
    process is caught there, everything a decoder raises is caught here.
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return "rejected", "file missing from the image store", None, None, None
    except OSError as exc:
        return "rejected", f"unreadable file ({exc.strerror or exc})", None, None, None
    facts: list = [None, None, None]
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _check_open(fh, rules, facts)
        except Exception as exc:  # fuzzed files make Pillow raise anything (TypeError, SyntaxError, ...)
            return "rejected", decode_reason(exc), *facts


def _check_open(fh, rules: VerifyRules, facts: list) -> tuple[str, str | None, int | None, int | None, str | None]:
    try:
        img = Image.open(fh)
    except Exception as exc:
        return "rejected", f"not an image ({type(exc).__name__})", None, None, None
    width, height = img.size
    mode = img.mode
    facts[:] = [width, height, mode]
    if width <= 0 or height <= 0:
        return "rejected", f"not an image (its header says {width}x{height})", None, None, mode
    if width * height > rules.max_pixels:
        return ("rejected", f"decompression bomb ({width}x{height} pixels is over the limit of "
                f"{rules.max_pixels})", width, height, mode)
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and rules.animated == "reject":
        return "rejected", f"animated ({frames} frames)", width, height, mode
    if img.format == "JPEG":
        # A reduced-size decode still decodes every entropy-coded block, so truncation and corrupt
        # data are caught, at a fraction of the cost of a full-size IDCT.
        img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
    if not fits_memory_budget(img):
        return "rejected", MEMORY_REASON, width, height, mode
    img.load()
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION)
    except Exception:
        orientation = None
    if orientation in SWAPPED_ORIENTATIONS:
        width, height = height, width
    if width < rules.min_width or height < rules.min_height:
        return ("rejected", f"too small ({width}x{height} is under {rules.min_width}x{rules.min_height})",
                width, height, mode)
    if max(width, height) / min(width, height) > rules.max_aspect:
        return "rejected", f"extreme aspect ratio ({width}x{height})", width, height, mode
    return "ok", None, width, height, mode


def _check_task(task: tuple[int, str, str, VerifyRules]) -> Verdict:
    image_id, expect, path, rules = task
    status, reason, width, height, mode = check_image(Path(path), rules)
    return Verdict(image_id, expect, status, reason, width, height, mode)


def to_verify(session: Session, columns: tuple, recheck: bool = False, label: str | None = None,
              id_range: tuple[int, int] | None = None) -> Select:
    """The images a verify checks: pending ones (every not-deleted one with recheck), of `label`, with an id
    in `id_range`; in-process and queued verify choose them here alike."""
    query = select(*columns).where(ImageRow.status.in_([Status.PENDING, Status.OK, Status.REJECTED]) if recheck
                                   else ImageRow.status == Status.PENDING)
    if label is not None:
        query = query.where(ImageRow.label_id == existing_label_id(session, label))
    if id_range is not None:
        query = query.where(ImageRow.id.between(*id_range))
    return query


def verify_images(session: Session, store: Store, rules: VerifyRules = VerifyRules(), label: str | None = None,
                  recheck: bool = False, workers: int | None = None, progress: Progress | None = None,
                  budget: Budget = Budget(), id_range: tuple[int, int] | None = None) -> VerifyResult:
    """Check pending images (every not-deleted one with recheck), of `label` and with an id in `id_range`
    (a queued chunk) when given; commits every BATCH_SIZE verdicts.

    A verdict is written only if the image is still in the status it had when it was read, so a
    decision or a dedup made while verify runs is never reverted. Each file is decoded in isolation
    (see IsolatedPool): one that hangs, exhausts the budget or crashes its worker is rejected alone.
    """
    query = to_verify(session, (ImageRow.id, ImageRow.status, ImageRow.store_path), recheck, label, id_range)
    rows = session.execute(query.order_by(ImageRow.id)).all()
    # End the read: on SQLite a transaction that read before another process wrote cannot write later.
    session.commit()
    store.fetch(rel for _, _, rel in rows)
    tasks = [(image_id, status, str(store.path(rel)), rules) for image_id, status, rel in rows]
    result = VerifyResult()
    if not tasks:
        return result
    batch: list[Verdict] = []
    pool = IsolatedPool(min(workers or os.cpu_count() or 1, max(1, len(tasks))), budget)
    try:
        verdicts = pool.map(_check_task, tasks, key=itemgetter(2), failed=_failed_check)
        for done, verdict in enumerate(verdicts, start=1):
            _count(result, verdict)
            batch.append(verdict)
            if len(batch) >= BATCH_SIZE:
                result.changed_meanwhile += _save(session, batch)
                batch = []
            if progress:
                progress(done, len(tasks))
    except StopRequested:  # a worker shutting down: keep the verdicts reached, the rest are checked on a re-run
        _save(session, batch)
        raise
    finally:
        pool.close()
    result.changed_meanwhile += _save(session, batch)
    return result


def check_isolated(path: Path, rules: VerifyRules, budget: Budget = Budget()) -> tuple[str, str | None]:
    """(status, reason) of one file, decoded in a worker of its own (a keep checks the bytes this way)."""
    with IsolatedPool(1, budget) as pool:
        verdict, failure = pool.outcome(pool.submit(_check_task, (0, "", str(path), rules), str(path)))
    return ("rejected", failure) if failure else (verdict.status, verdict.reason)


def _failed_check(task: tuple[int, str, str, VerifyRules], reason: str) -> Verdict:
    return Verdict(task[0], task[1], "rejected", reason)


def _count(result: VerifyResult, verdict: Verdict) -> None:
    result.checked += 1
    if verdict.status == Status.OK:
        result.ok += 1
    else:
        result.rejected[reason_kind(verdict.reason)] += 1


def _save(session: Session, verdicts: Sequence[Verdict]) -> int:
    """Write verdicts (compare-and-set on the status read) and commit; returns how many were not applied."""
    if not verdicts:
        return 0
    rows = [{"id": v.image_id, "expect": v.expect, "status": v.status, "reason": v.reason,
             **({"width": v.width, "height": v.height, "mode": v.mode} if v.width else {})} for v in verdicts]
    applied = 0
    for group in ([r for r in rows if "width" in r], [r for r in rows if "width" not in r]):
        applied += move_each(session, Actor.VERIFY, group)
    session.commit()
    return max(0, len(rows) - applied)


@dataclass
class PruneResult:
    removed: int = 0
    held: Counter = field(default_factory=Counter)
    """Images whose file was kept because snapshots hold them, per snapshot name."""

    def as_dict(self) -> dict:
        return {"removed": self.removed, "held_by_snapshot": dict(self.held)}


def prune_rejected(session: Session, store: Store) -> PruneResult:
    """Remove the files of rejected and deleted images, except those a snapshot holds.

    Pruned rows stay (status deleted, reason kept). A rejected image that a snapshot holds keeps its file
    and its status: snapshots must stay exportable and trainable.
    """
    result = PruneResult()
    candidates = session.execute(select(ImageRow.id, ImageRow.status, ImageRow.store_path)
                                 .where(ImageRow.status.in_((Status.REJECTED, Status.DELETED)))).all()
    held = snapshots_holding(session, [c.id for c in candidates])
    for image_id, names in held.items():
        for snap in names:
            result.held[snap] += 1
    newly = [c.id for c in candidates if c.status == Status.REJECTED and c.id not in held]
    move(session, Actor.PRUNE, newly, [Status.REJECTED], Status.DELETED)
    session.commit()
    # Rows are committed as deleted before their files go, so a crash here leaves at most a spare file,
    # which the next prune removes (it also sweeps files of rows deleted by review). Each chunk's rows
    # are locked while their files go and re-read under the lock: an image a reviewer revived meanwhile
    # keeps its file, and a revival waits for the lock and then finds the file gone (and refuses).
    free = [c.id for c in candidates if c.id not in held]
    for start in range(0, len(free), 500):
        chunk = free[start:start + 500]
        take_write_lock(session)
        for image_id, relpath in session.execute(
                select(ImageRow.id, ImageRow.store_path)
                .where(ImageRow.id.in_(chunk), ImageRow.status == Status.DELETED)
                .with_for_update()).all():
            if store.exists(relpath):
                store.remove(relpath)
                result.removed += 1
        session.commit()
    return result
