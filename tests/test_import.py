"""`fastclass import`: every format, skips with reasons, idempotent re-runs, and a kill -9 that loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from db.models import Source
from fastclass.ingest.importer import import_folder
from fastclass.store import ImageStore
from tests.helpers import catalog_rows, image_bytes, run_cli, write


def mixed_folder(root: Path) -> Path:
    good = {"JPEG": "a.jpg", "PNG": "b.png", "WEBP": "c.webp", "GIF": "d.gif", "BMP": "e.bmp", "TIFF": "f.tiff"}
    for seed, (fmt, name) in enumerate(good.items()):
        write(root / "cats" / name, image_bytes(fmt, seed=seed))
    jpeg = image_bytes("JPEG", (300, 200), seed=50)
    write(root / "cats" / "truncated.jpg", jpeg[: len(jpeg) // 2])
    write(root / "dogs" / "deep" / "nested.jpg", image_bytes("JPEG", seed=60))
    write(root / "dogs" / "page.jpg", b"<html><head><title>404</title></head></html>")
    write(root / "dogs" / "zero.jpg", b"")
    write(root / "dogs" / "notes.txt", b"shopping list\n")
    write(root / "dogs" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "loose.jpg", image_bytes("JPEG", seed=70))
    return root


def test_import_stores_images_and_skips_the_rest_with_reasons(catalog, tmp_path):
    root = mixed_folder(tmp_path / "in")
    with catalog.session() as session:
        result = import_folder(session, catalog.store, root, workers=2)
    assert result.new_images == 8
    assert dict(result.new_per_label) == {"cats": 7, "dogs": 1}
    assert dict(result.skipped) == {
        "not an image (HTML/XML text)": 1,
        "empty file": 1,
        "not an image (UnidentifiedImageError)": 1,
        "hidden file": 1,
        "file outside a label folder (use --label for a flat folder)": 1,
    }
    from sqlalchemy import select

    from db.models import Image

    with catalog.session() as session:
        rows = {r.format: r for r in session.execute(select(Image)).scalars()}
        assert sorted(rows) == ["BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP"]
        truncated = session.execute(select(Image).where(Image.reason.is_not(None))).scalar_one()
        assert truncated.reason == "truncated image data" and truncated.status == "pending"
        for row in session.execute(select(Image)).scalars():
            assert catalog.store.exists(row.store_path)
            assert row.store_path.startswith(row.sha256[:2] + "/" + row.sha256)
    assert len(list(catalog.store.iter_files())) == 8


def test_listing_follows_links_but_not_loops_and_names_what_it_skips(catalog, tmp_path):
    outside = tmp_path / "elsewhere"
    write(outside / "tabby.jpg", image_bytes("JPEG", seed=80))
    root = tmp_path / "in"
    write(root / "cats" / "own.jpg", image_bytes("JPEG", seed=81))
    (root / "cats" / "more").symlink_to(outside)  # a linked folder is followed
    (root / "cats" / "loop").symlink_to(root / "cats")  # ... but not one above itself
    (root / "cats" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    write(root / "cats" / ".thumbs" / "x.jpg", image_bytes("JPEG", seed=82))  # hidden folders are not read
    os.mkfifo(root / "cats" / "pipe.jpg")
    (root / "dogs").symlink_to(outside)  # a label folder may be a link
    with catalog.session() as session:
        result = import_folder(session, catalog.store, root, workers=1)
    assert dict(result.skipped) == {
        "broken link": 1, "not a regular file": 1, "link to a folder above it (a loop)": 1,
    }
    assert result.files == 6 and result.new_images == 2 and result.new_sources == 3
    assert dict(result.new_per_label) == {"cats": 2}
    with catalog.session() as session:
        uris = list(session.execute(select(Source.uri).order_by(Source.uri)).scalars())
    assert uris == [str(root / "cats" / "more" / "tabby.jpg"), str(root / "cats" / "own.jpg"),
                    str(root / "dogs" / "tabby.jpg")]


def test_rerun_adds_nothing_and_flat_folder_takes_label(initialized_catalog, tmp_path):
    root = mixed_folder(tmp_path / "in")
    first = run_cli(["import", str(root), "--json"], initialized_catalog)
    again = run_cli(["import", str(root), "--json"], initialized_catalog)
    assert json.loads(first.stdout)["new_images"] == 8
    assert json.loads(again.stdout)["new_images"] == 0
    assert json.loads(again.stdout)["new_sources"] == 0
    flat = run_cli(["import", str(root / "cats"), "--label", "felines", "--json"], initialized_catalog)
    assert json.loads(flat.stdout)["new_images"] == 0 and json.loads(flat.stdout)["new_sources"] == 7
    stats = json.loads(run_cli(["stats", "--json"], initialized_catalog).stdout)
    assert stats["images"] == {"total": 8, "ok": 0, "pending": 8, "rejected": 0, "duplicate": 0, "deleted": 0}
    assert stats["labels"]["cats"]["pending"] == 7
    assert stats["engines"] == {"import": 15}
    labels = json.loads(run_cli(["labels", "--json"], initialized_catalog).stdout)
    assert [(row["name"], row["total"]) for row in labels] == [("cats", 7), ("dogs", 1), ("felines", 0)]


def consistency(location: str) -> tuple[set[str], set[str], list[str]]:
    """(store paths of rows, files in the store, temp files) of a SQLite catalog."""
    rows = {p for (p,) in catalog_rows(location, "SELECT store_path FROM images")}
    store = ImageStore(Path(location).parent / "images")
    files = set(store.iter_files())
    temps = sorted(p.name for p in store.temp_dir.iterdir())
    return rows, files, temps


def start_import_and_wait_for_first_commit(tmp_path, count: int = 1500):
    src = tmp_path / "in"
    for i in range(count):
        write(src / f"class{i % 3}" / f"{i}.jpg", image_bytes("JPEG", (128, 96), seed=1000 + i))
    location = tmp_path / "killed" / "catalog.db"
    location.parent.mkdir()
    assert run_cli(["init"], str(location)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", str(location), "-q", "import", str(src)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if catalog_rows(str(location), "SELECT count(*) FROM images")[0][0] > 0:
                break
        except OperationalError:
            pass
        time.sleep(0.01)
    return src, str(location), proc


@pytest.mark.slow
def test_ctrl_c_during_import_exits_130_and_leaves_store_consistent(tmp_path):
    src, location, proc = start_import_and_wait_for_first_commit(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == \
        "Error: interrupted; everything committed so far is kept, re-run to continue"
    rows, files, temps = consistency(location)
    assert 0 < len(rows) < 1500, "the interrupt should land mid-import"
    assert rows == files and temps == [], "an interrupted import cleans up after itself at once"
    assert json.loads(run_cli(["import", str(src), "--json"], location).stdout)["new_images"] == 1500 - len(rows)


@pytest.mark.slow
def test_kill_9_during_import_then_rerun_ends_consistent(tmp_path):
    src, location, proc = start_import_and_wait_for_first_commit(tmp_path)
    killed = Path(location)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows, files, temps = consistency(str(killed))
    assert 0 < len(rows) < 1500, "the kill should land mid-import"
    assert rows <= files, "a catalog row points at a missing file"
    twins = {name.split(".")[0] for name in temps}
    assert {f.split("/")[1].split(".")[0] for f in files - rows} <= twins, "a stored file has neither row nor temp twin"

    rerun = run_cli(["import", str(src), "--json"], str(killed))
    assert rerun.exit_code == 0, rerun.stderr
    rows, files, temps = consistency(str(killed))
    assert rows == files and temps == [] and len(rows) == 1500

    clean = tmp_path / "clean" / "catalog.db"
    clean.parent.mkdir()
    run_cli(["init"], str(clean))
    run_cli(["import", str(src)], str(clean))
    query = "SELECT l.name, count(*) FROM images i JOIN labels l ON l.id = i.label_id GROUP BY l.name ORDER BY 1"
    assert catalog_rows(str(killed), query) == catalog_rows(str(clean), query)
    assert catalog_rows(str(killed), "SELECT count(*) FROM sources") == catalog_rows(str(clean), "SELECT count(*) FROM sources")
    assert catalog_rows(str(killed), "SELECT count(*) FROM image_hashes") == catalog_rows(str(clean), "SELECT count(*) FROM image_hashes")
