"""The image lifecycle: reviewers outrank automatic steps, no `ok` image without its bytes, label claims
become conflicts, labels as objects, exports that cannot alter the store, and `check`; on both backends."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastclass.catalog import open_catalog
from fastclass.lifecycle import ALLOWED, TRANSITIONS, Actor, Status
from tests.helpers import catalog_rows, photo_like, run_cli, write


def near_pair(seed: int) -> tuple[bytes, bytes]:
    """One picture at two sizes: distinct bytes, a near-duplicate pair for dedup."""
    return photo_like(seed, (96, 96)), photo_like(seed, (80, 80))


def statuses(location: str) -> dict[int, tuple[str, str | None, bool, str | None]]:
    rows = catalog_rows(location, "SELECT i.id, i.status, l.name, i.reviewed, i.conflict FROM images i "
                                  "LEFT JOIN labels l ON l.id = i.label_id ORDER BY i.id")
    return {r[0]: (r[1], r[2], bool(r[3]), r[4]) for r in rows}


def assert_invariants(location: str, store_root: Path) -> None:
    """No ok image without its bytes; every stored file hashes to its name; reviewers' ok/deleted stand."""
    rows = catalog_rows(location, "SELECT id, sha256, store_path, status FROM images")
    for image_id, sha, rel, status in rows:
        if status == "ok":
            assert (store_root / rel).is_file(), f"image {image_id} is ok without its file"
    for path in store_root.glob("??/*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".")[0], path
    standing = catalog_rows(location, "SELECT r.image_id, r.new_status, r.id FROM reviews r WHERE r.action NOT IN "
                                      "('undo', 'merge') AND r.id NOT IN (SELECT undoes_id FROM reviews WHERE "
                                      "undoes_id IS NOT NULL) ORDER BY r.id")
    current = {r[0]: r[3] for r in rows}
    last = {}
    for image_id, new_status, _ in standing:
        last[image_id] = new_status
    later_undo = {r[0] for r in catalog_rows(location, "SELECT image_id FROM reviews WHERE action = 'undo'")}
    for image_id, decided in last.items():
        if decided in ("ok", "deleted") and image_id not in later_undo:
            assert current[image_id] == decided, f"image {image_id}: reviewer decided {decided}, now {current[image_id]}"


def test_the_table_reads_like_documentation():
    assert len(ALLOWED) == len(TRANSITIONS)
    assert all(t.why for t in TRANSITIONS)
    # Nothing automatic revives a deleted image, and only verify makes a pending image ok.
    assert all(actor == Actor.REVIEWER for (src, _), actors in ALLOWED.items() if src == Status.DELETED
               for actor in actors)
    assert ALLOWED[(Status.PENDING, Status.OK)] == {Actor.VERIFY}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "catalog.md").read_text()
    for t in TRANSITIONS:
        assert f"| {t.source.value} | {t.target.value} |" in doc, f"docs/catalog.md lacks {t.source}->{t.target}"


def test_a_kept_duplicate_stays_kept_when_dedup_runs_again(initialized_catalog, tmp_path):
    big, small = near_pair(1)
    write(tmp_path / "in" / "cats" / "big.png", big)
    write(tmp_path / "in" / "cats" / "small.png", small)
    run_cli(["import", str(tmp_path / "in")], initialized_catalog)
    run_cli(["verify"], initialized_catalog)
    first = json.loads(run_cli(["dedup", "--json"], initialized_catalog).stdout)
    assert first["duplicates"] == 1
    dup = next(i for i, s in statuses(initialized_catalog).items() if s[0] == "duplicate")
    write(tmp_path / "keep.csv", f"image,action,label\n{dup},keep,\n".encode())
    assert run_cli(["clean", "--apply", str(tmp_path / "keep.csv")], initialized_catalog).exit_code == 0
    assert statuses(initialized_catalog)[dup][0] == "ok"
    again = json.loads(run_cli(["dedup", "--json"], initialized_catalog).stdout)
    assert statuses(initialized_catalog)[dup][0] == "ok", "dedup overrode the reviewer's keep"
    assert again["decided"] == 1 and again["duplicates"] == 0
    assert "left as the reviewer decided" in run_cli(["dedup"], initialized_catalog).stdout


def test_a_pruned_image_never_comes_back_ok_without_its_bytes(initialized_catalog, tmp_path):
    store = tmp_path / "images"
    data = photo_like(7, (64, 64))
    write(tmp_path / "in" / "cats" / "a.png", data)
    run_cli(["import", str(tmp_path / "in")], initialized_catalog)
    run_cli(["verify"], initialized_catalog)
    assert run_cli(["delete", "1"], initialized_catalog).exit_code == 0
    assert run_cli(["prune"], initialized_catalog).exit_code == 0
    assert not any(store.glob("??/*"))
    review = catalog_rows(initialized_catalog, "SELECT id FROM reviews")[0][0]

    undo = run_cli(["undo", str(review)], initialized_catalog)
    assert undo.exit_code == 1
    assert "file is no longer in the image store (pruned)" in undo.stderr and "fastclass import" in undo.stderr
    write(tmp_path / "keep.csv", b"image,action,label\n1,keep,\n")
    applied = run_cli(["clean", "--apply", str(tmp_path / "keep.csv")], initialized_catalog)
    assert applied.exit_code == 1 and "keep.csv:2: image 1's file is no longer in the image store" in applied.stderr
    assert statuses(initialized_catalog)[1][0] == "deleted"
    assert_invariants(initialized_catalog, store)

    # The same bytes again bring the file back; then the keep is allowed (and checked).
    write(tmp_path / "again" / "a.png", data)
    run_cli(["import", str(tmp_path / "again"), "--label", "cats"], initialized_catalog)
    assert run_cli(["clean", "--apply", str(tmp_path / "keep.csv")], initialized_catalog).exit_code == 0
    assert statuses(initialized_catalog)[1][0] == "ok"
    assert_invariants(initialized_catalog, store)


def test_a_keep_in_the_prompt_of_a_pruned_image_is_refused(catalog, tmp_path):
    from fastclass.curate.review import decide
    from fastclass.curate.verify import prune_rejected, verify_images
    from fastclass.errors import FastclassError
    from fastclass.ingest.importer import import_folder

    write(tmp_path / "in" / "cats" / "a.png", photo_like(8, (64, 64)))
    with catalog.session() as session:
        import_folder(session, catalog.store, tmp_path / "in", workers=1)
        verify_images(session, catalog.store, workers=1)
        decide(session, catalog.store, 1, "delete", reviewer="t")
        prune_rejected(session, catalog.store)
        with pytest.raises(FastclassError, match="no longer in the image store"):
            decide(session, catalog.store, 1, "keep", reviewer="t")
        session.rollback()
    assert catalog_rows(catalog.location, "SELECT status FROM images") == [("deleted",)]


def test_the_same_bytes_for_two_classes_are_one_conflict_settled_by_one_decision(initialized_catalog, tmp_path):
    for n in range(3):
        write(tmp_path / "a" / f"{n}.png", photo_like(20 + n))
    run_cli(["import", str(tmp_path / "a"), "--label", "cats"], initialized_catalog)
    second = run_cli(["import", str(tmp_path / "a"), "--label", "dogs"], initialized_catalog)
    assert "3 file(s) were already in the catalog under another label" in second.stdout
    assert json.loads(run_cli(["stats", "--json"], initialized_catalog).stdout)["conflicts"] == 3
    conflicts = json.loads(run_cli(["dedup", "--conflicts", "--json"], initialized_catalog).stdout)
    assert [sorted(c["label"] for c in item["claims"]) for item in conflicts] == [["cats", "dogs"]] * 3
    assert all(item["kind"] == "labels" for item in conflicts)
    run_cli(["verify"], initialized_catalog)
    run_cli(["split"], initialized_catalog)
    refused = run_cli(["snapshot", "create", "v1"], initialized_catalog)
    assert refused.exit_code == 1 and "3 ok image(s) have open label conflicts" in refused.stderr

    # One decision each settles it: keep (cats stays), relabel (dogs), delete.
    write(tmp_path / "d.csv", b"image,action,label\n1,keep,\n2,relabel,dogs\n3,delete,\n")
    assert run_cli(["clean", "--apply", str(tmp_path / "d.csv")], initialized_catalog).exit_code == 0
    assert json.loads(run_cli(["dedup", "--conflicts", "--json"], initialized_catalog).stdout) == []
    assert json.loads(run_cli(["stats", "--json"], initialized_catalog).stdout)["conflicts"] == 0
    assert [s[3] for s in statuses(initialized_catalog).values()] == [None, None, None]
    # Undoing the keep opens the conflict again.
    keep_review = catalog_rows(initialized_catalog, "SELECT id FROM reviews WHERE action = 'keep'")[0][0]
    run_cli(["undo", str(keep_review)], initialized_catalog)
    assert statuses(initialized_catalog)[1][3] == "labels"


def test_a_crawl_of_known_bytes_for_another_class_records_the_claim(initialized_catalog, tmp_path):
    from tests.webserver import EngineSite

    site = EngineSite()
    try:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(site.add_image(f"{n}.png", photo_like(30 + n), "image/png") + "\n" for n in range(2)))
        cats = run_cli(["crawl", "--urls", str(urls), "--label", "cats", "--allow-private"], initialized_catalog)
        assert cats.exit_code == 0 and "already in the catalog under another label" not in cats.stdout
        dogs = run_cli(["crawl", "--urls", str(urls), "--label", "dogs", "--allow-private"], initialized_catalog)
    finally:
        site.close()
    assert "2 image(s) were already in the catalog under another label" in dogs.stdout
    assert {s[3] for s in statuses(initialized_catalog).values()} == {"labels"}
    claims = json.loads(run_cli(["dedup", "--conflicts", "--json"], initialized_catalog).stdout)
    assert sorted(c["label"] for c in claims[0]["claims"]) == ["cats", "dogs"]


def test_labels_rename_merge_delete_with_history_and_stable_digits(initialized_catalog, tmp_path):
    for label, seed in (("cats", 40), ("cofee", 41), ("dogs", 42)):
        write(tmp_path / "in" / label / "a.png", photo_like(seed))
    run_cli(["import", str(tmp_path / "in")], initialized_catalog)
    labels = {r["name"]: r["digit"] for r in json.loads(run_cli(["labels", "--json"], initialized_catalog).stdout)}
    assert labels == {"cats": 1, "cofee": 2, "dogs": 3}

    typo = run_cli(["label", "set", "coffe", "1"], initialized_catalog)
    assert typo.exit_code == 1 and "no label 'coffe' in the catalog; did you mean 'cofee'?" in typo.stderr
    assert run_cli(["label", "rename", "cofee", "coffee"], initialized_catalog).exit_code == 0
    merged = run_cli(["label", "merge", "dogs", "coffee"], initialized_catalog)
    assert merged.exit_code == 0 and "1 image(s) relabelled" in merged.stdout
    assert run_cli(["label", "delete", "coffee"], initialized_catalog).exit_code == 1
    run_cli(["label", "set", "--create", "birds", "1"], initialized_catalog)
    assert run_cli(["label", "delete", "cats"], initialized_catalog).exit_code == 0
    labels = {r["name"]: r["digit"] for r in json.loads(run_cli(["labels", "--json"], initialized_catalog).stdout)}
    # coffee kept its 2 through the rename; birds took the first free digit (dogs' 3 was freed by the merge).
    assert labels == {"coffee": 2, "birds": 3}
    history = json.loads(run_cli(["label", "history", "--json"], initialized_catalog).stdout)
    assert [(h["action"], h["old"], h["new"], h["images"]) for h in history] == [
        ("delete", "cats", None, 0), ("merge", "dogs", "coffee", 1), ("rename", "cofee", "coffee", 1)]
    # The merged image's move is undoable: its label comes back.
    merge_review = catalog_rows(initialized_catalog, "SELECT id FROM reviews WHERE action = 'merge'")[0][0]
    assert run_cli(["undo", str(merge_review)], initialized_catalog).exit_code == 0
    assert "dogs" in {r["name"] for r in json.loads(run_cli(["labels", "--json"], initialized_catalog).stdout)}
    forced = run_cli(["label", "delete", "--force", "dogs"], initialized_catalog)
    assert forced.exit_code == 0 and "1 image(s) marked deleted" in forced.stdout


def test_an_edited_export_never_reaches_the_store_and_check_finds_damage(initialized_catalog, tmp_path):
    store = tmp_path / "images"
    for label in ("cats", "dogs"):
        for n in range(3):
            write(tmp_path / "in" / label / f"{n}.png", photo_like(hash((label, n)) % 1000))
    run_cli(["import", str(tmp_path / "in")], initialized_catalog)
    run_cli(["verify"], initialized_catalog)
    run_cli(["split"], initialized_catalog)
    run_cli(["snapshot", "create", "v1"], initialized_catalog)
    out = run_cli(["snapshot", "export", "v1", str(tmp_path / "export")], initialized_catalog)
    assert out.exit_code == 0 and "0 hard-linked" in out.stdout
    exported = sorted((tmp_path / "export").glob("*/*/*.png"))
    Image.new("RGB", (50, 50), "red").save(exported[0])  # an editor saving over the exported file in place
    assert_invariants(initialized_catalog, store)
    clean = json.loads(run_cli(["check", "--json"], initialized_catalog).stdout)
    assert clean["clean"] and clean["files"] == 6

    linked = run_cli(["snapshot", "export", "--link", "v1", str(tmp_path / "linked")], initialized_catalog)
    assert "6 hard-linked" in linked.stdout
    shown = run_cli(["snapshot", "show", "v1"], initialized_catalog).stdout
    assert "Files not re-hashed" in shown

    # Plant damage: one file altered in the store, one removed, one orphan.
    files = sorted(store.glob("??/*.png"))
    files[0].write_bytes(photo_like(999))
    files[1].unlink()
    write(store / "ab" / ("ab" + "0" * 62 + ".png"), photo_like(998))
    found = run_cli(["check", "--json"], initialized_catalog)
    assert found.exit_code == 1
    report = json.loads(found.stdout)
    assert len(report["altered"]) == 1 and len(report["missing"]) == 1 and len(report["orphans"]) == 1
    assert report["in_snapshots"] == {"v1": 2}
    content = json.loads(run_cli(["snapshot", "show", "--content", "--json", "v1"], initialized_catalog).stdout)
    assert content["check"] == "content" and len(content["damaged"]) == 2 and content["digest_ok"]
    repaired = json.loads(run_cli(["check", "--repair", "--json"], initialized_catalog).stdout)
    assert repaired["repaired"] == {"missing_rejected": 1, "altered_rejected": 1, "altered_quarantined": 1,
                                    "orphans_removed": 1}
    assert_invariants(initialized_catalog, store)
    after = json.loads(run_cli(["check", "--json"], initialized_catalog).stdout)
    assert after["orphans"] == [] and after["altered"] == []


def test_split_and_snapshot_say_what_they_leave_out(initialized_catalog, tmp_path):
    for n in range(4):
        write(tmp_path / "in" / "cats" / f"{n}.png", photo_like(60 + n))
    run_cli(["import", str(tmp_path / "in")], initialized_catalog)
    run_cli(["verify"], initialized_catalog)
    for n in range(2):
        write(tmp_path / "late" / "cats" / f"{n}.png", photo_like(70 + n))
    run_cli(["import", str(tmp_path / "late")], initialized_catalog)
    split = run_cli(["split", "--json"], initialized_catalog)
    assert json.loads(split.stdout)["skipped"] == {"pending": 2}
    snap = run_cli(["snapshot", "create", "v1"], initialized_catalog)
    assert "Left out 2 image(s): not verified yet: run `fastclass verify`" in snap.stderr


def test_verify_never_reverts_a_decision_made_while_it_runs(catalog, tmp_path):
    """A reviewer deletes images while verify is checking them: the deletes stand (the verdicts for those
    images are not written)."""
    from fastclass.curate.review import decide
    from fastclass.curate.verify import verify_images
    from fastclass.ingest.importer import import_folder

    for n in range(12):
        write(tmp_path / "in" / "cats" / f"{n}.png", photo_like(80 + n))
    with catalog.session() as session:
        import_folder(session, catalog.store, tmp_path / "in", workers=1)
    other = open_catalog(catalog.location)
    deleted = []

    def meanwhile(done: int, total: int) -> None:
        if done == 1:
            with other.session() as reviewer:
                for image_id in range(1, 12, 2):
                    decide(reviewer, other.store, image_id, "delete", reviewer="r")
                    deleted.append(image_id)

    try:
        with catalog.session() as session:
            result = verify_images(session, catalog.store, workers=1, progress=meanwhile)
    finally:
        other.close()
    assert result.changed_meanwhile == len(deleted) == 6
    rows = dict(catalog_rows(catalog.location, "SELECT id, status FROM images"))
    assert all(rows[i] == "deleted" for i in deleted)
    assert sorted(i for i, s in rows.items() if s == "ok") == [i for i in range(1, 13) if i not in deleted]


def test_two_imports_at_once_never_collide(initialized_catalog, tmp_path):
    """Overlapping imports (same files, same labels) in two processes, several times: no UNIQUE error."""
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        for n in range(30):
            write(folder / "cats" / f"{n}.png", photo_like(1000 + round_ * 100 + n, (48, 48)))
        env = {**os.environ, "FASTCLASS_CATALOG": initialized_catalog}
        procs = [subprocess.Popen([sys.executable, "-m", "fastclass", "-q", "import", str(folder), "--workers", "1"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert catalog_rows(initialized_catalog, "SELECT COUNT(*) FROM images") == [(90,)]
    assert catalog_rows(initialized_catalog, "SELECT COUNT(*) FROM sources") == [(90,)]


JPEG_MAGIC = b"\xff\xd8"
OPS = ("import", "verify", "dedup", "apply", "undo", "prune", "rename", "merge", "delete_label", "split",
       "snapshot", "export")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_command_sequences_keep_the_invariants(sqlite_catalog, tmp_path, seed):
    rng = random.Random(seed)
    location = sqlite_catalog
    store = Path(location).parent / "images"
    pool = []
    for n in range(10):
        big, small = near_pair(200 + n)
        pool += [big, small]
    truncated = photo_like(300, (64, 64), "JPEG")
    pool.append(truncated[: len(truncated) // 2])
    labels = ["cats", "dogs", "birds"]
    for step in range(30):
        op = rng.choice(OPS)
        if op == "import":
            folder = tmp_path / f"imp{step}"
            for n in rng.sample(range(len(pool)), 5):
                ext = "jpg" if pool[n].startswith(JPEG_MAGIC) else "png"
                write(folder / f"{n}.{ext}", pool[n])
            run_cli(["import", str(folder), "--label", rng.choice(labels)], location)
        elif op in ("verify", "dedup", "prune", "split"):
            run_cli([op], location)
        elif op == "apply":
            ids = [r[0] for r in catalog_rows(location, "SELECT id FROM images")]
            if ids:
                rows = "".join(f"{rng.choice(ids)},{rng.choice(['keep', 'delete', 'relabel'])},{rng.choice(labels)}\n"
                               for _ in range(3))
                write(tmp_path / f"d{step}.csv", ("image,action,label\n" + rows).encode())
                run_cli(["clean", "--apply", str(tmp_path / f"d{step}.csv"), "--create-labels"], location)
        elif op == "undo":
            reviews = [r[0] for r in catalog_rows(location, "SELECT id FROM reviews WHERE action <> 'undo'")]
            if reviews:
                run_cli(["undo", str(rng.choice(reviews))], location)
        elif op == "rename":
            old = rng.choice(labels)
            new = f"{old}_{step}"
            if run_cli(["label", "rename", old, new], location).exit_code == 0:
                labels[labels.index(old)] = new
        elif op == "merge":
            a, b = rng.sample(labels, 2)
            if run_cli(["label", "merge", a, b], location).exit_code == 0:
                labels.remove(a)
                labels.append(f"new{step}")
        elif op == "delete_label":
            name = rng.choice(labels)
            if run_cli(["label", "delete", name], location).exit_code == 0:
                labels.remove(name)
                labels.append(f"fresh{step}")
        elif op == "snapshot":
            run_cli(["snapshot", "create", f"s{step}", "--allow-conflicts"], location)
        else:
            snaps = [r[0] for r in catalog_rows(location, "SELECT name FROM snapshots")]
            if snaps:
                run_cli(["snapshot", "export", rng.choice(snaps), str(tmp_path / f"x{step}")], location)
        assert_invariants(location, store)
        in_snapshots_open = catalog_rows(location, "SELECT COUNT(*) FROM snapshot_items si JOIN snapshots s ON "
                                                   "s.id = si.snapshot_id JOIN images i ON i.id = si.image_id "
                                                   "WHERE i.conflict IS NOT NULL AND s.created_at > i.updated_at")
        assert in_snapshots_open == [(0,)], f"step {step} ({op}): a snapshot froze an open conflict"
    assert json.loads(run_cli(["check", "--json"], location).stdout)["clean"]
