"""`fastclass snapshot`: digests, immutability, diff, export trees, and prune keeping snapshot files."""
from __future__ import annotations

import csv
import json
import os

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from db.models import Image, Label, Snapshot, SnapshotItem
from fastclass.catalog import open_catalog
from fastclass.dataset.snapshot import create_snapshot, diff_snapshots, show_snapshot, snapshot_items
from fastclass.dataset.split import assign_splits
from fastclass.errors import FastclassError
from tests.helpers import add_images, catalog_rows, photo_like, run_cli, sqlite_catalog_named


def grow(catalog, root, spec) -> None:
    add_images(catalog, root, spec)
    with catalog.session() as session:
        assign_splits(session)


def snap(catalog, name, **kwargs):
    with catalog.session() as session:
        return create_snapshot(session, name, **kwargs)


def relabel(catalog, sha: str, label: str) -> None:
    """What a review does to an image (the clean command is another issue): change its current label."""
    with catalog.session() as session:
        label_id = session.scalar(select(Label.id).where(Label.name == label))
        session.execute(update(Image).where(Image.sha256 == sha).values(label_id=label_id))


def test_digest_is_content_only(catalog, tmp_path):
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(8)], "dogs": [photo_like(s) for s in range(8, 14)]})
    first = snap(catalog, "v1", note="first")
    same = snap(catalog, "v1-again")
    assert first.digest == same.digest and len(first.digest) == 64
    assert (first.images, first.train, first.valid) == (14, 11, 3)
    assert first.labels == {"cats": {"train": 6, "valid": 2}, "dogs": {"train": 5, "valid": 1}}

    sha = snapshot_items_of(catalog, "v1")[0].sha256
    relabel(catalog, sha, "dogs" if snapshot_items_of(catalog, "v1")[0].label == "cats" else "cats")
    relabelled = snap(catalog, "v2")
    assert relabelled.digest != first.digest
    with catalog.session() as session:
        shown = show_snapshot(session, "v1")
    assert shown.digest == first.digest and shown.digest_ok and shown.labels == first.labels, \
        "a later relabel does not reach an existing snapshot"


def snapshot_items_of(catalog, name):
    with catalog.session() as session:
        return snapshot_items(session, name)


def test_equal_content_in_two_catalogs_gives_equal_digests(tmp_path):
    digests = []
    for name, seeds in (("one", range(10)), ("two", reversed(range(10)))):
        with sqlite_catalog_named(tmp_path, name) as catalog:
            grow(catalog, tmp_path / name, {"cats": [photo_like(s) for s in seeds]})
            digests.append(snap(catalog, "v1").digest)
    assert digests[0] == digests[1]


def test_nothing_can_change_a_snapshot(catalog, tmp_path):
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(6)]})
    info = snap(catalog, "v1")
    with pytest.raises(FastclassError, match="already exists and snapshots never change"):
        snap(catalog, "v1")
    attempts = [
        lambda s: s.execute(update(Snapshot).values(note="edited")),
        lambda s: s.execute(update(Snapshot).values(digest="0" * 64)),
        lambda s: s.execute(update(SnapshotItem).values(label="dogs")),
        lambda s: s.execute(update(SnapshotItem).values(is_valid=True)),
        lambda s: s.execute(delete(SnapshotItem).where(SnapshotItem.image_id == s.scalar(select(Image.id).limit(1)))),
        lambda s: s.execute(insert(SnapshotItem).values(
            snapshot_id=s.scalar(select(Snapshot.id)), image_id=999, sha256="f" * 64, label="x", is_valid=False)),
    ]
    for attempt in attempts:
        with pytest.raises(DBAPIError, match="snapshots are immutable"):
            with catalog.session() as session:
                attempt(session)
    # The ORM is refused the same way.
    with pytest.raises(DBAPIError, match="snapshots are immutable"):
        with catalog.session() as session:
            session.scalar(select(Snapshot)).name = "renamed"
    with catalog.session() as session:
        shown = show_snapshot(session, "v1")
    assert shown.as_dict() | {"digest_ok": None, "check": None} == info.as_dict() | {"digest_ok": None, "check": None} \
        and shown.digest_ok

    # Deleting images through the catalog is refused too while a snapshot holds them.
    with pytest.raises(DBAPIError):
        with catalog.session() as session:
            session.execute(delete(Image))


def test_cli_cannot_overwrite_and_errors_are_one_line(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    add_images(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(5)]})
    catalog.close()
    assert run_cli(["snapshot", "create", "v1"], initialized_catalog).stderr == \
        "Error: the catalog has no train/valid split yet; run `fastclass split` first\n"
    run_cli(["split"], initialized_catalog)
    assert run_cli(["snapshot", "create", "v1"], initialized_catalog).exit_code == 0
    again = run_cli(["snapshot", "create", "v1", "--note", "other"], initialized_catalog)
    assert again.exit_code == 1 and again.stderr == (
        "Error: snapshot 'v1' already exists and snapshots never change; pick another name "
        "(or `fastclass snapshot delete v1` first)\n")
    assert run_cli(["snapshot", "create", "../x"], initialized_catalog).stderr.startswith(
        "Error: snapshot name '../x' is not allowed")
    assert run_cli(["snapshot", "show", "nope"], initialized_catalog).stderr == \
        "Error: no snapshot 'nope' in the catalog (see `fastclass snapshot list`)\n"
    assert run_cli(["snapshot", "create", "v2", "--label", "dogs"], initialized_catalog).stderr == \
        "Error: no label 'dogs' in the catalog (see `fastclass labels`)\n"
    # A new ok image without a side must be split before it can be frozen.
    catalog = open_catalog(initialized_catalog)
    add_images(catalog, tmp_path / "b", {"cats": [photo_like(50)]})
    catalog.close()
    assert run_cli(["snapshot", "create", "v2"], initialized_catalog).stderr == \
        "Error: 1 ok image(s) have no train/valid side yet; run `fastclass split` first\n"
    listed = json.loads(run_cli(["snapshot", "list", "--json"], initialized_catalog).stdout)
    assert [s["name"] for s in listed] == ["v1"]


def test_label_filter_and_min_per_label(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(6)], "dogs": [photo_like(s) for s in range(6, 8)],
                                   "owls": [photo_like(s) for s in range(8, 13)]})
    catalog.close()
    result = run_cli(["snapshot", "create", "big", "--min-per-label", "3", "--json"], initialized_catalog)
    data = json.loads(result.stdout)
    assert sorted(data["labels"]) == ["cats", "owls"] and data["excluded_labels"] == {"dogs": 2}
    only = json.loads(run_cli(["snapshot", "create", "owls", "--label", "owls", "--json"], initialized_catalog).stdout)
    assert list(only["labels"]) == ["owls"] and only["images"] == 5 and only["label_filter"] == ["owls"]


def test_diff_is_exact(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(10)], "dogs": [photo_like(s) for s in range(10, 20)]})
    snap(catalog, "a")
    old = {i.sha256: i for i in snapshot_items_of(catalog, "a")}
    cat_train = sorted(sha for sha, i in old.items() if i.label == "cats" and not i.is_valid)
    relabel(catalog, cat_train[0], "dogs")
    with catalog.session() as session:
        session.execute(update(Image).where(Image.sha256 == cat_train[1]).values(status="deleted"))
    grow(catalog, tmp_path / "b", {"cats": [photo_like(s) for s in range(20, 22)]})
    snap(catalog, "b")
    new = {i.sha256: i for i in snapshot_items_of(catalog, "b")}
    catalog.close()

    result = json.loads(run_cli(["snapshot", "diff", "a", "b", "--json"], initialized_catalog).stdout)
    added = sorted(new.keys() - old.keys())
    assert result["added"] == [{"sha256": s, "label": "cats", "split": "valid" if new[s].is_valid else "train"}
                               for s in added] and len(added) == 2
    assert result["removed"] == [{"sha256": cat_train[1], "label": "cats", "split": "train"}]
    assert result["relabelled"] == [{"sha256": cat_train[0], "from": "cats", "to": "dogs"}]
    assert result["moved"] == [] and result["unchanged"] == 18
    text = run_cli(["snapshot", "diff", "a", "b"], initialized_catalog).stdout.splitlines()
    assert text[0] == "a -> b: 2 added, 1 removed, 1 relabelled, 0 moved, 18 unchanged"
    assert f"  ~ {cat_train[0][:16]}  label cats -> dogs" in text

    # A new split with another seed moves images between train and valid; diff lists every move.
    run_cli(["split", "--seed", "9", "--new"], initialized_catalog)
    run_cli(["snapshot", "create", "c"], initialized_catalog)
    catalog = open_catalog(initialized_catalog)
    with catalog.session() as session:
        diff = diff_snapshots(session, "b", "c")
    third = {i.sha256: i for i in snapshot_items_of(catalog, "c")}
    catalog.close()
    expected = sorted(s for s in new if new[s].is_valid != third[s].is_valid)
    assert expected and [m["sha256"] for m in diff.moved] == expected
    assert all(m["from"] == ("valid" if new[m["sha256"]].is_valid else "train") for m in diff.moved)
    assert not diff.added and not diff.removed and not diff.relabelled


def test_export_trees_are_exact(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s) for s in range(6)],
                                   "dogs": [photo_like(s, fmt="JPEG") for s in range(6, 11)]})
    snap(catalog, "v1")
    items = snapshot_items_of(catalog, "v1")
    store = catalog.store
    catalog.close()

    out = tmp_path / "folder"
    result = run_cli(["snapshot", "export", "v1", str(out)], initialized_catalog)
    assert result.exit_code == 0, result.stderr
    expected = {f"{'valid' if i.is_valid else 'train'}/{i.label}/{i.sha256}.{i.store_path.rsplit('.', 1)[1]}": i
                for i in items}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == set(expected) | {"snapshot.json"}
    for rel, item in expected.items():
        assert not os.path.samefile(out / rel, store.path(item.store_path)), "copies: an edit cannot reach the store"
        assert (out / rel).read_bytes() == store.path(item.store_path).read_bytes()
    assert json.loads((out / "snapshot.json").read_text())["name"] == "v1"
    linked = tmp_path / "linked"
    assert run_cli(["snapshot", "export", "--link", "v1", str(linked)], initialized_catalog).exit_code == 0
    for rel, item in expected.items():
        assert os.path.samefile(linked / rel, store.path(item.store_path)), "--link: hard links, not copies"

    out_csv = tmp_path / "table"
    assert run_cli(["snapshot", "export", "v1", str(out_csv), "--format", "csv"], initialized_catalog).exit_code == 0
    with open(out_csv / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "label", "is_valid"]
    assert rows[1:] == [[f"images/{i.sha256}.{i.store_path.rsplit('.', 1)[1]}", i.label, str(i.is_valid)]
                        for i in items]
    assert {str(p.relative_to(out_csv)) for p in out_csv.rglob("*") if p.is_file()} == \
        {r[0] for r in rows[1:]} | {"labels.csv", "snapshot.json"}

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = run_cli(["snapshot", "export", "v1", str(busy)], initialized_catalog)
    assert refused.exit_code == 1 and "is not an empty folder" in refused.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "no half-written export left behind"


def test_prune_keeps_files_a_snapshot_holds(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    grow(catalog, tmp_path / "a", {"cats": [photo_like(s, (64, 64)) for s in range(4)] +
                                   [photo_like(s, (40, 40)) for s in range(4, 6)]})
    snap(catalog, "v1")
    store = catalog.store
    catalog.close()
    small = catalog_rows(initialized_catalog, "SELECT id, store_path FROM images WHERE width = 40")
    # Stricter rules now reject two images that snapshot v1 holds.
    result = run_cli(["verify", "--recheck", "--min-size", "50x50", "--prune"], initialized_catalog)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "Pruned: removed 0 file(s) of deleted or rejected images from the store.",
        "  kept 2 file(s) that snapshot v1 holds",
    ]
    assert all(store.exists(rel) for _, rel in small)
    assert catalog_rows(initialized_catalog, "SELECT DISTINCT status FROM images WHERE width = 40") == [("rejected",)]
    assert run_cli(["snapshot", "export", "v1", str(tmp_path / "out")], initialized_catalog).exit_code == 0

    assert run_cli(["snapshot", "delete", "v1"], initialized_catalog).stdout == "Deleted snapshot v1.\n"
    pruned = json.loads(run_cli(["verify", "--prune", "--json"], initialized_catalog).stdout)
    assert pruned["pruned"] == 2 and pruned["held_by_snapshot"] == {}
    assert not any(store.exists(rel) for _, rel in small)
    assert catalog_rows(initialized_catalog, "SELECT DISTINCT status FROM images WHERE width = 40") == [("deleted",)]
