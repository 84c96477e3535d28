"""`fastclass dedup`: exact search, groups, keepers, mirrored copies and label conflicts, on real images."""
from __future__ import annotations

import io
import json
import random

import numpy as np
from PIL import ImageOps

from fastclass.curate.dedup import near_duplicate_groups
from fastclass.ingest.hashsearch import HashIndex, find_pairs
from fastclass.sample import jpeg_bytes, load_photo, random_crop
from tests.helpers import catalog_rows, run_cli, write


def test_search_is_exact_against_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 2000, dtype=np.int64).view(np.uint64) << np.uint64(1)
    for k in range(60):  # planted near-copies at distances 0..12
        bits = rng.choice(64, size=k % 13, replace=False)
        hashes[1000 + k] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in bits))
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for threshold in (0, 4, 8, 10, 12):
        expected = set(zip(*[v.tolist() for v in np.nonzero(np.triu(distance <= threshold, 1))]))
        for chunks in (None, 3, 4, 5, 8):  # the automatic choice, and every split it may choose at scale
            a, b = find_pairs(hashes, hashes, threshold, chunks)
            found = {(int(x), int(y)) for x, y in zip(a, b) if x < y}
            assert found == expected, (threshold, chunks)


def variants(root):
    rng = random.Random(3)
    photo = load_photo("china.jpg")
    base = random_crop(photo, (320, 240), rng)
    other = random_crop(load_photo("flower.jpg"), (320, 240), rng)
    buf = io.BytesIO()
    base.convert("L").save(buf, "PNG")
    files = {
        "cats/original.jpg": jpeg_bytes(base, 92),
        "cats/small.jpg": jpeg_bytes(base.resize((160, 120)), 90),
        "cats/recompressed.jpg": jpeg_bytes(base, 40),
        "cats/cropped.jpg": jpeg_bytes(base.crop((4, 3, 316, 237)).resize((320, 240)), 90),
        "cats/gray.png": buf.getvalue(),
        "cats/mirrored.jpg": jpeg_bytes(ImageOps.mirror(base), 90),
        "cats/other.jpg": jpeg_bytes(other, 90),
        "dogs/other_again.jpg": jpeg_bytes(other.resize((640, 480)), 85),
    }
    for name, data in files.items():
        write(root / name, data)
    return root


def by_name(location):
    rows = catalog_rows(location, "SELECT s.uri, i.id, i.status, i.dup_group_id FROM images i "
                                 "JOIN sources s ON s.image_id = i.id")
    return {uri.rsplit("/", 1)[1]: (image_id, status, group) for uri, image_id, status, group in rows}


def test_groups_keepers_flip_and_conflicts(initialized_catalog, tmp_path):
    run_cli(["import", str(variants(tmp_path / "in"))], initialized_catalog)
    assert run_cli(["verify"], initialized_catalog).exit_code == 0
    plain = json.loads(run_cli(["dedup", "--json"], initialized_catalog).stdout)
    got = by_name(initialized_catalog)
    assert plain == {"images": 8, "groups": 2, "members": 7, "duplicates": 4, "conflicts": 1, "decided": 0,
                     "duplicates_per_label": {"cats": 4}, "embedding_pairs": None}
    group = got["original.jpg"][2]
    assert {n for n, (_, _, g) in got.items() if g == group} == {
        "original.jpg", "small.jpg", "recompressed.jpg", "cropped.jpg", "gray.png"}
    # Keeper: largest pixel count (all but small.jpg are 320x240), then verified, then oldest (lowest id).
    keeper = min(got[n][0] for n in ("original.jpg", "recompressed.jpg", "cropped.jpg", "gray.png"))
    assert [n for n, (i, s, g) in got.items() if g == group and s == "ok"] == \
        [n for n, (i, _, _) in got.items() if i == keeper]
    assert got["mirrored.jpg"][1:] == ("ok", None), "a mirrored copy is not matched without --flip"
    # The pair that spans two labels is a conflict: both stay ok.
    assert got["other.jpg"][1] == got["other_again.jpg"][1] == "ok"
    assert got["other.jpg"][2] == got["other_again.jpg"][2] is not None
    conflicts = json.loads(run_cli(["dedup", "--conflicts", "--json"], initialized_catalog).stdout)
    assert [sorted(m["label"] for m in c["members"]) for c in conflicts] == [["cats", "dogs"]]

    flipped = json.loads(run_cli(["dedup", "--flip", "--json"], initialized_catalog).stdout)
    assert flipped["duplicates"] == 5 and flipped["groups"] == 2
    assert by_name(initialized_catalog)["mirrored.jpg"][1] == "duplicate"

    again = json.loads(run_cli(["dedup", "--json"], initialized_catalog).stdout)
    assert again == plain, "re-running without --flip restores the mirrored copy"
    assert by_name(initialized_catalog)["mirrored.jpg"][1] == "pending"


def test_dry_run_changes_nothing(initialized_catalog, tmp_path):
    run_cli(["import", str(variants(tmp_path / "in"))], initialized_catalog)
    before = catalog_rows(initialized_catalog, "SELECT id, status, dup_group_id FROM images ORDER BY id")
    result = run_cli(["dedup", "--dry-run"], initialized_catalog)
    assert result.stdout.startswith("Would find 2 group(s) of near-duplicates among 8 image(s)")
    assert catalog_rows(initialized_catalog, "SELECT id, status, dup_group_id FROM images ORDER BY id") == before
    assert catalog_rows(initialized_catalog, "SELECT count(*) FROM duplicate_groups") == [(0,)]


def test_dedup_errors(sqlite_catalog):
    assert run_cli(["dedup", "--hash", "dhash", "--flip"], sqlite_catalog).stderr == \
        "Error: --flip works with --hash phash only\n"
    assert run_cli(["dedup", "--label", "nope"], sqlite_catalog).stderr == \
        "Error: no label 'nope' in the catalog (see `fastclass labels`)\n"


def brute_groups(hashes: np.ndarray, threshold: int, flipped: np.ndarray | None = None) -> set[frozenset]:
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= threshold
    if flipped is not None:
        close |= np.bitwise_count(flipped[:, None] ^ hashes[None, :]) <= threshold
        close |= close.T
    parent = list(range(len(hashes)))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in zip(*np.nonzero(close)):
        parent[root(int(a))] = root(int(b))
    groups: dict[int, set] = {}
    for position in range(len(hashes)):
        groups.setdefault(root(position), set()).add(position)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_groups_are_exact_with_many_equal_hashes_and_flips():
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**63, 1500, dtype=np.int64).view(np.uint64)
    hashes[:400] = 0  # near-blank images: one hash value many times
    hashes[400:420] = np.uint64(0b1011)  # and a few bits away from it
    for k in range(40):
        hashes[500 + k] = hashes[900 + k] ^ np.uint64(1 << int(rng.integers(64)))
    flipped = rng.integers(0, 2**63, 1500, dtype=np.int64).view(np.uint64)
    flipped[1000:1010] = hashes[1100:1110] ^ np.uint64(3)
    for threshold, flips in ((0, None), (4, None), (10, None), (10, flipped)):
        got = {frozenset(g) for g in near_duplicate_groups(hashes, threshold, flips)}
        assert got == brute_groups(hashes, threshold, flips), threshold


def test_a_few_queries_against_a_large_index_are_exact():
    rng = np.random.default_rng(3)
    index = rng.integers(0, 2**63, 20000, dtype=np.int64).view(np.uint64)
    queries = index[:5] ^ np.uint64(0b10110)
    queries = np.concatenate([queries, rng.integers(0, 2**63, 3, dtype=np.int64).view(np.uint64)])
    searcher = HashIndex(index, 10)
    q, i = searcher.search(queries)
    distance = np.bitwise_count(queries[:, None] ^ index[None, :])
    assert set(zip(q.tolist(), i.tolist())) == set(zip(*[v.tolist() for v in np.nonzero(distance <= 10)]))
    assert {(int(a), int(b)) for a, b in zip(*searcher.search(queries[:1]))} == {(0, 0)}
