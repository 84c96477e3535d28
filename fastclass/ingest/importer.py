"""`fastclass import`: bring an existing folder tree of images into the catalog through ingest."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy.orm import Session

from fastclass.catalog import is_recorded_in
from fastclass.errors import FastclassError, NotFoundError
from fastclass.ingest.analyze import DEFAULT_MAX_BYTES, NotAnImage, prepare_bytes, read_capped
from fastclass.ingest.record import PreparedImage, RecordResult, SourceInfo, commit_batch
from fastclass.labels import normalize_label
from fastclass.store import Store
from fastclass.text import printable
from fastclass.workers import Budget, IsolatedPool

log = logging.getLogger(__name__)

BATCH_SIZE = 500
Progress = Callable[[int, int], None]


@dataclass
class ImportResult:
    files: int = 0
    new_images: int = 0
    exact_duplicates: int = 0
    new_sources: int = 0
    conflicts: int = 0
    """Files whose bytes the catalog holds under another label: recorded as claims, now open conflicts."""
    skipped: Counter = field(default_factory=Counter)
    new_per_label: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "files": self.files, "new_images": self.new_images, "exact_duplicates": self.exact_duplicates,
            "new_sources": self.new_sources, "label_conflicts": self.conflicts, "skipped": dict(self.skipped),
            "new_per_label": dict(self.new_per_label),
        }


@dataclass(frozen=True)
class _Task:
    path: str
    label: str
    store: Store
    max_bytes: int


def list_import_files(root: Path, label: str | None) -> tuple[list[tuple[Path, str]], Counter]:
    """(file, label) pairs under root: DIR/<label>/... or every file with the given label; plus skips."""
    files: list[tuple[Path, str]] = []
    skipped: Counter = Counter()
    fixed = normalize_label(label) if label else None
    # Each label folder is walked on its own: the same files linked under two labels are two claims.
    for path, depth in _walk_files(root, skipped, frozenset(), set(), per_label=fixed is None):
        if fixed:
            files.append((path, fixed))
            continue
        if depth < 2:
            skipped["file outside a label folder (use --label for a flat folder)"] += 1
            continue
        folder = path.relative_to(root).parts[0]
        if not _utf8(folder):
            skipped["label folder name is not valid UTF-8 (rename the folder)"] += 1
            continue
        try:
            files.append((path, normalize_label(folder)))
        except FastclassError:
            skipped["label folder name is not a valid label"] += 1
    return files, skipped


def _utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (Python keeps the bytes of one that is not as
    surrogates, which no database can store)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def source_uri(path: str) -> str:
    """A file's path as recorded provenance; bytes that are not UTF-8 are written as \\xNN escapes."""
    return path if _utf8(path) else os.fsencode(path).decode("utf-8", "backslashreplace")


def _walk_files(folder: Path, skipped: Counter, above: frozenset[tuple[int, int]], seen: set[tuple[int, int]],
                depth: int = 1, per_label: bool = False) -> Iterator[tuple[Path, int]]:
    """Files under folder in name order, with their depth (1 = directly in the root); hidden ones skipped.

    Links to files and folders are followed, except a link to a folder above it (a loop). A folder or file
    reached again by another path (links that form a DAG) is skipped, so every one is walked once (once
    per label folder with per_label).
    scandir's entries know their type from the listing itself: no stat per file, except for links.
    """
    try:
        info = folder.stat()
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        if depth == 1:
            raise FastclassError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
        skipped["unreadable folder"] += 1
        return
    key = (info.st_dev, info.st_ino)
    if key in above:
        skipped["link to a folder above it (a loop)"] += 1
        return
    if key in seen:
        skipped["folder reached again by a link"] += 1
        return
    seen.add(key)
    subfolders = []
    for entry in entries:
        try:
            if entry.name.startswith("."):
                if not entry.is_dir():
                    skipped["hidden file"] += 1
            elif entry.is_dir():
                subfolders.append(Path(entry.path))
            elif entry.is_file():
                if entry.is_symlink():
                    target = os.stat(entry.path)
                    if (target.st_dev, target.st_ino) in seen:
                        skipped["file reached again by a link"] += 1
                        continue
                    seen.add((target.st_dev, target.st_ino))
                yield Path(entry.path), depth
            elif entry.is_symlink():
                skipped["broken link"] += 1
            else:
                skipped["not a regular file"] += 1
        except OSError:
            skipped["not a regular file"] += 1
    for sub in subfolders:
        yield from _walk_files(sub, skipped, above | {key}, set(seen) if per_label and depth == 1 else seen, depth + 1)


def _prepare(task: _Task) -> tuple[PreparedImage | None, str | None]:
    try:
        data = read_capped(Path(task.path), task.max_bytes)
        facts, stored = prepare_bytes(data, task.store)
    except NotAnImage as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"unreadable file ({exc.strerror or exc})"
    source = SourceInfo(uri=source_uri(task.path), engine="import")
    return PreparedImage(facts, stored, task.label, source), None


def import_folder(session: Session, store: Store, root: Path, label: str | None = None,
                  workers: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: Progress | None = None, budget: Budget = Budget()) -> ImportResult:
    """Import every image under root; commits every BATCH_SIZE files, so an interrupt loses one batch at most.

    Each file is read and decoded in isolation (see IsolatedPool): one that hangs, exhausts its budget
    or crashes its worker is skipped with that reason and the import goes on."""
    if not root.exists():
        raise NotFoundError(f"folder {root} does not exist")
    if not root.is_dir():
        raise FastclassError(f"{root} is not a folder")
    store.check()
    pairs, skipped = list_import_files(root.resolve(), label)
    result = ImportResult(files=len(pairs) + sum(skipped.values()), skipped=skipped)
    tasks = [_Task(str(path), lab, store, max_bytes) for path, lab in pairs]
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    batch: list[PreparedImage] = []
    pool = IsolatedPool(workers, budget) if tasks else None
    try:
        prepared_files = pool.map(_prepare, tasks, key=_task_key, failed=_failed) if pool else []
        for done, (prepared, reason) in enumerate(prepared_files, start=1):
            if prepared is None:
                result.skipped[reason] += 1
            else:
                batch.append(prepared)
            if len(batch) >= BATCH_SIZE:
                _commit(session, store, batch, result)
                batch = []
            if progress:
                progress(done, len(tasks))
        _commit(session, store, batch, result)
    except BaseException:
        # An interrupt or error: what was prepared but not committed leaves no file behind (the workers
        # stop first, so none writes after the sweep).
        if pool is not None:
            pool.close()
        session.rollback()
        try:
            store.discard([item.stored for item in batch], is_recorded_in(session))
            store.clear_stale_temp(is_recorded_in(session))
        except Exception:
            # The catalog cannot be read (a full disk can make SQLite fail even to read): the temp
            # twins stay, and the next command that opens the catalog clears them and their files.
            log.warning("could not clear this import's unrecorded files now; the next fastclass command will",
                        exc_info=log.isEnabledFor(logging.DEBUG))
        raise
    finally:
        if pool is not None:
            pool.close()
    return result


def _task_key(task: _Task) -> str:
    return task.path


def _failed(task: _Task, reason: str) -> tuple[None, str]:
    log.warning("skipped %s: %s", printable(source_uri(task.path)), reason)
    return None, reason


def _commit(session: Session, store: Store, batch: list[PreparedImage], result: ImportResult) -> None:
    recorded: RecordResult = commit_batch(session, store, batch)
    result.new_images += recorded.new_images
    result.exact_duplicates += recorded.exact_duplicates
    result.new_sources += recorded.new_sources
    result.conflicts += recorded.new_claims
    result.new_per_label.update(recorded.new_per_label)
