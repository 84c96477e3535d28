"""Exact search for perceptual hashes within a Hamming distance: near-copies among hashes, at catalog scale.

The search is exact (every pair within the Hamming threshold is found): multi-index hashing. The 64 bits
are split into m chunks with probe radii r_i where sum(r_i + 1) = t + 1, so two hashes within distance t
differ in at most r_i bits on some chunk i (pigeonhole). Each query only probes, per chunk, the buckets
whose chunk value is that close to its own, and every candidate is then checked on all 64 bits. Buckets
are a dense count/offset table per chunk (one array lookup per probe), and m is chosen per search from
the number of probes and the expected candidates (3 chunks of 21-22 bits for a million hashes).
"""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, ImageHash
from fastclass.errors import FastclassError
from fastclass.lifecycle import LIVE

MAX_CHUNK_BITS = 23  # a 2^23-entry table per chunk is 64 MiB of counts and offsets


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


DEFAULT_THRESHOLD = 10
"""Bits two 64-bit perceptual hashes may differ in and still be near-copies (`dedup --threshold`)."""


def near_copies(session: Session, image_ids: list[int], threshold: int = DEFAULT_THRESHOLD) -> set[int]:
    """The images among image_ids whose phash is within threshold of an older live image (a smaller id):
    a crop, resize or re-encode of something the catalog already had, though the bytes are new."""
    if not image_ids:
        return set()
    rows = session.execute(
        select(ImageHash.image_id, ImageHash.value).join(Image, Image.id == ImageHash.image_id)
        .where(ImageHash.kind == "phash", Image.status.in_(LIVE))).all()
    ids = np.array([r.image_id for r in rows], dtype=np.int64)
    values = np.array([r.value for r in rows], dtype=np.int64).view(np.uint64)
    wanted = np.isin(ids, np.array(image_ids, dtype=np.int64))
    query_ids, queries = ids[wanted], values[wanted]
    q, i = find_pairs(queries, values, threshold)
    older = ids[i] < query_ids[q]
    return {int(image_id) for image_id in query_ids[q[older]]}
