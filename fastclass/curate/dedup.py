"""`fastclass dedup`: exact near-duplicate search over stored perceptual hashes, groups, keepers and conflicts.

The search is exact (every pair within the Hamming threshold is found): multi-index hashing. The 64 bits
are split into m chunks with probe radii r_i where sum(r_i + 1) = t + 1, so two hashes within distance t
differ in at most r_i bits on some chunk i (pigeonhole). Each query only probes, per chunk, the buckets
whose chunk value is that close to its own, and every candidate is then checked on all 64 bits. Buckets
are a dense count/offset table per chunk (one array lookup per probe), and m is chosen per search from
the number of probes and the expected candidates (3 chunks of 21-22 bits for a million hashes).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import DuplicateGroup, Image, ImageHash, Label, Source
from fastclass.errors import FastclassError
from fastclass.ingest.hashes import HASH_KINDS
from fastclass.labels import existing_label_id, label_names
from fastclass.lifecycle import LIVE, Actor, Conflict, Status, move

MAX_CHUNK_BITS = 23  # a 2^23-entry table per chunk is 64 MiB of counts and offsets
ELIGIBLE = (Status.PENDING, Status.OK, Status.DUPLICATE)


def _masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit mask with at most `radius` bits set."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in combo) for combo in combinations(range(bits), r)]
    return np.array(masks, dtype=np.int64)


def _widths(chunks: int) -> list[int]:
    base, extra = divmod(64, chunks)
    return [base + (1 if c < extra else 0) for c in range(chunks)]


def _radii(threshold: int, widths: list[int]) -> list[int]:
    """Per-chunk probe radii r_i with sum(r_i + 1) = threshold + 1: two hashes within the threshold are
    then within r_i on some chunk i (pigeonhole). Narrow chunks (cheap to probe) get the larger radii; a
    radius of -1 means the chunk need not be probed at all."""
    shares, extra = divmod(threshold + 1, len(widths))
    by_width = sorted(range(len(widths)), key=lambda c: (widths[c], c))
    radii = [0] * len(widths)
    for rank, chunk in enumerate(by_width):
        radii[chunk] = shares + (1 if rank < extra else 0) - 1
    return radii


def _probes(width: int, radius: int) -> int:
    return sum(comb(width, r) for r in range(radius + 1))


def chunk_count(threshold: int, n_queries: int, n_index: int) -> int:
    """How many chunks make the search cheapest: probes (queries x masks) against candidates to check."""
    best: tuple[float, int] | None = None
    for chunks in range(2, 17):
        widths = _widths(chunks)
        if max(widths) > MAX_CHUNK_BITS:
            continue
        probes = [_probes(w, r) for w, r in zip(widths, _radii(threshold, widths))]
        candidates = sum(p * n_queries * n_index / 2 ** w for p, w in zip(probes, widths))
        cost = sum(probes) * (n_queries + 2 ** max(widths) / 64) + 4 * candidates
        if best is None or cost < best[0]:
            best = (cost, chunks)
    return best[1]


class HashIndex:
    """Per-chunk bucket tables over a set of 64-bit hashes, built once, searched many times (exact)."""

    BROADCAST_LIMIT = 1 << 22  # queries x masks handled at once when the queries are few

    def __init__(self, index: np.ndarray, threshold: int, chunks: int | None = None,
                 expected_queries: int | None = None) -> None:
        if threshold < 0 or threshold > 32:
            raise FastclassError("the dedup threshold must be between 0 and 32 bits")
        self.index = index
        self.threshold = threshold
        n_queries = len(index) if expected_queries is None else expected_queries
        widths = _widths(chunks or chunk_count(threshold, max(n_queries, 1), max(len(index), 1)))
        self.chunks = []
        shift = 0
        for width, radius in zip(widths, _radii(threshold, widths)):
            if radius >= 0:
                low = np.uint64((1 << width) - 1)
                keys = ((index >> np.uint64(shift)) & low).astype(np.int32)
                order = np.argsort(keys, kind="stable").astype(np.int32)
                counts = np.bincount(keys, minlength=1 << width).astype(np.int32)
                starts = (np.cumsum(counts, dtype=np.int64) - counts).astype(np.int32)
                self.chunks.append((shift, low, order, counts, starts, index[order],
                                    _masks(width, radius).astype(np.int32)))
            shift += width

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (q, i) with popcount(queries[q] ^ index[i]) <= threshold, each once."""
        found_q, found_i = [], []
        for shift, low, order, counts, starts, sorted_index, masks in self.chunks:
            query_keys = ((queries >> np.uint64(shift)) & low).astype(np.int32)
            # Queries in key order: a key XOR a mask keeps neighbouring keys together, so the table
            # lookups and candidate reads walk memory nearly in sequence.
            query_order = np.argsort(query_keys, kind="stable").astype(np.int32)
            sorted_keys, sorted_queries = query_keys[query_order], queries[query_order]
            if len(queries) * len(masks) <= self.BROADCAST_LIMIT:
                # Few queries (a new image against the catalog): every mask of every query at once.
                targets = (sorted_keys[:, None] ^ masks[None, :]).ravel()
                self._probe(targets, np.repeat(np.arange(len(queries)), len(masks)), counts, starts,
                            sorted_queries, sorted_index, query_order, order, found_q, found_i)
                continue
            positions = np.arange(len(queries))
            for mask in masks:
                self._probe(sorted_keys ^ mask, positions, counts, starts, sorted_queries, sorted_index,
                            query_order, order, found_q, found_i)
        if not found_q:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        pairs = np.unique(np.stack([np.concatenate(found_q).astype(np.int64),
                                    np.concatenate(found_i).astype(np.int64)], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def _probe(self, targets, positions, counts, starts, sorted_queries, sorted_index, query_order, order,
               found_q: list, found_i: list) -> None:
        hits = counts[targets]
        probe = np.flatnonzero(hits)
        if len(probe) == 0:
            return
        n = hits[probe]
        rep_pos = np.repeat(positions[probe], n)
        # Each candidate's place in key order: its bucket's start plus its rank within the bucket.
        offsets = np.repeat(starts[targets[probe]] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        close = np.flatnonzero(np.bitwise_count(sorted_queries[rep_pos] ^ sorted_index[offsets]) <= self.threshold)
        found_q.append(query_order[rep_pos[close]])
        found_i.append(order[offsets[close]])


def find_pairs(queries: np.ndarray, index: np.ndarray, threshold: int,
               chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (q, i) with popcount(queries[q] ^ index[i]) <= threshold, each once; hashes as uint64 arrays.

    `chunks` overrides the chosen split (3 or more, so that no chunk is wider than MAX_CHUNK_BITS).
    """
    return HashIndex(index, threshold, chunks, expected_queries=len(queries)).search(queries)


def near_duplicate_groups(hashes: np.ndarray, threshold: int,
                          flipped: np.ndarray | None = None) -> list[list[int]]:
    """Positions of hashes grouped transitively by distance <= threshold (and flipped[i] vs hashes[j]).

    The search runs over distinct hash values: equal hashes (near-blank images, exact copies under
    another format) are one bucket entry, so a thousand of them cost one probe, not a million pairs.
    """
    if len(hashes) == 0:
        return []
    values, node = np.unique(hashes, return_inverse=True)
    node = node.ravel()
    a, b = find_pairs(values, values, threshold)
    if flipped is not None:
        flip_values, flip_node = np.unique(flipped, return_inverse=True)
        fa, fb = find_pairs(flip_values, values, threshold)
        # Each pair (flipped value, value) links every image with that flipped value to that value.
        by_flip = np.argsort(flip_node.ravel(), kind="stable")
        per_value = np.bincount(flip_node.ravel(), minlength=len(flip_values))
        first = np.cumsum(per_value) - per_value
        n = per_value[fa]
        images = by_flip[np.repeat(first[fa] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))]
        a = np.concatenate([a, node[images]])
        b = np.concatenate([b, np.repeat(fb, n)])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(values), len(values)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for position, comp in enumerate(component[node]):
        members.setdefault(int(comp), []).append(position)
    return [m for m in members.values() if len(m) > 1]


@dataclass
class DedupResult:
    images: int = 0
    groups: int = 0
    members: int = 0
    duplicates: int = 0
    conflicts: int = 0
    decided: int = 0
    """Groups in which a reviewer's decision stands: their reviewed members were left as decided."""
    duplicates_per_label: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"images": self.images, "groups": self.groups, "members": self.members,
                "duplicates": self.duplicates, "conflicts": self.conflicts, "decided": self.decided,
                "duplicates_per_label": dict(self.duplicates_per_label)}


def _keeper_order(row) -> tuple:
    """Largest pixel count, then verified (ok) before pending, then oldest (by id, the ingest order)."""
    return (-(row.width * row.height), row.status not in (Status.OK, Status.DUPLICATE), row.id)


def find_near_duplicates(session: Session, threshold: int = 10, hash_kind: str = "phash", flip: bool = False,
                         label: str | None = None, dry_run: bool = False) -> DedupResult:
    """Regroup the eligible images from their stored hashes and mark non-keepers duplicate (unless dry_run)."""
    if hash_kind not in HASH_KINDS or hash_kind == "phash_flip":
        raise FastclassError(f"unknown hash kind {hash_kind!r}; use one of: phash, dhash")
    if flip and hash_kind != "phash":
        raise FastclassError("--flip works with --hash phash only")
    query = (select(Image.id, Image.width, Image.height, Image.status, Image.label_id, Image.reviewed,
                    ImageHash.value)
             .join(ImageHash, (ImageHash.image_id == Image.id) & (ImageHash.kind == hash_kind))
             .where(Image.status.in_(ELIGIBLE)).order_by(Image.id))
    if label is not None:
        label_id = existing_label_id(session, label)
        query = query.where(Image.label_id == label_id)
    rows = session.execute(query).all()
    result = DedupResult(images=len(rows))
    hashes = np.array([r.value for r in rows], dtype=np.int64).view(np.uint64)
    flipped = None
    if flip and rows:
        flips = dict(session.execute(select(ImageHash.image_id, ImageHash.value).where(
            ImageHash.kind == "phash_flip", ImageHash.image_id.in_([r.id for r in rows]))).all())
        flipped = np.array([flips.get(r.id, r.value) for r in rows], dtype=np.int64).view(np.uint64)
    groups = near_duplicate_groups(hashes, threshold, flipped)
    labels = label_names(session)
    _replace_groups(session, rows, groups, labels, threshold, hash_kind, flip, result, dry_run)
    return result


def _replace_groups(session: Session, rows, groups: list[list[int]], labels: dict[int, str], threshold: int,
                    hash_kind: str, flip: bool, result: DedupResult, dry_run: bool) -> None:
    ids = [r.id for r in rows]
    if not dry_run:
        # The previous grouping is replaced whole: images that are no longer a non-keeper go back to
        # pending, and verify re-checks them cheaply. Reviewed images keep what the reviewer decided.
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            move(session, Actor.DEDUP, chunk, [Status.DUPLICATE], Status.PENDING, reason=None, unreviewed_only=True)
            session.execute(update(Image).where(Image.id.in_(chunk)).values(dup_group_id=None))
            session.execute(update(Image).where(Image.id.in_(chunk), Image.conflict == Conflict.GROUP.value)
                            .values(conflict=None))
        session.execute(delete(DuplicateGroup).where(~DuplicateGroup.id.in_(
            select(Image.dup_group_id).where(Image.dup_group_id.is_not(None)))))
    for positions in groups:
        members = sorted((rows[p] for p in positions), key=_keeper_order)
        keeper = members[0]
        member_labels = {m.label_id for m in members}
        conflict = len(member_labels) > 1
        undecided = [m for m in members if not m.reviewed]
        result.groups += 1
        result.members += len(members)
        result.decided += len(undecided) < len(members)
        if conflict:
            result.conflicts += bool(undecided)
        else:
            marked = [m for m in members[1:] if not m.reviewed]
            result.duplicates += len(marked)
            if marked:
                result.duplicates_per_label[labels.get(keeper.label_id, "(unlabelled)")] += len(marked)
        if dry_run:
            continue
        group = DuplicateGroup(hash_kind=hash_kind, threshold=threshold, flip=flip, keeper_id=keeper.id,
                               size=len(members), label_count=len(member_labels), is_conflict=conflict)
        session.add(group)
        session.flush()
        session.execute(update(Image).where(Image.id.in_([m.id for m in members])).values(dup_group_id=group.id))
        if conflict:
            # Every member stays until a reviewer picks the label; the conflict is theirs to close.
            session.execute(update(Image).where(Image.id.in_([m.id for m in undecided]), Image.conflict.is_(None))
                            .values(conflict=Conflict.GROUP.value))
        else:
            move(session, Actor.DEDUP, [m.id for m in members[1:]], [Status.PENDING, Status.OK], Status.DUPLICATE,
                 reason=f"near-duplicate of image {keeper.id}", unreviewed_only=True)
    if dry_run:
        session.rollback()
    else:
        session.commit()


def list_conflicts(session: Session) -> list[dict]:
    """Open label conflicts, for review: each image whose sources claim several labels, with every claim
    and where it came from, and each near-duplicate group spanning labels with an undecided member."""
    out = []
    names = label_names(session)
    open_ids = session.scalars(select(Image.id).where(
        Image.conflict == Conflict.LABELS.value, Image.status.in_(LIVE)).order_by(Image.id)).all()
    for image_id in open_ids:
        image = session.get(Image, image_id)
        claims = session.execute(
            select(Label.name, Source.engine, Source.uri, Source.query, Source.crawl_job_id, Source.fetched_at)
            .join(Label, Label.id == Source.label_id).where(Source.image_id == image_id).order_by(Source.id)).all()
        out.append({"kind": Conflict.LABELS.value, "image": image_id, "sha256": image.sha256,
                    "label": names.get(image.label_id), "status": image.status,
                    "claims": [{"label": c.name, "engine": c.engine, "uri": c.uri, "query": c.query,
                                "crawl_job": c.crawl_job_id, "at": c.fetched_at} for c in claims]})
    groups = session.scalars(select(Image.dup_group_id).where(
        Image.conflict == Conflict.GROUP.value, Image.status.in_(LIVE)).distinct()).all()
    for group_id in sorted(g for g in groups if g is not None):
        group = session.get(DuplicateGroup, group_id)
        members = session.execute(
            select(Image.id, Image.sha256, Image.width, Image.height, Image.status, Image.conflict, Label.name)
            .outerjoin(Label, Label.id == Image.label_id)
            .where(Image.dup_group_id == group_id).order_by(Image.id)).all()
        out.append({"kind": Conflict.GROUP.value, "group": group_id, "keeper": group.keeper_id, "members": [
            {"image": m.id, "sha256": m.sha256, "label": m.name, "size": f"{m.width}x{m.height}",
             "status": m.status, "open": m.conflict is not None} for m in members]})
    return out
