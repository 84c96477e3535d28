"""The content-addressed image store: bytes by sha256 under ab/abcdef....ext, written crash-safely.

A write goes to a temp file in .tmp/ whose name carries the sha256, host and pid; the final path is then a
hard link to it. The temp file stays until the caller has committed the catalog rows and calls `release`,
so after a crash every stored file without a row still has its temp twin. `clear_stale_temp` (run when a
store is opened) removes the twins of dead processes and, where no catalog row claims the sha256, the
final link they made.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

TEMP_DIR = ".tmp"


class StoreError(Exception):
    """The store folder cannot be used; the message says why."""


@dataclass(frozen=True)
class StoredFile:
    """A file placed in the store; `temp` is its pending twin, released once the catalog holds its row."""

    sha256: str
    relpath: str
    temp: Path | None


def relpath_for(sha256: str, ext: str) -> str:
    return f"{sha256[:2]}/{sha256}.{ext}"


def _write_new(path: Path, data: bytes) -> None:
    # Folders are made only when missing: a mkdir per file would cost more than the write itself.
    try:
        fh = open(path, "xb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "xb")
    with fh:
        fh.write(data)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileNotFoundError:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)


def _unlink_twin(temp: Path) -> None:
    temp.unlink(missing_ok=True)
    temp.with_name(temp.name + ".copy").unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process on this host is running (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed writer whose parent never reaps it (pid 1 in many containers) lingers as a zombie: dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] != "Z"


class ImageStore:
    """A local (or network-mounted) folder holding image bytes by content hash."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / TEMP_DIR
        self._host = socket.gethostname().replace(".", "_") or "host"

    def create(self) -> None:
        try:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create image store at {self.root}: {exc.strerror}") from exc

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"image store {self.root} is missing; run `fastclass init` or restore the folder")

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).exists()

    def put(self, sha256: str, ext: str, data: bytes) -> StoredFile:
        """Place bytes at their content address; the returned temp twin must be released after commit."""
        rel = relpath_for(sha256, ext)
        final = self.root / rel
        temp = self.temp_dir / f"{sha256}.{self._host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            _write_new(temp, data)
            try:
                _link(temp, final)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                self._place_by_copy(temp, final, data)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write to image store {self.root}: {exc.strerror or exc}") from exc
        return StoredFile(sha256, rel, temp)

    def _place_by_copy(self, temp: Path, final: Path, data: bytes) -> None:
        # Filesystems without hard links: a second temp renamed into place; the first stays as the twin.
        staging = temp.with_name(temp.name + ".copy")
        _write_new(staging, data)
        if final.exists():
            staging.unlink()
        else:
            os.replace(staging, final)

    def release(self, files: Iterable[StoredFile]) -> None:
        """Drop the temp twins of files whose catalog rows are committed."""
        for stored in files:
            if stored.temp is not None:
                _unlink_twin(stored.temp)

    def discard(self, files: Iterable[StoredFile], is_recorded: Callable[[str], bool]) -> None:
        """Undo puts whose rows were not committed (rollback, interrupt): remove unclaimed final files."""
        files = list(files)
        self.release(files)
        self._remove_orphans({f.sha256 for f in files}, is_recorded)

    def clear_stale_temp(self, is_recorded: Callable[[str], bool]) -> int:
        """Remove what crashed writers on this host left behind; returns the number of temp files cleared."""
        stale = [(temp, sha) for temp, sha, host, pid in self._temp_entries()
                 if pid < 0 or (host == self._host and not pid_alive(pid))]
        for temp, _ in stale:
            _unlink_twin(temp)
        self._remove_orphans({sha for _, sha in stale if sha}, is_recorded)
        if stale:
            log.info("cleared %d temp file(s) left by an interrupted run in %s", len(stale), self.temp_dir)
        return len(stale)

    def _remove_orphans(self, shas: set[str], is_recorded: Callable[[str], bool]) -> None:
        # A final file is an orphan when no row claims it and no live writer still holds a twin for it.
        held = self._held_by_live_writers()
        for sha in shas:
            if sha not in held and not is_recorded(sha):
                for final in (self.root / sha[:2]).glob(f"{sha}.*"):
                    final.unlink(missing_ok=True)

    def _temp_entries(self) -> list[tuple[Path, str, str, int]]:
        """(path, sha256, host, pid) of each temp file; pid -1 for a name that is not ours."""
        if not self.temp_dir.is_dir():
            return []
        entries = []
        for temp in self.temp_dir.iterdir():
            parts = temp.name.split(".")
            if len(parts) >= 4 and len(parts[0]) == 64 and parts[2].isdigit():
                entries.append((temp, parts[0], parts[1], int(parts[2])))
            else:
                entries.append((temp, "", "", -1))
        return entries

    def _held_by_live_writers(self) -> set[str]:
        return {sha for temp, sha, host, pid in self._temp_entries()
                if pid >= 0 and (host != self._host or pid_alive(pid))}

    def remove(self, relpath: str) -> None:
        (self.root / relpath).unlink(missing_ok=True)

    def iter_files(self) -> Iterable[str]:
        """Every stored file's relative path (for consistency checks)."""
        for sub in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if sub.is_dir() and sub.name != TEMP_DIR and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    yield f"{sub.name}/{f.name}"
