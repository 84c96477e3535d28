"""`fastclass dedup`: near-duplicate groups over stored perceptual hashes (an exact search, see
fastclass.ingest.hashsearch), keepers and label conflicts."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import AuditPair, DuplicateGroup, Image, ImageHash, Label, Source
from fastclass.catalog import find_audit
from fastclass.errors import FastclassError
from fastclass.ingest.hashes import HASH_KINDS
from fastclass.ingest.hashsearch import DEFAULT_THRESHOLD, find_pairs
from fastclass.labels import existing_label_id, label_names
from fastclass.lifecycle import LIVE, Actor, Conflict, Status, move

ELIGIBLE = (Status.PENDING, Status.OK, Status.DUPLICATE)


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
    embedding_pairs: int | None = None
    """With --embeddings: the audit's near-copy pairs that joined the grouping."""
    duplicates_per_label: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"images": self.images, "groups": self.groups, "members": self.members,
                "duplicates": self.duplicates, "conflicts": self.conflicts, "decided": self.decided,
                "embedding_pairs": self.embedding_pairs,
                "duplicates_per_label": dict(self.duplicates_per_label)}


def _keeper_order(row) -> tuple:
    """Largest pixel count, then verified (ok) before pending, then oldest (by id, the ingest order)."""
    return (-(row.width * row.height), row.status not in (Status.OK, Status.DUPLICATE), row.id)


def find_near_duplicates(session: Session, threshold: int = DEFAULT_THRESHOLD, hash_kind: str = "phash",
                         flip: bool = False, label: str | None = None, dry_run: bool = False,
                         audit: int | None = None) -> DedupResult:
    """Regroup the eligible images from their stored hashes and mark non-keepers duplicate (unless dry_run).
    With `audit` (an audit id, or 0 for the latest), the near-copies that audit found in the embeddings
    join the groups too."""
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
    if audit is not None:
        groups = _with_audit_pairs(session, audit, [r.id for r in rows], groups, result)
    labels = label_names(session)
    _replace_groups(session, rows, groups, labels, threshold, hash_kind, flip, result, dry_run)
    return result


def _with_audit_pairs(session: Session, audit: int, ids: list[int], groups: list[list[int]],
                      result: DedupResult) -> list[list[int]]:
    """The hash groups joined by an audit's embedding near-copies (positions into ids, transitively)."""
    audit_id = find_audit(session, audit or None, "--embeddings").id
    position = {image_id: n for n, image_id in enumerate(ids)}
    pairs = [(position[a], position[b]) for a, b in session.execute(
        select(AuditPair.image_a, AuditPair.image_b).where(AuditPair.audit_id == audit_id)).all()
        if a in position and b in position]
    result.embedding_pairs = len(pairs)
    a = [p for g in groups for p in g[1:]] + [p for p, _ in pairs]
    b = [g[0] for g in groups for _ in g[1:]] + [q for _, q in pairs]
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for n, comp in enumerate(component):
        members.setdefault(int(comp), []).append(n)
    return [m for m in members.values() if len(m) > 1]


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


def duplicate_groups(session: Session, label: str | None = None, conflicts_only: bool = False) -> list[dict]:
    """Every duplicate group, largest first: its keeper first, then the other members by id."""
    query = select(DuplicateGroup).order_by(DuplicateGroup.size.desc(), DuplicateGroup.id)
    if conflicts_only:
        query = query.where(DuplicateGroup.is_conflict.is_(True))
    groups = session.scalars(query).all()
    members: dict[int, list[int]] = {}
    member_query = select(Image.dup_group_id, Image.id).where(Image.dup_group_id.is_not(None)).order_by(Image.id)
    if label is not None:
        member_query = member_query.where(Image.dup_group_id.in_(
            select(Image.dup_group_id).where(Image.label_id == existing_label_id(session, label))))
    for group_id, image_id in session.execute(member_query):
        members.setdefault(group_id, []).append(image_id)
    return [{"group": g.id, "keeper": g.keeper_id, "conflict": g.is_conflict, "hash": g.hash_kind,
             "images": [g.keeper_id] + [i for i in members[g.id] if i != g.keeper_id]}
            for g in groups if g.id in members]
