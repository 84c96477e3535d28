"""`fastclass clean` in a real pseudo-terminal, `--apply`, `label set`, `delete`, `reviews`, `undo`, `prune`,
and the terminal image preview."""
from __future__ import annotations

import json
import os
import signal
import sys

import pexpect
import pytest
from PIL import Image

from fastclass.catalog import open_catalog
from fastclass.cli.preview import detect_protocol, halfblock, render
from tests.helpers import add_images, catalog_rows, photo_like, run_cli

ENV = {"TERM": "xterm-256color", "COLORTERM": "truecolor", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "FASTCLASS_REVIEWER": "tester", "LANG": "C.UTF-8"}


@pytest.fixture
def pets(initialized_catalog, tmp_path) -> str:
    """cats: images 1-3, dogs: images 4-6 (ids in import order), all verified ok."""
    catalog = open_catalog(initialized_catalog)
    add_images(catalog, tmp_path / "in", {"cats": [photo_like(s) for s in range(3)],
                                          "dogs": [photo_like(s) for s in range(3, 6)]})
    catalog.close()
    return initialized_catalog


def spawn_clean(catalog: str, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", catalog, "clean", *args],
                          encoding="utf-8", timeout=30, dimensions=(30, 110), env=ENV)
    return child


def images(catalog: str) -> dict[int, tuple[str, str]]:
    return {i: (status, label) for i, status, label in catalog_rows(
        catalog, "SELECT i.id, i.status, l.name FROM images i JOIN labels l ON l.id = i.label_id")}


def test_every_key_is_in_the_catalog_at_once(pets):
    child = spawn_clean(pets)
    child.expect(r"image 1 \(1/6, not reviewed\)")
    child.send("k")
    child.expect("image 1 kept")
    assert catalog_rows(pets, "SELECT image_id, action, old_status, new_status, reviewer FROM reviews") == [
        (1, "keep", "ok", "ok", "tester")]
    child.send("d")
    child.expect("image 2 deleted")
    assert images(pets)[2] == ("deleted", "cats")
    child.send("2")  # the second label in the list: dogs
    child.expect("image 3 relabelled cats -> dogs")
    assert images(pets)[3] == ("ok", "dogs")
    child.send("r")
    child.expect("relabel to:")
    child.send("bir")
    child.send("ds\r")
    child.expect(r"label 'birds' does not exist; create it\? \[y/N\]")
    child.send("y")
    child.expect("image 4 relabelled dogs -> birds")
    assert images(pets)[4] == ("ok", "birds")
    child.send("u")
    child.expect(r"image 4 \(4/6, not reviewed\)")
    child.expect("undid relabel of image 4")
    assert images(pets)[4] == ("ok", "dogs")
    child.send("\x1b[D")  # left arrow: back to image 3
    child.expect(r"image 3 \(3/6, reviewed\)")
    child.send("b")
    child.expect(r"image 2 \(2/6, reviewed\)")
    child.send("k")  # a deleted image kept again
    child.expect("image 2 kept")
    assert images(pets)[2] == ("ok", "cats")
    child.send("s")  # skip to the next image not reviewed: 4
    child.expect(r"image 4 \(4/6, not reviewed\)")
    child.send("?")
    child.expect("1-9 +relabel to the label with that number")
    child.send("x")
    child.send("q")
    child.expect(pexpect.EOF)
    assert "Saved: 2 kept, 1 deleted, 1 relabelled, 1 undone this session." in child.before
    actions = [a for (a,) in catalog_rows(pets, "SELECT action FROM reviews ORDER BY id")]
    assert actions == ["keep", "delete", "relabel", "relabel", "undo", "keep"]


def test_a_killed_prompt_loses_nothing_and_resumes(pets):
    child = spawn_clean(pets)
    child.expect("q quit")
    child.send("kd")
    child.expect("image 2 deleted")
    os.kill(child.pid, signal.SIGKILL)
    child.expect(pexpect.EOF)
    assert catalog_rows(pets, "SELECT image_id, action FROM reviews ORDER BY id") == [(1, "keep"), (2, "delete")]
    again = spawn_clean(pets, "--status", "ok")
    # Image 2 is deleted now, so the ok filter holds 5 images; 1 of them was reviewed.
    again.expect("resuming at image 2 of 5 \\(1 reviewed before\\)")
    again.send("q")
    again.expect(pexpect.EOF)
    deleted = spawn_clean(pets, "--status", "deleted")
    deleted.expect(r"All 1 image\(s\) of this filter are reviewed")
    deleted.send("b")
    deleted.expect(r"image 2 \(1/1, reviewed\)  [0-9a-f]{12}  label: cats  status: deleted")
    deleted.send("q")
    deleted.expect(pexpect.EOF)


def test_ctrl_c_in_the_prompt_keeps_the_decisions(pets):
    child = spawn_clean(pets)
    child.expect("q quit")
    child.send("k")
    child.expect("image 1 kept")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert catalog_rows(pets, "SELECT count(*) FROM reviews") == [(1,)]


def test_apply_good_and_bad_rows(pets, tmp_path):
    sha5 = catalog_rows(pets, "SELECT sha256 FROM images WHERE id = 5")[0][0]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("image,action,label\n1,delete,\n" + f"{sha5[:10]},relabel,cats\n" + "99,keep,\n"
                         "2,explode,\n3,relabel,\n6,keep,\n")
    result = run_cli(["clean", "--apply", str(decisions)], pets)
    assert result.exit_code == 1
    assert result.stdout == f"Applied 3 decision(s) from {decisions}.\n"
    assert result.stderr.splitlines() == [
        f"Warning: {decisions}:4: no image with id 99 in the catalog",
        f"Warning: {decisions}:5: unknown action 'explode' (keep, delete or relabel)",
        f"Warning: {decisions}:6: relabel needs a label in the third column",
        f"Error: 3 bad row(s) in {decisions} were left out (listed above)",
    ]
    state = images(pets)
    assert state[1] == ("deleted", "cats") and state[5] == ("ok", "cats") and state[2] == ("ok", "cats")
    assert catalog_rows(pets, "SELECT image_id, action FROM reviews ORDER BY id") == [
        (1, "delete"), (5, "relabel"), (6, "keep")]


def test_scripted_decisions_history_undo_and_prune(pets, tmp_path):
    assert run_cli(["label", "set", "dogs", "1", "2"], pets).stdout == "Relabelled 2 image(s) to dogs.\n"
    assert run_cli(["label", "set", "dogs", "1", "nope"], pets).stderr == \
        "Error: no image 'nope' in the catalog (give an image id or its sha256)\n"
    assert run_cli(["delete", "3"], pets).exit_code == 0
    history = json.loads(run_cli(["reviews", "--json"], pets).stdout)
    assert [(r["image"], r["action"], r["old_label"], r["new_label"], r["new_status"]) for r in history] == [
        (3, "delete", "cats", "cats", "deleted"), (2, "relabel", "cats", "dogs", "ok"),
        (1, "relabel", "cats", "dogs", "ok")]
    run_cli(["label", "set", "--create", "birds", "1"], pets)
    first = history[-1]["id"]
    refused = run_cli(["undo", str(first)], pets)
    assert refused.stderr == f"Error: image 1 changed after review {first}; undo review 4 first\n"
    assert run_cli(["undo", "4"], pets).exit_code == 0
    assert run_cli(["undo", str(first)], pets).stdout.startswith(f"Undid review {first}: image 1 is ok, label cats")
    assert run_cli(["undo", str(first)], pets).stderr == f"Error: review {first} was already undone\n"
    assert images(pets)[1] == ("ok", "cats")

    store_path = catalog_rows(pets, "SELECT store_path FROM images WHERE id = 3")[0][0]
    store = str(tmp_path / "images")
    assert os.path.exists(os.path.join(store, store_path)), "deleting keeps the file until prune"
    assert run_cli(["prune"], pets).stdout == "Pruned: removed 1 file(s) of deleted or rejected images from the store.\n"
    assert not os.path.exists(os.path.join(store, store_path))


def test_clean_needs_a_terminal_and_known_orders(pets):
    result = run_cli(["clean"], pets)
    assert result.exit_code == 1 and result.stderr == (
        "Error: clean needs a terminal; in scripts use `fastclass clean --apply decisions.csv`, "
        "`fastclass label set` or `fastclass delete`\n")
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", pets, "clean", "--order", "loss"],
                          encoding="utf-8", timeout=30, env=ENV)
    child.expect(pexpect.EOF)
    assert "Error: --order loss needs --run RUN: the training run whose per-image losses to order by" in child.before


def test_halfblock_preview_is_exact_truecolor():
    img = Image.new("RGB", (2, 2))
    img.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)])
    assert halfblock(img, 2, 1) == ("\x1b[38;2;255;0;0m\x1b[48;2;0;0;255m\u2580"
                                    "\x1b[38;2;0;255;0m\x1b[48;2;255;255;255m\u2580\x1b[0m\n")
    wide = Image.new("RGB", (40, 10), (10, 20, 30))
    out = halfblock(wide, 20, 10)
    assert out.count("\n") == 3 and out.count("\u2580") == 60 and "38;2;10;20;30" in out


def test_protocol_detection_and_inline_protocols():
    assert detect_protocol({"TERM": "xterm-kitty"}) == "kitty"
    assert detect_protocol({"TERM_PROGRAM": "iTerm.app"}) == "iterm"
    assert detect_protocol({"TERM": "mlterm"}) == "sixel"
    assert detect_protocol({"TERM": "xterm-256color", "COLORTERM": "truecolor"}) == "halfblock"
    assert detect_protocol({"TERM": "xterm-kitty", "FASTCLASS_PREVIEW": "halfblock"}) == "halfblock"
    img = Image.new("RGB", (30, 20), (200, 100, 50))
    assert render(img, "kitty", 10, 5).startswith("\x1b_Ga=T,f=100,c=10,r=5,m=0;")
    assert render(img, "iterm", 10, 5).startswith("\x1b]1337;File=inline=1;")
    sixel = render(img, "sixel", 10, 5)
    assert sixel.startswith('\x1bPq"1;1;') and sixel.endswith("\x1b\\\n") and "#0;2;78;39;19" in sixel


def test_conflict_filter_walks_groups_that_span_labels(catalog, tmp_path):
    add_images(catalog, tmp_path / "in", {"cats": [photo_like(0, (64, 64)), photo_like(1)],
                                          "dogs": [photo_like(0, (56, 56)), photo_like(2)]})
    from fastclass.curate.dedup import find_near_duplicates
    from fastclass.curate.review import image_card, review_queue

    with catalog.session() as session:
        assert find_near_duplicates(session).conflicts == 1
        queue = review_queue(session, status="conflict")
        cards = [image_card(session, image_id) for image_id in queue]
    assert [c.label for c in cards] == ["cats", "dogs"]
    assert all(c.conflict and c.group_labels == ["cats", "dogs"] and c.group_size == 2 for c in cards)


def test_a_page_of_the_queue_from_the_database_is_the_same_as_slicing_the_whole_queue(initialized_catalog, tmp_path):
    """The gallery pages the label and newest orders in SQL (review_page); it must agree with review_queue,
    the prompt's order, image for image, and count the same standing decisions (undone ones excluded)."""
    from fastclass.curate.review import decide, review_page, review_queue, reviewed_ids, undo

    catalog = open_catalog(initialized_catalog)
    add_images(catalog, tmp_path / "in", {"cats": [photo_like(s) for s in range(7)],
                                          "dogs": [photo_like(s) for s in range(7, 12)]})
    with catalog.session() as session:
        for image_id, action in ((2, "keep"), (3, "delete"), (9, "keep"), (10, "delete")):
            last = decide(session, catalog.store, image_id, action, None, "tester")
        undo(session, catalog.store, last.review_id, "tester")
        for label in (None, "cats"):
            for status in ("ok", "deleted"):
                for order in ("label", "newest"):
                    queue = review_queue(session, label, status, order)
                    for page in (1, 2, 3):
                        assert review_page(session, label, status, order, None, None, page, 4) == (
                            queue[(page - 1) * 4:page * 4], len(queue), len(reviewed_ids(session, queue))), (
                            label, status, order, page)
        assert review_page(session, None, "ok", "label", None, None, 1, 100)[1:] == (11, 2)
    catalog.close()
