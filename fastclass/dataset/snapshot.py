"""`fastclass snapshot`: immutable, named freezes of (image sha256, label, split), their diffs and exports.

A snapshot is written once and sealed: its row gets its digest last, and database triggers (migration
0003) refuse any later change to the row or its items. This module offers no way to change one; the
only write after creation is deleting a whole snapshot.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Callable, Iterable

from sqlalchemy import delete, func, insert, literal, select, update
from sqlalchemy.orm import Session

from db.models import Image, Label, Snapshot, SnapshotItem, SplitAssignment, TrainingRun, utcnow
from fastclass.dataset.split import current_split, left_out
from fastclass.errors import FastclassError, NotFoundError
from fastclass.lifecycle import Status
from fastclass.store import Store, pid_alive

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
EXPORT_FORMATS = ("imagefolder", "csv")
CSV_NAME = "labels.csv"
MANIFEST_NAME = "snapshot.json"


def split_name(is_valid: bool) -> str:
    return "valid" if is_valid else "train"


def content_digest(rows: Iterable[tuple[str, str, bool]]) -> str:
    """sha256 over the (sha256, label, split) rows sorted by image sha256: equal content, equal digest."""
    digest = hashlib.sha256()
    # Sort on the sha256 string alone (unique per image): comparing whole result rows is many times slower.
    for sha, label, is_valid in sorted(rows, key=itemgetter(0)):
        digest.update(f"{sha}\t{label}\t{split_name(is_valid)}\n".encode())
    return digest.hexdigest()


@dataclass
class SnapshotInfo:
    name: str
    digest: str
    images: int
    train: int
    valid: int
    labels: dict[str, dict[str, int]]
    valid_pct: float
    seed: int
    min_valid: int
    split_id: int
    label_filter: list[str] | None
    min_per_label: int
    note: str | None
    created_at: object
    excluded_labels: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    digest_ok: bool | None = None
    damaged: list[int] | None = None
    """With a content-level check: images whose file is missing or no longer hashes to its sha256."""

    @classmethod
    def from_row(cls, row: Snapshot) -> "SnapshotInfo":
        return cls(row.name, row.digest or "", row.image_count, row.train_count, row.valid_count,
                   json.loads(row.label_counts), row.valid_pct, row.seed, row.min_valid, row.split_id,
                   json.loads(row.label_filter) if row.label_filter else None, row.min_per_label, row.note,
                   row.created_at)

    def as_dict(self) -> dict:
        data = {"name": self.name, "digest": self.digest, "images": self.images, "train": self.train,
                "valid": self.valid, "labels": self.labels, "valid_pct": self.valid_pct, "seed": self.seed,
                "min_valid": self.min_valid, "split": self.split_id, "label_filter": self.label_filter,
                "min_per_label": self.min_per_label, "note": self.note, "created_at": self.created_at}
        if self.excluded_labels:
            data["excluded_labels"] = self.excluded_labels
        if self.skipped:
            data["skipped"] = self.skipped
        if self.digest_ok is not None:
            data["digest_ok"] = self.digest_ok
            data["check"] = "rows" if self.damaged is None else "content"
        if self.damaged is not None:
            data["damaged"] = self.damaged
        return data


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise FastclassError(f"snapshot name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    return name


def _get(session: Session, name: str) -> Snapshot:
    row = session.scalar(select(Snapshot).where(Snapshot.name == name))
    if row is None or row.digest is None:
        raise NotFoundError(f"no snapshot {name!r} in the catalog (see `fastclass snapshot list`)")
    return row


def create_snapshot(session: Session, name: str, labels: Iterable[str] | None = None, min_per_label: int = 0,
                    note: str | None = None, allow_conflicts: bool = False) -> SnapshotInfo:
    """Freeze the current ok images (optionally of some labels) with their label and current split.

    Refused while ok images have open label conflicts, unless allow_conflicts: those images are then
    left out. What is left out (pending images, conflicts) is reported in `skipped`.
    """
    check_name(name)
    if session.scalar(select(Snapshot.id).where(Snapshot.name == name)) is not None:
        raise FastclassError(f"snapshot {name!r} already exists and snapshots never change; "
                             f"pick another name (or `fastclass snapshot delete {name}` first)")
    split = current_split(session)
    if split is None:
        raise FastclassError("the catalog has no train/valid split yet; run `fastclass split` first")
    names = dict(session.execute(select(Label.name, Label.id)).all())
    wanted = sorted(set(labels or []))
    missing = [lab for lab in wanted if lab not in names]
    if missing:
        raise NotFoundError(f"no label {missing[0]!r} in the catalog (see `fastclass labels`)")
    conflicts = select(func.count()).select_from(Image).where(Image.status == Status.OK, Image.conflict.is_not(None))
    if wanted:
        conflicts = conflicts.where(Image.label_id.in_([names[lab] for lab in wanted]))
    open_conflicts = session.scalar(conflicts)
    if open_conflicts and not allow_conflicts:
        raise FastclassError(f"{open_conflicts} ok image(s) have open label conflicts; settle them with "
                             "`fastclass clean --status conflict` (or add --allow-conflicts to leave them out)")
    ok = (select(Image.label_id, func.count()).where(Image.status == Status.OK, Image.conflict.is_(None))
          .group_by(Image.label_id))
    if wanted:
        ok = ok.where(Image.label_id.in_([names[lab] for lab in wanted]))
    ok_counts = {label_id: count for label_id, count in session.execute(ok).all() if label_id is not None}
    label_names = {v: k for k, v in names.items()}
    excluded = {label_names[i]: n for i, n in ok_counts.items() if n < min_per_label}
    included = sorted(i for i, n in ok_counts.items() if n >= min_per_label)
    if not included:
        raise FastclassError("no ok images to snapshot" + (f" in labels with at least {min_per_label}"
                                                            if min_per_label else "")
                             + "; run `fastclass verify` (and see `fastclass stats`)")
    unassigned = session.scalar(
        select(func.count()).select_from(Image)
        .outerjoin(SplitAssignment, (SplitAssignment.image_id == Image.id) & (SplitAssignment.split_id == split.id))
        .where(Image.status == Status.OK, Image.conflict.is_(None), Image.label_id.in_(included),
               SplitAssignment.image_id.is_(None)))
    if unassigned:
        raise FastclassError(f"{unassigned} ok image(s) have no train/valid side yet; run `fastclass split` first")
    snap = Snapshot(name=name, split_id=split.id, valid_pct=split.valid_pct, seed=split.seed,
                    min_valid=split.min_valid, label_filter=json.dumps(wanted) if wanted else None,
                    min_per_label=min_per_label, note=note, digest=None, created_at=utcnow())
    session.add(snap)
    session.flush()
    source = (select(literal(snap.id), Image.id, Image.sha256, Label.name, SplitAssignment.is_valid)
              .join(Label, Label.id == Image.label_id)
              .join(SplitAssignment, (SplitAssignment.image_id == Image.id) & (SplitAssignment.split_id == split.id))
              .where(Image.status == Status.OK, Image.conflict.is_(None), Image.label_id.in_(included)))
    session.execute(insert(SnapshotItem).from_select(
        ["snapshot_id", "image_id", "sha256", "label", "is_valid"], source))
    rows = session.execute(select(SnapshotItem.sha256, SnapshotItem.label, SnapshotItem.is_valid)
                           .where(SnapshotItem.snapshot_id == snap.id)).all()
    per_label: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "valid": 0})
    for _, label, is_valid in rows:
        per_label[label][split_name(is_valid)] += 1
    valid = sum(c["valid"] for c in per_label.values())
    # Setting the digest seals the snapshot (see the triggers of migration 0003).
    session.execute(update(Snapshot).where(Snapshot.id == snap.id).values(
        digest=content_digest(rows), image_count=len(rows), train_count=len(rows) - valid, valid_count=valid,
        label_counts=json.dumps(dict(sorted(per_label.items())), sort_keys=True)))
    session.expire(snap)
    info = SnapshotInfo.from_row(_get(session, name))
    info.excluded_labels = excluded
    info.skipped = left_out(session, included)
    return info


def list_snapshots(session: Session) -> list[SnapshotInfo]:
    rows = session.scalars(select(Snapshot).where(Snapshot.digest.is_not(None)).order_by(Snapshot.id)).all()
    return [SnapshotInfo.from_row(row) for row in rows]


def show_snapshot(session: Session, name: str, store=None) -> SnapshotInfo:
    """A snapshot's description, with its digest recomputed from its items (a row-level check); with a
    store, every file is also re-hashed against its sha256 (a content-level check)."""
    row = _get(session, name)
    info = SnapshotInfo.from_row(row)
    info.digest_ok = content_digest(_item_tuples(session, row.id)) == row.digest
    if store is not None:
        from fastclass.curate.check import find_damage

        rows = [(item.image_id, item.sha256, item.store_path) for item in snapshot_items(session, name)]
        missing, altered = find_damage(store, rows, set(store.iter_files()))
        info.damaged = sorted(missing + altered)
    return info


def _item_tuples(session: Session, snapshot_id: int) -> list[tuple[str, str, bool]]:
    return session.execute(select(SnapshotItem.sha256, SnapshotItem.label, SnapshotItem.is_valid)
                           .where(SnapshotItem.snapshot_id == snapshot_id)).all()


@dataclass(frozen=True)
class ItemRow:
    """One image of a snapshot, as training and export read it."""

    image_id: int
    sha256: str
    label: str
    is_valid: bool
    store_path: str


def snapshot_items(session: Session, name: str) -> list[ItemRow]:
    """The images of a snapshot with their store paths, ordered by sha256."""
    snap = _get(session, name)
    rows = session.execute(
        select(SnapshotItem.image_id, SnapshotItem.sha256, SnapshotItem.label, SnapshotItem.is_valid,
               Image.store_path)
        .join(Image, Image.id == SnapshotItem.image_id)
        .where(SnapshotItem.snapshot_id == snap.id).order_by(SnapshotItem.sha256)).all()
    return [ItemRow(*row) for row in rows]


@dataclass
class SnapshotDiff:
    old: str
    new: str
    added: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)
    relabelled: list[dict] = field(default_factory=list)
    moved: list[dict] = field(default_factory=list)
    unchanged: int = 0

    def as_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "added": self.added, "removed": self.removed,
                "relabelled": self.relabelled, "moved": self.moved, "unchanged": self.unchanged}


def diff_snapshots(session: Session, old: str, new: str) -> SnapshotDiff:
    """What changed from snapshot `old` to snapshot `new`, by image sha256 (each list sorted by sha256)."""
    before = {sha: (label, v) for sha, label, v in _item_tuples(session, _get(session, old).id)}
    after = {sha: (label, v) for sha, label, v in _item_tuples(session, _get(session, new).id)}
    diff = SnapshotDiff(old, new)
    for sha in sorted(after.keys() - before.keys()):
        label, is_valid = after[sha]
        diff.added.append({"sha256": sha, "label": label, "split": split_name(is_valid)})
    for sha in sorted(before.keys() - after.keys()):
        label, is_valid = before[sha]
        diff.removed.append({"sha256": sha, "label": label, "split": split_name(is_valid)})
    for sha in sorted(before.keys() & after.keys()):
        (old_label, old_valid), (new_label, new_valid) = before[sha], after[sha]
        if old_label != new_label:
            diff.relabelled.append({"sha256": sha, "from": old_label, "to": new_label})
        if old_valid != new_valid:
            diff.moved.append({"sha256": sha, "label": new_label, "from": split_name(old_valid),
                               "to": split_name(new_valid)})
        if (old_label, old_valid) == (new_label, new_valid):
            diff.unchanged += 1
    return diff


def delete_snapshot(session: Session, name: str) -> None:
    """Remove a whole snapshot (its items go with it); the images and their files stay."""
    snap = _get(session, name)
    runs = session.scalars(select(TrainingRun.id).where(TrainingRun.snapshot_id == snap.id)
                           .order_by(TrainingRun.id)).all()
    if runs:
        raise FastclassError(f"snapshot {name!r} cannot be deleted: training run(s) {', '.join(map(str, runs))} "
                             "were trained on it and keep it reproducible")
    session.execute(delete(Snapshot).where(Snapshot.id == snap.id))


@dataclass
class ExportResult:
    name: str
    directory: Path
    format: str
    files: int = 0
    linked: int = 0
    copied: int = 0
    cloned: int = 0
    per_split: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"snapshot": self.name, "directory": str(self.directory), "format": self.format,
                "files": self.files, "linked": self.linked, "copied": self.copied, "cloned": self.cloned,
                "per_split": dict(self.per_split)}


def export_snapshot(session: Session, store: Store, name: str, directory: Path, fmt: str = "imagefolder",
                    progress: Callable[[int, int], None] | None = None, link: bool = False) -> ExportResult:
    """Write a snapshot as DIR/{train,valid}/<label>/<sha>.<ext> or as DIR/labels.csv + DIR/images/.

    Files are copies (reflinks where the file system has them: no extra space, and an edit of the export
    still never reaches the store). With link, they are hard links into the store where the file system
    allows: fast and free, but an editor saving over an exported file in place rewrites the store's copy.
    The tree is built in a hidden sibling folder and renamed into place at the end, so an interrupted
    export leaves no half-written DIR.
    """
    if fmt not in EXPORT_FORMATS:
        raise FastclassError(f"unknown export format {fmt!r}; use one of: {', '.join(EXPORT_FORMATS)}")
    info = SnapshotInfo.from_row(_get(session, name))
    items = snapshot_items(session, name)
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FastclassError(f"{directory} already exists and is not an empty folder; export into a new folder")
    if not directory.parent.is_dir():
        raise FastclassError(f"folder {directory.parent} does not exist")
    missing = store.missing(item.store_path for item in items)
    if missing:
        raise FastclassError(f"{len(missing)} file(s) of snapshot {name!r} are missing from the store "
                             f"{store.root} (first: {missing[0]}); restore the store")
    store.fetch(item.store_path for item in items)
    sweep_partial_exports(directory.parent)
    partial = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    result = ExportResult(name, directory, fmt)
    try:
        partial.mkdir()
        csv_rows = []
        for done, item in enumerate(items, start=1):
            ext = item.store_path.rsplit(".", 1)[-1]
            side = split_name(item.is_valid)
            rel = f"{side}/{item.label}/{item.sha256}.{ext}" if fmt == "imagefolder" else f"images/{item.sha256}.{ext}"
            _place(store.path(item.store_path), partial / rel, result, link)
            result.per_split[side] += 1
            csv_rows.append((rel, item.label, item.is_valid))
            if progress:
                progress(done, len(items))
        if fmt == "csv":
            with open(partial / CSV_NAME, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["path", "label", "is_valid"])
                writer.writerows(csv_rows)
        manifest = {k: v for k, v in info.as_dict().items() if k != "created_at"}
        manifest["created_at"] = str(info.created_at)
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            directory.rmdir()
        partial.rename(directory)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise FastclassError(f"export of {name!r} to {directory} failed: {exc.strerror or exc}; "
                             "nothing was written") from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


_PARTIAL = re.compile(r"^\..+\.partial-(\d+)$")


def sweep_partial_exports(folder: Path) -> int:
    """Remove the hidden half-built trees (`.NAME.partial-PID`) that killed exports left in folder; a tree
    whose process still runs is another export in progress and stays. Returns how many were removed."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


FICLONE = 0x40049409  # Linux ioctl: share the source's blocks copy-on-write (btrfs, XFS, bcachefs)


def _place(source: Path, target: Path, result: ExportResult, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    result.files += 1
    if link:
        try:
            os.link(source, target)
            result.linked += 1
            return
        except OSError:
            pass
    if _clone(source, target):
        result.cloned += 1
        return
    shutil.copyfile(source, target)
    result.copied += 1


def _clone(source: Path, target: Path) -> bool:
    """A reflink copy of source at target, or False (nothing left behind) where the file system has none."""
    try:
        import fcntl
    except ImportError:
        return False
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return True
        except OSError:
            pass
    target.unlink(missing_ok=True)
    return False
