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

from fastclass.errors import FastclassError, first_line

log = logging.getLogger(__name__)

TEMP_DIR = ".tmp"


class StoreError(FastclassError):
    """The store folder cannot be used; the message says why."""


@dataclass(frozen=True)
class StoredFile:
    """A file placed in the store; `temp` is its pending twin, released once the catalog holds its row."""

    sha256: str
    relpath: str
    temp: Path | str | None


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


def _place(move: Callable[[Path, Path], None], src: Path, dst: Path) -> None:
    """os.link or os.replace src to dst, making dst's fan-out folder on first use (as _write_new does)."""
    try:
        move(src, dst)
    except FileNotFoundError:
        dst.parent.mkdir(parents=True, exist_ok=True)
        move(src, dst)


def write_failure(what: str, exc: OSError) -> str:
    """The message for a failed write: a full disk is named as such, with what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write to {what}: the disk is full ({exc.strerror}); free some space and re-run "
                "(what was committed is kept, nothing half-written is)")
    return f"cannot write to {what}: {exc.strerror or exc}"


def process_alive(host: str | None, pid: int | None) -> bool:
    """Whether a process recorded as (host, pid) may still run: always, unless it ran on this host and is gone."""
    if host != socket.gethostname() or not pid:
        return True
    return pid_alive(int(pid))


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


def temp_name(sha256: str, host: str) -> str:
    """The name of a write's temp twin (or marker): whose it is, so that a dead writer's can be cleared."""
    return f"{sha256}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def parse_temp_name(name: str) -> tuple[str, str, int]:
    """(sha256, host, pid) of a temp name; pid -1 for a name that is not ours."""
    parts = name.split(".")
    if len(parts) >= 4 and len(parts[0]) == 64 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    return "", "", -1


def host_name() -> str:
    return socket.gethostname().replace(".", "_") or "host"


class Store:
    """What every store shares: the crash-safe workflow around writes. A write leaves a temp entry (a twin
    file, or a marker object on S3) named by its sha256, host and pid until the caller has committed the
    catalog rows and calls `release`; `discard` undoes writes whose rows were not committed, and
    `clear_stale_temp` (run when a store is opened) clears what dead writers on this host left behind.
    Subclasses provide the primitives: `_temp_entries`, `_remove_temps`, `_remove_finals`."""

    root: object
    _host: str

    def release(self, files: Iterable[StoredFile]) -> None:
        """Drop the temp entries of files whose catalog rows are committed."""
        self._remove_temps([stored.temp for stored in files if stored.temp is not None])

    def discard(self, files: Iterable[StoredFile], is_recorded: Callable[[str], bool]) -> None:
        """Undo puts whose rows were not committed (rollback, interrupt): remove unclaimed final files.

        The catalog is asked first: if it cannot answer, the temp entries stay (and the error propagates),
        so the next open's clear_stale_temp still finds and clears these files."""
        files = list(files)
        recorded = {f.sha256 for f in files if is_recorded(f.sha256)}
        self.release(files)
        self._remove_orphans({f.sha256 for f in files} - recorded, lambda sha: False)

    def clear_stale_temp(self, is_recorded: Callable[[str], bool]) -> int:
        """Remove what crashed writers on this host left behind; returns the number of temp entries cleared."""
        stale = [(temp, sha) for temp, sha, host, pid in self._temp_entries()
                 if pid < 0 or (host == self._host and not pid_alive(pid))]
        self._remove_temps([temp for temp, _ in stale])
        self._remove_orphans({sha for _, sha in stale if sha}, is_recorded)
        if stale:
            log.info("cleared %d temp entr(ies) left by an interrupted run in %s", len(stale), self.root)
        return len(stale)

    def _remove_orphans(self, shas: set[str], is_recorded: Callable[[str], bool]) -> None:
        # A final file is an orphan when no row claims it and no live writer still holds a temp entry for it.
        held = {sha for _, sha, host, pid in self._temp_entries()
                if pid >= 0 and (host != self._host or pid_alive(pid))}
        for sha in shas:
            if sha not in held and not is_recorded(sha):
                self._remove_finals(sha)

    def _temp_entries(self) -> list[tuple]:
        raise NotImplementedError

    def _remove_temps(self, temps: Iterable) -> None:
        raise NotImplementedError

    def _remove_finals(self, sha256: str) -> None:
        raise NotImplementedError


class ImageStore(Store):
    """A local (or network-mounted) folder holding image bytes by content hash."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / TEMP_DIR
        self._host = host_name()

    def create(self) -> None:
        try:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create image store at {self.root}: {exc.strerror}") from exc

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"image store {self.root} is missing; restore the folder, or if it moved, point the "
                             "catalog at it with `fastclass init --store NEW_PATH`")

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).exists()

    def missing(self, relpaths: Iterable[str]) -> list[str]:
        return [rel for rel in relpaths if not (self.root / rel).exists()]

    def fetch(self, relpaths: Iterable[str]) -> None:
        """Nothing to do: the files are local (an S3 store downloads them here)."""

    def put(self, sha256: str, ext: str, data: bytes) -> StoredFile:
        """Place bytes at their content address; the returned temp twin must be released after commit."""
        rel = relpath_for(sha256, ext)
        final = self.root / rel
        temp = self.temp_dir / temp_name(sha256, self._host)
        try:
            _write_new(temp, data)
            try:
                _place(os.link, temp, final)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                self._place_by_copy(temp, final, data)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(write_failure(f"image store {self.root}", exc)) from exc
        return StoredFile(sha256, rel, temp)

    def _place_by_copy(self, temp: Path, final: Path, data: bytes) -> None:
        # Filesystems without hard links: a second temp renamed into place; the first stays as the twin.
        staging = temp.with_name(temp.name + ".copy")
        try:
            _write_new(staging, data)
            if not final.exists():
                _place(os.replace, staging, final)
        finally:
            staging.unlink(missing_ok=True)  # already gone once renamed into place

    def _temp_entries(self) -> list[tuple[Path, str, str, int]]:
        """(path, sha256, host, pid) of each temp file; pid -1 for a name that is not ours."""
        if not self.temp_dir.is_dir():
            return []
        return [(temp, *parse_temp_name(temp.name)) for temp in self.temp_dir.iterdir()]

    def _remove_temps(self, temps: Iterable[Path]) -> None:
        for temp in temps:  # a copy-mode staging file (<twin>.copy) is an entry of its own
            Path(temp).unlink(missing_ok=True)

    def _remove_finals(self, sha256: str) -> None:
        for final in (self.root / sha256[:2]).glob(f"{sha256}.*"):
            final.unlink(missing_ok=True)

    def remove(self, relpath: str) -> None:
        (self.root / relpath).unlink(missing_ok=True)

    def iter_files(self) -> Iterable[str]:
        """Every stored file's relative path (for consistency checks)."""
        for sub in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if sub.is_dir() and sub.name != TEMP_DIR and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    yield f"{sub.name}/{f.name}"


S3_MARKER = ".fastclass-store"


class S3ImageStore(Store):
    """The store on S3-compatible object storage: s3://bucket/prefix/ab/<sha256>.<ext>.

    Credentials and endpoint come from the standard AWS environment and config (AWS_ENDPOINT_URL for a
    non-AWS service). A write puts an empty marker object under .tmp/ (named like a local temp twin: sha256,
    host, pid), then the image object (an S3 PUT is atomic: readers see all of it or nothing), and the marker
    is removed once the catalog row is committed. So, as in a local store, an image object without its row
    always has a marker, and `clear_stale_temp` removes both for writers that died on this host. Decoding
    and training read through a local cache of the objects (they never change: the cache cannot go stale).
    """

    def __init__(self, url: str, cache_dir: Path | None = None) -> None:
        self.root = url.rstrip("/")
        self.key = self.root[len("s3://"):]
        if not self.key or self.key.startswith("/"):
            raise StoreError(f"{url!r} is not an S3 location; use s3://bucket/prefix")
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.cache = cache_dir or cache_home / "fastclass" / "s3" / self.key
        self._host = host_name()
        self._fs = None

    def __getstate__(self) -> dict:
        # Each worker process opens its own connection pool.
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        if self._fs is None:
            try:
                import s3fs
            except ImportError as exc:
                raise StoreError("an s3:// image store needs s3fs: pip install 'fastclass[s3]'") from exc
            # No listing cache: other workers add and remove objects all the time.
            self._fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        return self._fs

    def _object(self, relpath: str) -> str:
        return f"{self.key}/{relpath}"

    def _fail(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"cannot {what} image store {self.root}: {type(exc).__name__}: "
                          f"{first_line(exc)[:200]}")

    def create(self) -> None:
        bucket = self.key.split("/", 1)[0]
        try:
            if not self.fs.exists(bucket):
                self.fs.mkdir(bucket)
            self.fs.pipe(self._object(S3_MARKER), b"fastclass image store\n")
        except Exception as exc:  # botocore and aiohttp raise many kinds; all mean "cannot use it"
            raise self._fail("create", exc) from exc

    def check(self) -> None:
        try:
            found = self.fs.exists(self._object(S3_MARKER))
        except Exception as exc:
            raise self._fail("reach", exc) from exc
        if not found:
            raise StoreError(f"image store {self.root} is missing; restore it, or if it moved, point the catalog "
                             "at it with `fastclass init --store NEW_URL`")

    def path(self, relpath: str) -> Path:
        """A local file with the object's bytes (downloaded into the cache once); for a missing object, a
        path where no file is, as a local store gives for a missing file."""
        local = self.cache / relpath
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            try:
                self.fs.get_file(self._object(relpath), str(partial))
                os.replace(partial, local)
            except FileNotFoundError:
                return local
            except Exception as exc:
                raise self._fail(f"read {relpath} from", exc) from exc
            finally:
                partial.unlink(missing_ok=True)
        return local

    def fetch(self, relpaths: Iterable[str], threads: int = 16) -> None:
        """Download many objects into the cache at once (before decoding or training)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(self.path, relpaths))

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self._object(relpath))

    def missing(self, relpaths: Iterable[str]) -> list[str]:
        present = set(self.iter_files())
        return [rel for rel in relpaths if rel not in present]

    def put(self, sha256: str, ext: str, data: bytes) -> StoredFile:
        rel = relpath_for(sha256, ext)
        marker = self._object(f"{TEMP_DIR}/{temp_name(sha256, self._host)}")
        try:
            self.fs.pipe(marker, b"")
            if not self.fs.exists(self._object(rel)):
                self.fs.pipe(self._object(rel), data)
        except Exception as exc:
            self._remove_objects([marker])
            raise self._fail("write to", exc) from exc
        return StoredFile(sha256, rel, marker)

    def _temp_entries(self) -> list[tuple[str, str, str, int]]:
        try:
            keys = self.fs.ls(self._object(TEMP_DIR), detail=False)
        except FileNotFoundError:
            return []
        return [(key, *parse_temp_name(key.rsplit("/", 1)[-1])) for key in keys]

    def _remove_temps(self, temps: Iterable[str]) -> None:
        self._remove_objects(list(temps))

    def _remove_finals(self, sha256: str) -> None:
        self._remove_objects(self.fs.glob(self._object(f"{sha256[:2]}/{sha256}.*")))

    def _remove_objects(self, keys: list[str]) -> None:
        if keys:
            try:
                self.fs.rm(keys)
            except FileNotFoundError:
                pass

    def remove(self, relpath: str) -> None:
        self._remove_objects([self._object(relpath)])
        (self.cache / relpath).unlink(missing_ok=True)

    def iter_files(self) -> Iterable[str]:
        try:
            keys = self.fs.find(self.key)
        except FileNotFoundError:
            return
        for key in sorted(keys):
            rel = key[len(self.key) + 1:]
            if len(rel) > 3 and rel[2] == "/" and not rel.startswith(TEMP_DIR):
                yield rel


def open_store(location: str) -> Store:
    """The store at a folder path or an s3:// URL."""
    if location.startswith("s3://"):
        return S3ImageStore(location)
    return ImageStore(Path(location))
