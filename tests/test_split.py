"""`fastclass split`: stable under growth, seeded, stratified, group-aware; on both catalog backends."""
from __future__ import annotations

import json

from sqlalchemy import select, update

from db.models import Image, Split, SplitAssignment
from fastclass.catalog import open_catalog
from fastclass.curate.dedup import find_near_duplicates
from fastclass.curate.review import decide
from fastclass.dataset.split import assign_splits
from tests.helpers import add_images, photo_like, pngs, run_cli, sqlite_catalog_named


def sides(catalog, split_id: int | None = None) -> dict[str, bool]:
    """sha256 -> is_valid for every assigned image of the given (default: current) split."""
    with catalog.session() as session:
        if split_id is None:
            split_id = session.scalar(select(Split.id).where(Split.is_current.is_(True)))
        return dict(session.execute(select(Image.sha256, SplitAssignment.is_valid).join(
            SplitAssignment, SplitAssignment.image_id == Image.id).where(SplitAssignment.split_id == split_id)).all())


def split(catalog, **kwargs):
    with catalog.session() as session:
        return assign_splits(session, **kwargs)


def test_adding_images_never_moves_old_ones(catalog, tmp_path):
    add_images(catalog, tmp_path / "a", {"cats": pngs(range(0, 50)), "dogs": pngs(range(100, 140))})
    first = split(catalog)
    before = sides(catalog)
    assert len(before) == 90 and first.assigned == 90 and first.created
    counts = {row.label: (row.train, row.valid) for row in first.labels}
    assert counts == {"cats": (40, 10), "dogs": (32, 8)}, "exactly round(0.2 x n) per label"

    assert split(catalog).assigned == 0, "re-running assigns nothing new"
    assert sides(catalog) == before

    add_images(catalog, tmp_path / "b", {"cats": pngs(range(50, 60)), "dogs": pngs(range(140, 148))})
    second = split(catalog)
    after = sides(catalog)
    assert second.assigned == 18 and not second.created
    assert {sha: after[sha] for sha in before} == before, "no old image changed side"
    for row in second.labels:
        assert abs(row.valid - round(0.2 * row.total)) <= 1, row
    assert {row.label: row.new for row in second.labels} == {"cats": 10, "dogs": 8}


def test_same_content_same_split_whatever_the_import_order(tmp_path):
    catalogs = []
    for name, order in (("one", range(30)), ("two", reversed(range(30)))):
        with sqlite_catalog_named(tmp_path, name) as catalog:
            add_images(catalog, tmp_path / name, {"cats": pngs(order)})
            split(catalog)
            catalogs.append(sides(catalog))
    assert catalogs[0] == catalogs[1]
    assert sum(catalogs[0].values()) == 6


def test_seed_change_is_a_new_split_asked_for_explicitly(catalog, tmp_path):
    add_images(catalog, tmp_path / "a", {"cats": pngs(range(40))})
    split(catalog)
    old = sides(catalog)
    try:
        split(catalog, seed=7)
    except Exception as exc:
        assert "add --new" in str(exc) and "--seed 42" in str(exc)
    else:
        raise AssertionError("a different seed must be refused without --new")
    result = split(catalog, seed=7, new=True)
    assert result.created and result.params.seed == 7
    new = sides(catalog)
    assert new.keys() == old.keys() and new != old, "another seed, another validation set"
    assert sum(new.values()) == sum(old.values()) == 8
    assert sides(catalog, split_id=1) == old, "the old split's assignments are kept for its snapshots"
    assert split(catalog).params.seed == 7, "a plain re-run extends the current split with its own settings"


def test_near_duplicate_groups_share_one_side(catalog, tmp_path):
    # Each seed appears at two sizes (a near-copy pair); seeds 0-4 also appear under a second label.
    spec = {"cats": [photo_like(s, size) for s in range(20) for size in ((64, 64), (48, 48))],
            "dogs": [photo_like(s, (56, 56)) for s in range(5)]}
    add_images(catalog, tmp_path / "a", spec)
    with catalog.session() as session:
        dedup = find_near_duplicates(session, threshold=10)
    assert dedup.groups == 20 and dedup.conflicts == 5
    first = split(catalog)
    assert first.skipped == {"conflict": 15}, "conflict groups wait for a reviewer"
    # A reviewer settles each conflict (the dogs copies are cats too); the groups then join the split.
    with catalog.session() as session:
        for image_id in session.scalars(select(Image.id).where(Image.conflict.is_not(None))).all():
            decide(session, catalog.store, image_id, "relabel", "cats", reviewer="t")
    split(catalog)
    with catalog.session() as session:
        rows = session.execute(select(Image.dup_group_id, Image.status, SplitAssignment.is_valid).join(
            SplitAssignment, SplitAssignment.image_id == Image.id)).all()
    assert len(rows) == 45, "duplicates get their keeper's side too"
    by_group: dict[int, set] = {}
    for group, _, is_valid in rows:
        by_group.setdefault(group, set()).add(is_valid)
    assert len(by_group) == 20 and all(len(s) == 1 for s in by_group.values())
    assert any(True in s for s in by_group.values())


def test_a_group_merged_later_is_pulled_to_its_keepers_side(catalog, tmp_path):
    add_images(catalog, tmp_path / "a", {"cats": [photo_like(s, (48, 48)) for s in range(10)]})
    split(catalog)
    before = sides(catalog)
    # A larger copy of a train image and of a valid image arrives; dedup makes each the keeper of a group.
    valid_seed = next(s for s in range(10) if before[_sha(catalog, s)])
    train_seed = next(s for s in range(10) if not before[_sha(catalog, s)])
    add_images(catalog, tmp_path / "b", {"cats": [photo_like(s, (96, 96)) for s in (valid_seed, train_seed)]})
    with catalog.session() as session:
        assert find_near_duplicates(session, threshold=10).groups == 2
    result = split(catalog)
    after = sides(catalog)
    assert result.regrouped == 0 and result.assigned == 2
    assert {sha: after[sha] for sha in before} == before
    with catalog.session() as session:
        rows = session.execute(select(Image.dup_group_id, SplitAssignment.is_valid).join(
            SplitAssignment, SplitAssignment.image_id == Image.id).where(Image.dup_group_id.is_not(None))).all()
    groups: dict[int, set] = {}
    for group, is_valid in rows:
        groups.setdefault(group, set()).add(is_valid)
    assert sorted(len(v) for v in groups.values()) == [1, 1], "the new keepers joined their copies' side"

    # Force a straddle (as if two images assigned apart were later found to be copies): the keeper's side wins.
    with catalog.session() as session:
        group_id, keeper_side = next((g, next(iter(s))) for g, s in groups.items())
        member = session.scalar(select(Image.id).where(Image.dup_group_id == group_id, Image.status == "duplicate"))
        session.execute(update(SplitAssignment).where(SplitAssignment.image_id == member)
                        .values(is_valid=not keeper_side))
    assert split(catalog).regrouped == 1
    with catalog.session() as session:
        assert session.scalar(select(SplitAssignment.is_valid).where(SplitAssignment.image_id == member)) == keeper_side


def _sha(catalog, seed: int) -> str:
    import hashlib

    return hashlib.sha256(photo_like(seed, (48, 48))).hexdigest()


def test_cli_reports_counts_and_warns_about_tiny_labels(initialized_catalog, tmp_path):
    catalog = open_catalog(initialized_catalog)
    add_images(catalog, tmp_path / "a", {"cats": pngs(range(10)), "lonely": pngs([99])})
    catalog.close()
    result = run_cli(["split"], initialized_catalog)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "New split #1 (--valid-pct 0.2 --seed 42 --min-valid 1): assigned 11 image(s).",
        "label                            train   valid  valid %    new",
        "cats                                 8       2    20.0%     10",
        "lonely                               1       0     0.0%      1  too small to split: all train",
    ]
    assert result.stderr == "Warning: 1 label(s) have too few images for a validation set: lonely\n"
    data = json.loads(run_cli(["split", "--json"], initialized_catalog).stdout)
    assert data["assigned"] == 0 and data["too_small"] == ["lonely"] and not data["created"]
    refused = run_cli(["split", "--valid-pct", "0.3"], initialized_catalog)
    assert refused.exit_code == 1 and refused.stderr == (
        "Error: the catalog's split #1 uses --valid-pct 0.2 --seed 42 --min-valid 1; splitting with "
        "--valid-pct 0.3 --seed 42 --min-valid 1 would change the validation set, so add --new to start a new "
        "split (snapshots keep the split they were made with)\n")
    assert run_cli(["split", "--valid-pct", "1.5", "--new"], initialized_catalog).stderr == \
        "Error: --valid-pct must be between 0 and 1 (exclusive), not 1.5\n"
