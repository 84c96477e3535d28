"""The one owner of image state: the statuses, who may move an image between them, and guarded writes.

Every status change in fastclass goes through `move` (many images, one target) or `move_each` (a verdict
per image). Both are compare-and-set: a row changes only while it is still in the state its caller read,
so two commands running at once never revert each other, and a caller learns how many rows it really
changed. The table below is the whole lifecycle; docs/catalog.md shows it to users.

A reviewer's decision outranks every automatic step: images with `reviewed` set are never touched by
dedup (nor by a split's choice of what to leave out), and verify's verdicts apply only to rows still in
the status verify read. An image becomes `ok` only while its bytes are in the store: verify decodes them,
and a reviewer's keep of a duplicate or deleted image checks them inside the same transaction
(`revive_check`), after its row is locked, so a concurrent prune cannot slip between check and write.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass
from typing import Collection, Iterable, Sequence

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.orm import Session

from db.models import Image, ImageStatus, Snapshot, SnapshotItem, utcnow
from fastclass.errors import FastclassError

Status = ImageStatus
SQL_CHUNK = 500
KEEP_REASON = object()  # `move` leaves the stored reason as it is


class Actor(str, enum.Enum):
    """Who changes an image's status."""

    INGEST = "ingest"
    VERIFY = "verify"
    DEDUP = "dedup"
    PRUNE = "prune"
    CHECK = "check"
    REVIEWER = "reviewer"


class Conflict(str, enum.Enum):
    """Why an image is an open label conflict."""

    LABELS = "labels"  # its sources claim more than one label (crawled or imported for two classes)
    GROUP = "group"  # a near-duplicate group holds it under two labels


@dataclass(frozen=True)
class Transition:
    source: Status
    target: Status
    actors: frozenset[Actor]
    why: str


def _t(source: Status, target: Status, *actors: Actor, why: str) -> Transition:
    return Transition(source, target, frozenset(actors), why)


P, O, R, D, X = Status.PENDING, Status.OK, Status.REJECTED, Status.DUPLICATE, Status.DELETED
V, DD, PR, CH, RV = Actor.VERIFY, Actor.DEDUP, Actor.PRUNE, Actor.CHECK, Actor.REVIEWER

TRANSITIONS: tuple[Transition, ...] = (
    _t(P, O, V, why="its bytes decode and pass the rules"),
    _t(P, R, V, CH, why="its bytes do not decode, break a rule, or are missing or altered in the store"),
    _t(O, R, V, CH, why="`verify --recheck` under new rules, or `check` found its file missing or altered"),
    _t(R, O, V, why="`verify --recheck` under rules it now passes"),
    _t(P, D, DD, why="a near-copy of a better image (not reviewed)"),
    _t(O, D, DD, RV, why="a near-copy of a better image (not reviewed); or undo of a reviewer's keep"),
    _t(D, P, DD, why="no longer a near-copy after a regroup (verify checks it again)"),
    _t(D, R, CH, why="`check` found its file missing or altered"),
    _t(R, X, PR, RV, why="`prune` frees its file; or a reviewer deletes it"),
    _t(P, X, RV, why="a reviewer deletes it (its file stays until `prune`)"),
    _t(O, X, RV, why="a reviewer deletes it (its file stays until `prune`)"),
    _t(D, X, RV, why="a reviewer deletes it (its file stays until `prune`)"),
    _t(D, O, RV, why="a reviewer keeps it: its bytes are checked first"),
    _t(X, O, RV, why="a reviewer keeps or undeletes it: its bytes must be in the store and decode"),
    _t(X, P, RV, why="undo of a delete of an image never verified"),
    _t(X, R, RV, why="undo of a reviewer's delete of a rejected image"),
    _t(X, D, RV, why="undo of a reviewer's delete of a duplicate"),
)
ALLOWED: dict[tuple[Status, Status], frozenset[Actor]] = {(t.source, t.target): t.actors for t in TRANSITIONS}
assert len(ALLOWED) == len(TRANSITIONS), "one row per (source, target) in TRANSITIONS"

# Statuses whose images are usable or may become usable; rejected and deleted ones are out.
LIVE = (P, O, D)


def allowed(source: str, target: str, actor: Actor) -> bool:
    """Whether actor may move an image from source to target (staying put is always allowed)."""
    source, target = Status(source), Status(target)
    return source == target or actor in ALLOWED.get((source, target), frozenset())


def _require(sources: Iterable[str], target: str, actor: Actor) -> None:
    for source in sources:
        if not allowed(source, target, actor):
            raise FastclassError(f"{actor.value} may not move an image from {Status(source).value} to "
                                 f"{Status(target).value} (see the lifecycle in docs/catalog.md)")


def move(session: Session, actor: Actor, image_ids: Sequence[int], expect: Collection[str], target: str,
         reason: str | None | object = KEEP_REASON, unreviewed_only: bool = False, **values) -> int:
    """Set target status on those of image_ids still in one of the expected statuses; returns how many.

    reason (when given) replaces the stored reason; unreviewed_only leaves images a reviewer decided
    alone; further values are written alongside. In the caller's transaction.
    """
    _require(expect, target, actor)
    changes = {"status": Status(target).value, "updated_at": utcnow(), **values}
    if reason is not KEEP_REASON:
        changes["reason"] = reason
    changed = 0
    ids = list(image_ids)
    for start in range(0, len(ids), SQL_CHUNK):
        query = update(Image).where(Image.id.in_(ids[start:start + SQL_CHUNK]),
                                    Image.status.in_([Status(s).value for s in expect]))
        if unreviewed_only:
            query = query.where(Image.reviewed.is_(False))
        changed += session.execute(query.values(**changes).execution_options(synchronize_session=False)).rowcount
    return changed


def move_each(session: Session, actor: Actor, rows: Sequence[dict]) -> int:
    """A status per image, each applied only if the image is still in the status that was read.

    Each row: {"id", "expect", "status", "reason"} plus the same optional extra columns in every row
    (e.g. width, height, mode). Returns how many rows changed (as far as the driver reports it).
    """
    if not rows:
        return 0
    for row in rows:
        _require([row["expect"]], row["status"], actor)
    extra = [k for k in rows[0] if k not in ("id", "expect", "status", "reason")]
    table = Image.__table__
    statement = (update(table)
                 .where(and_(table.c.id == bindparam("b_id"), table.c.status == bindparam("b_expect")))
                 .values(status=bindparam("b_status"), reason=bindparam("b_reason"), updated_at=utcnow(),
                         **{k: bindparam(f"b_{k}") for k in extra}))
    params = [{"b_id": r["id"], "b_expect": Status(r["expect"]).value, "b_status": Status(r["status"]).value,
               "b_reason": r["reason"], **{f"b_{k}": r[k] for k in extra}} for r in rows]
    result = session.connection().execute(statement, params)
    return max(result.rowcount, 0)


def take_write_lock(session: Session) -> None:
    """On SQLite, take the database's one write lock now, before the reads that decide a write (a
    SELECT ... FOR UPDATE is a no-op there); the transaction holds it until it ends, waiting up to the
    busy timeout for another writer. On PostgreSQL nothing: rows are locked with FOR UPDATE, and ingest's
    look-ups take an advisory lock."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Image).where(Image.id == -1).values(status=Image.status))


def snapshots_holding(session: Session, image_ids: Iterable[int]) -> dict[int, list[str]]:
    """For each of the given images that any snapshot holds, the names of those snapshots: their files
    must stay (prune and check --repair keep them), since a snapshot never changes."""
    held: dict[int, list[str]] = defaultdict(list)
    ids = list(image_ids)
    for start in range(0, len(ids), 500):
        rows = session.execute(select(SnapshotItem.image_id, Snapshot.name)
                               .join(Snapshot, Snapshot.id == SnapshotItem.snapshot_id)
                               .where(SnapshotItem.image_id.in_(ids[start:start + 500]))
                               .order_by(Snapshot.name)).all()
        for image_id, snap_name in rows:
            held[image_id].append(snap_name)
    return dict(held)
