"""`fastclass split`: stable, seeded, stratified and group-aware train/valid assignment, kept in the catalog.

An assignment is written once per image and never recomputed, so images added later cannot move an old
one. New images are assigned as units: a near-duplicate group (all its members, whatever their status)
or a single image. A unit that already has a member assigned follows it; the other units of a label are
ranked by a score that depends only on the seed and the unit's content (the smallest sha256 among its
members), and the lowest-ranked go to valid until the label's valid count reaches its target. So the
same catalog gives the same split whatever order its images arrived in, and each label's valid count is
within one image of round(valid_pct x its ok images) wherever singletons allow.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.models import DuplicateGroup, Image, Label, Split, SplitAssignment
from fastclass.errors import FastclassError
from fastclass.lifecycle import Status

DEFAULT_VALID_PCT = 0.2
DEFAULT_SEED = 42
DEFAULT_MIN_VALID = 1
ASSIGNED_STATUSES = (Status.OK, Status.DUPLICATE)
INSERT_BATCH = 20_000


@dataclass(frozen=True)
class SplitParams:
    valid_pct: float = DEFAULT_VALID_PCT
    seed: int = DEFAULT_SEED
    min_valid: int = DEFAULT_MIN_VALID

    def describe(self) -> str:
        return f"--valid-pct {self.valid_pct:g} --seed {self.seed} --min-valid {self.min_valid}"


@dataclass
class LabelSplit:
    """Counts of one label's ok images after a split run."""

    label: str
    train: int = 0
    valid: int = 0
    new: int = 0
    too_small: bool = False

    @property
    def total(self) -> int:
        return self.train + self.valid

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"label": self.label, "train": self.train, "valid": self.valid, "new": self.new,
                "valid_fraction": round(self.valid_fraction, 4), "too_small": self.too_small}


@dataclass
class SplitResult:
    split_id: int
    params: SplitParams
    created: bool
    assigned: int = 0
    regrouped: int = 0
    labels: list[LabelSplit] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Images left out and why: "pending" (run verify), "conflict" (a reviewer must pick the label)."""

    @property
    def too_small(self) -> list[str]:
        return [row.label for row in self.labels if row.too_small]

    def as_dict(self) -> dict:
        return {"split": self.split_id, "valid_pct": self.params.valid_pct, "seed": self.params.seed,
                "min_valid": self.params.min_valid, "created": self.created, "assigned": self.assigned,
                "regrouped": self.regrouped, "labels": [row.as_dict() for row in self.labels],
                "too_small": self.too_small, "skipped": self.skipped}


def current_split(session: Session) -> Split | None:
    return session.scalar(select(Split).where(Split.is_current.is_(True)).order_by(Split.id.desc()).limit(1))


def unit_score(seed: int, key: str) -> int:
    """The rank of a unit within its label: a keyed hash of its content, the same on every machine."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


def valid_target(total: int, params: SplitParams) -> int:
    """How many of a label's `total` ok images belong in valid; 0 when the label is too small to split."""
    if total < params.min_valid + 1 or total < 2:
        return 0
    return min(total - 1, max(params.min_valid, round(total * params.valid_pct)))


def _resolve_params(current: Split | None, valid_pct: float | None, seed: int | None,
                    min_valid: int | None) -> SplitParams:
    base = (SplitParams(current.valid_pct, current.seed, current.min_valid) if current is not None
            else SplitParams())
    params = SplitParams(base.valid_pct if valid_pct is None else valid_pct,
                         base.seed if seed is None else seed,
                         base.min_valid if min_valid is None else min_valid)
    if not 0.0 < params.valid_pct < 1.0:
        raise FastclassError(f"--valid-pct must be between 0 and 1 (exclusive), not {params.valid_pct:g}")
    if params.min_valid < 0:
        raise FastclassError("--min-valid cannot be negative")
    return params


@dataclass(slots=True)
class _Unit:
    key: str
    label_id: int | None
    members: list[tuple[int, int | None, bool]]
    """(image id, label id, status is ok) of every member."""
    assigned: dict[int, bool]
    ok_members: int
    keeper_side: bool | None = None


def assign_splits(session: Session, valid_pct: float | None = None, seed: int | None = None,
                  min_valid: int | None = None, new: bool = False) -> SplitResult:
    """Extend the current split to every unassigned ok image (and its duplicates), or start a new split.

    Options left as None take the current split's values (the defaults for the first split). Asking for
    other values than the current split's is refused unless `new` is set: a new split is a new
    validation set, and runs trained on the old one could no longer be compared.
    """
    current = current_split(session)
    params = _resolve_params(current, valid_pct, seed, min_valid)
    created = False
    if current is not None and not new:
        held = SplitParams(current.valid_pct, current.seed, current.min_valid)
        if held != params:
            raise FastclassError(
                f"the catalog's split #{current.id} uses {held.describe()}; splitting with "
                f"{params.describe()} would change the validation set, so add --new to start a new split "
                "(snapshots keep the split they were made with)")
    if current is None or new:
        if current is not None:
            session.execute(update(Split).where(Split.is_current.is_(True)).values(is_current=False))
        current = Split(valid_pct=params.valid_pct, seed=params.seed, min_valid=params.min_valid,
                        is_current=True)
        session.add(current)
        session.flush()
        created = True
    result = SplitResult(split_id=current.id, params=params, created=created)
    units = _load_units(session, current.id)
    decisions = _decide(units, params)
    new_per_label = _write(session, current.id, units, decisions, result)
    _count(session, current.id, result, params, new_per_label)
    result.skipped = left_out(session)
    return result


def left_out(session: Session, label_ids: list[int] | None = None) -> dict[str, int]:
    """How many images a split or snapshot leaves out, by why: pending (not verified yet) and open label
    conflicts (ok or duplicate images whose label a reviewer must pick first)."""
    pending = select(func.count()).select_from(Image).where(Image.status == Status.PENDING)
    conflict = select(func.count()).select_from(Image).where(Image.conflict.is_not(None),
                                                             Image.status.in_(ASSIGNED_STATUSES))
    if label_ids is not None:
        pending = pending.where(Image.label_id.in_(label_ids))
        conflict = conflict.where(Image.label_id.in_(label_ids))
    counts = {"pending": session.scalar(pending), "conflict": session.scalar(conflict)}
    return {why: n for why, n in counts.items() if n}


def _load_units(session: Session, split_id: int) -> list[_Unit]:
    rows = session.execute(
        select(Image.id, Image.sha256, Image.status, Image.label_id, Image.dup_group_id,
               SplitAssignment.is_valid)
        .outerjoin(SplitAssignment, (SplitAssignment.image_id == Image.id) & (SplitAssignment.split_id == split_id))
        # An open label conflict waits for its reviewer: its label decides the stratum it joins.
        .where(Image.status.in_(ASSIGNED_STATUSES), Image.conflict.is_(None))
    ).all()
    keepers = dict(session.execute(select(DuplicateGroup.id, DuplicateGroup.keeper_id)).all())
    grouped: dict[int, list] = defaultdict(list)
    units: list[_Unit] = []
    # Plain tuple unpacking: this loop sees every image of the catalog.
    for image_id, sha, status, label_id, group_id, is_valid in rows:
        if group_id is not None:
            grouped[group_id].append((image_id, sha, status, label_id, is_valid))
        elif status == Status.OK:
            assigned = {} if is_valid is None else {image_id: is_valid}
            units.append(_Unit(sha, label_id, [(image_id, label_id, True)], assigned, 1))
    for group_id, members in grouped.items():
        ok = [m for m in members if m[2] == Status.OK]
        if not ok:
            continue
        keeper = next((m for m in members if m[0] == keepers.get(group_id)), None)
        # The group is stratified under its keeper's label (conflict groups keep every member, all ok).
        head = keeper if keeper is not None and keeper[2] == Status.OK else min(ok)
        assigned = {m[0]: m[4] for m in members if m[4] is not None}
        units.append(_Unit(min(m[1] for m in members), head[3], [(m[0], m[3], m[2] == Status.OK) for m in members],
                           assigned, len(ok), assigned.get(keeper[0]) if keeper is not None else None))
    return units


def _decide(units: list[_Unit], params: SplitParams) -> dict[int, bool]:
    """The side of every unit that needs one written (new units, and groups whose members disagree)."""
    decisions: dict[int, bool] = {}
    per_label: dict[int | None, dict] = defaultdict(lambda: {"total": 0, "valid": 0, "new": []})
    for index, unit in enumerate(units):
        stats = per_label[unit.label_id]
        stats["total"] += unit.ok_members
        if unit.assigned:
            side = _settled_side(unit)
            if side:
                stats["valid"] += unit.ok_members
            if len(unit.assigned) < len(unit.members) or len(set(unit.assigned.values())) > 1:
                decisions[index] = side
        else:
            stats["new"].append(index)
    for stats in per_label.values():
        need = valid_target(stats["total"], params) - stats["valid"]
        fresh = sorted(stats["new"], key=lambda i: (unit_score(params.seed, units[i].key), units[i].key))
        for index in fresh:
            size = units[index].ok_members
            decisions[index] = 0 < size <= need
            if decisions[index]:
                need -= size
    return decisions


def _settled_side(unit: _Unit) -> bool:
    """The side of a unit with assigned members: its keeper's, else the side most of them are on (train on a tie)."""
    if unit.keeper_side is not None:
        return unit.keeper_side
    sides = list(unit.assigned.values())
    return sides.count(True) > sides.count(False)


def _write(session: Session, split_id: int, units: list[_Unit], decisions: dict[int, bool],
           result: SplitResult) -> dict[int | None, int]:
    """Insert the new assignments and fix disagreeing groups; returns the new ok images per label id."""
    fresh: list[dict] = []
    moved: list[int] = []
    new_per_label: dict[int | None, int] = defaultdict(int)
    for index, side in decisions.items():
        unit = units[index]
        for image_id, label_id, ok in unit.members:
            held = unit.assigned.get(image_id)
            if held is None:
                fresh.append({"split_id": split_id, "image_id": image_id, "is_valid": side})
                new_per_label[label_id] += ok
            elif held != side:
                moved.append(image_id)
                session.execute(update(SplitAssignment).where(
                    SplitAssignment.split_id == split_id, SplitAssignment.image_id == image_id,
                ).values(is_valid=side))
    # Moves happen only when dedup has merged images from both sides into one group since they were
    # assigned: a group must sit on one side, or the validation set sees a near-copy of a training image.
    for start in range(0, len(fresh), INSERT_BATCH):
        # The table, not the mapped class: Core executemany skips the ORM's bulk bookkeeping (twice as fast).
        session.execute(insert(SplitAssignment.__table__), fresh[start:start + INSERT_BATCH])
    result.assigned = len(fresh)
    result.regrouped = len(moved)
    return new_per_label


def _count(session: Session, split_id: int, result: SplitResult, params: SplitParams,
           new_per_label: dict[int | None, int]) -> None:
    names = dict(session.execute(select(Label.id, Label.name)).all())
    rows = session.execute(
        select(Image.label_id, SplitAssignment.is_valid, func.count())
        .join(SplitAssignment, (SplitAssignment.image_id == Image.id) & (SplitAssignment.split_id == split_id))
        .where(Image.status == Status.OK).group_by(Image.label_id, SplitAssignment.is_valid)
    ).all()
    per_label: dict[int | None, LabelSplit] = {}
    for label_id, is_valid, count in rows:
        entry = per_label.setdefault(label_id, LabelSplit(names.get(label_id, "(unlabelled)")))
        if is_valid:
            entry.valid += count
        else:
            entry.train += count
    for label_id, entry in per_label.items():
        entry.new = new_per_label.get(label_id, 0)
        entry.too_small = valid_target(entry.total, params) == 0
    result.labels = sorted(per_label.values(), key=lambda e: e.label)
