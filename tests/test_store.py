"""The content-addressed store: layout, temp twins, and clean-up after crashed writers."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

from fastclass.store import ImageStore, relpath_for


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_dead_writer(root, body: str) -> None:
    """Run body in a real process with `s`, an ImageStore at root, that then dies without releasing."""
    code = ("import hashlib, os; from pathlib import Path; from fastclass.store import ImageStore\n"
            f"s = ImageStore(Path({str(root)!r}))\n" + body + "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_put_places_bytes_at_content_address_and_keeps_twin_until_release(tmp_path):
    store = ImageStore(tmp_path / "s")
    store.create()
    data = b"\xff\xd8 pretend jpeg"
    stored = store.put(sha(data), "jpg", data)
    assert stored.relpath == f"{sha(data)[:2]}/{sha(data)}.jpg" == relpath_for(sha(data), "jpg")
    assert store.path(stored.relpath).read_bytes() == data
    assert stored.temp.exists() and os.path.samefile(stored.temp, store.path(stored.relpath))
    store.release([stored])
    assert not stored.temp.exists()
    assert store.path(stored.relpath).read_bytes() == data
    assert list(store.iter_files()) == [stored.relpath]


def test_same_bytes_twice_is_one_file(tmp_path):
    store = ImageStore(tmp_path / "s")
    store.create()
    first, second = store.put(sha(b"x"), "png", b"x"), store.put(sha(b"x"), "png", b"x")
    store.release([first, second])
    assert list(store.iter_files()) == [first.relpath]


def test_discard_removes_unrecorded_files_only(tmp_path):
    store = ImageStore(tmp_path / "s")
    store.create()
    keep, drop = store.put(sha(b"keep"), "jpg", b"keep"), store.put(sha(b"drop"), "jpg", b"drop")
    store.discard([keep, drop], is_recorded=lambda s: s == sha(b"keep"))
    assert list(store.iter_files()) == [keep.relpath]
    assert list(store.temp_dir.iterdir()) == []


def test_stale_twins_of_a_dead_writer_are_cleared(tmp_path):
    root = tmp_path / "s"
    ImageStore(root).create()
    # A real writer process that puts two files and dies without releasing them (as after kill -9).
    run_dead_writer(root, "for d in (b'committed', b'orphan'):\n"
                          "    s.put(hashlib.sha256(d).hexdigest(), 'jpg', d)\n")
    store = ImageStore(root)
    assert len(list(store.temp_dir.iterdir())) == 2
    assert store.clear_stale_temp(is_recorded=lambda s: s == sha(b"committed")) == 2
    assert list(store.iter_files()) == [relpath_for(sha(b"committed"), "jpg")]
    assert list(store.temp_dir.iterdir()) == []


def test_twins_of_a_live_writer_are_left_alone(tmp_path):
    store = ImageStore(tmp_path / "s")
    store.create()
    stored = store.put(sha(b"busy"), "jpg", b"busy")
    assert store.clear_stale_temp(is_recorded=lambda s: False) == 0
    assert stored.temp.exists() and store.exists(stored.relpath)


def _no_hard_links(src, dst):
    raise PermissionError(errno.EPERM, "Operation not permitted")


def test_a_filesystem_without_hard_links_gets_a_copy_and_keeps_the_twin(tmp_path, monkeypatch):
    """Where link(2) is refused (some network and FUSE mounts), the final file is a renamed second copy."""
    store = ImageStore(tmp_path / "s")
    store.create()
    monkeypatch.setattr(os, "link", _no_hard_links)
    stored = store.put(sha(b"copied"), "jpg", b"copied")
    assert store.path(stored.relpath).read_bytes() == b"copied"
    assert not os.path.samefile(stored.temp, store.path(stored.relpath))
    assert [p.name for p in store.temp_dir.iterdir()] == [stored.temp.name]
    store.release([stored])
    assert list(store.temp_dir.iterdir()) == []
    assert list(store.iter_files()) == [stored.relpath]


def test_a_dead_writers_copy_staging_file_is_cleared_with_its_twin(tmp_path):
    root = tmp_path / "s"
    ImageStore(root).create()
    # A writer killed between writing the staging copy and renaming it into place.
    run_dead_writer(root, "d = b'half-placed'\n"
                          "stored = s.put(hashlib.sha256(d).hexdigest(), 'jpg', d)\n"
                          "Path(str(stored.temp) + '.copy').write_bytes(d)\n")
    store = ImageStore(root)
    assert store.clear_stale_temp(is_recorded=lambda s: False) == 2
    assert list(store.temp_dir.iterdir()) == [] and list(store.iter_files()) == []
