"""Review decisions (keep, delete, relabel, undo): each one committed at once as a history row.

The `clean` prompt, `label set`, `delete` and `clean --apply` all decide through `decide`, which
changes the image and adds its review row in one transaction; nothing here ever edits or removes a
review row, so the history is complete and every decision can be undone.
"""
from __future__ import annotations

import getpass
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from db.models import Audit, AuditScore, FoldLoss, Image, Label, Review, RunLoss, Source, utcnow
from fastclass.catalog import find_audit, find_run
from fastclass.errors import FastclassError, NotFoundError
from fastclass.labels import existing_label_id, label_exists, label_ids, normalize_label, unknown_label
from fastclass.lifecycle import LIVE, Status
from fastclass.text import csv_records, parse_id

ACTIONS = ("keep", "delete", "relabel")
STATUS_FILTERS = ("ok", "pending", "duplicate", "conflict", "rejected", "deleted")
ORDERS = ("label", "random", "newest", "loss", "issues")
ENV_REVIEWER = "FASTCLASS_REVIEWER"


def reviewer_name() -> str:
    """Who decides: FASTCLASS_REVIEWER, else the login name."""
    name = os.environ.get(ENV_REVIEWER)
    if name:
        return name[:100]
    try:
        return getpass.getuser()[:100]
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class Decision:
    review_id: int
    image_id: int
    action: str
    old_status: str
    new_status: str
    old_label: str | None
    new_label: str | None


def find_image(session: Session, ref: str) -> Image:
    """An image by id, full sha256, or a unique sha256 prefix of at least 6 hex digits."""
    ref = ref.strip()
    if ref.isdigit():
        image = session.get(Image, parse_id(ref)) if parse_id(ref) is not None else None
        if image is None:
            raise NotFoundError(f"no image with id {ref} in the catalog")
        return image
    if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref.lower()):
        matches = session.scalars(select(Image).where(Image.sha256.like(ref.lower() + "%")).limit(2)).all()
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise FastclassError(f"sha256 prefix {ref!r} matches several images; give more digits")
    raise NotFoundError(f"no image {ref!r} in the catalog (give an image id or its sha256)")


def _label_name(session: Session, label_id: int | None) -> str | None:
    return session.scalar(select(Label.name).where(Label.id == label_id)) if label_id is not None else None


DELETED_BY_REVIEW = "deleted by review"


def revive_check(session: Session, store, image: Image) -> None:
    """Refuse to make an image ok unless its bytes are in the store and decode; the message says how to
    get a pruned file back. Called after the row is locked by its guarded update (see lifecycle)."""
    from fastclass.curate.verify import VerifyRules, check_isolated

    if not store.exists(image.store_path):
        uri = session.scalar(select(Source.uri).where(Source.image_id == image.id).order_by(Source.id).limit(1))
        where = f" (it came from {uri})" if uri else ""
        raise FastclassError(
            f"image {image.id}'s file is no longer in the image store (pruned){where}; get the same bytes back "
            "with `fastclass import FILE --label LABEL` or `fastclass crawl --urls FILE`, then keep it again")
    store.fetch([image.store_path])
    status, reason = check_isolated(store.path(image.store_path), VerifyRules())
    if status != Status.OK:
        raise FastclassError(f"image {image.id} cannot be kept: {reason}")


def _revive(session: Session, store, image: Image) -> None:
    """revive_check inside a decision's transaction: a refusal rolls the decision back."""
    try:
        revive_check(session, store, image)
    except FastclassError:
        session.rollback()
        raise


def keep_refusal(image: Image) -> str | None:
    """Why a reviewer may not keep this image (verify rejected it, before or after a prune), or None."""
    by_verify = image.status == Status.REJECTED
    if by_verify or (image.status == Status.DELETED and image.reason not in (None, DELETED_BY_REVIEW)):
        return f"image {image.id} was rejected by verify ({image.reason}); it cannot be kept"
    return None


def _changed_since_shown(session: Session, image_id: int, status: str, label_id: int | None) -> FastclassError:
    return FastclassError(f"image {image_id} changed since it was shown (now {status}, label "
                          f"{_label_name(session, label_id)}); look at it again and decide anew")


def _guarded_update(session: Session, image_id: int, status: str, label_id: int | None, conflict: str | None,
                    values: dict) -> None:
    """Write a decision only if the image is still as it was read (two reviewers, or a reviewer and a
    running command, never overwrite each other)."""
    query = update(Image).where(Image.id == image_id, Image.status == status,
                                Image.label_id.is_(None) if label_id is None else Image.label_id == label_id,
                                Image.conflict.is_(None) if conflict is None else Image.conflict == conflict)
    if session.execute(query.values(**values).execution_options(synchronize_session=False)).rowcount != 1:
        session.rollback()
        current = session.get(Image, image_id, populate_existing=True)
        raise _changed_since_shown(session, image_id, current.status, current.label_id)


def decide(session: Session, store, image_id: int, action: str, label: str | None = None,
           reviewer: str | None = None, commit: bool = True, create_label: bool = False,
           seen: tuple[str, int | None] | None = None) -> Decision:
    """Apply one decision to one image and record it; commits unless told not to (a batch commits once).

    keep: the image stays; a duplicate or deleted one becomes ok again once its bytes are checked; delete:
    status deleted (the file stays until `fastclass prune`); relabel: the current label becomes `label`,
    which must exist unless create_label. Every decision closes an open label conflict on the image.
    `seen` is the (status, label id) the reviewer was shown: the decision is refused if it changed since.
    """
    from fastclass.lifecycle import Actor, allowed

    if action not in ACTIONS:
        raise FastclassError(f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}")
    image = session.get(Image, image_id, populate_existing=True)
    if image is None:
        raise NotFoundError(f"no image with id {image_id} in the catalog")
    old_status, old_label_id, old_conflict = image.status, image.label_id, image.conflict
    if seen is not None and seen != (old_status, old_label_id):
        raise _changed_since_shown(session, image_id, old_status, old_label_id)
    new_status, new_label_id = old_status, old_label_id
    if action == "keep":
        refusal = keep_refusal(image)
        if refusal:
            raise FastclassError(refusal)
        if old_status in (Status.DUPLICATE, Status.DELETED):
            new_status = Status.OK
    elif action == "delete":
        new_status = Status.DELETED
    else:
        if not label:
            raise FastclassError("relabel needs a label")
        name = normalize_label(label)
        if not create_label and not label_exists(session, name):
            raise unknown_label(session, name, "confirm a new label to create it")
        new_label_id = label_ids(session, [name])[name]
    if not allowed(old_status, new_status, Actor.REVIEWER):
        raise FastclassError(f"image {image_id} cannot go from {old_status} to {new_status} by review")
    values = {"status": new_status, "label_id": new_label_id, "updated_at": utcnow(), "reviewed": True,
              "conflict": None}
    if action == "delete" and old_status != Status.REJECTED:
        values["reason"] = DELETED_BY_REVIEW
    elif new_status == Status.OK and old_status != Status.OK:
        values["reason"] = None
    _guarded_update(session, image_id, old_status, old_label_id, old_conflict, values)
    if new_status == Status.OK and old_status != Status.OK:
        _revive(session, store, image)
    review = Review(image_id=image_id, action=action, old_status=old_status, new_status=new_status,
                    old_label_id=old_label_id, new_label_id=new_label_id, reviewer=reviewer or reviewer_name(),
                    old_conflict=old_conflict)
    session.add(review)
    session.flush()
    decision = Decision(review.id, image_id, action, old_status, new_status, _label_name(session, old_label_id),
                        _label_name(session, new_label_id))
    if commit:
        session.commit()
    return decision


def decide_many(session: Session, store, refs: Iterable[str], action: str, label: str | None = None,
                reviewer: str | None = None, create_label: bool = False) -> int:
    """One decision for several images (ids or sha256); every image is found first, then all are decided
    in the caller's transaction, so either all of them change or none. Returns how many."""
    ids = [find_image(session, ref).id for ref in refs]
    for image_id in ids:
        decide(session, store, image_id, action, label, reviewer, commit=False, create_label=create_label)
    return len(ids)


def undo(session: Session, store, review_id: int, reviewer: str | None = None) -> Decision:
    """Put an image back as it was before a review, recorded as an `undo` review of that one."""
    review = session.get(Review, review_id)
    if review is None:
        raise NotFoundError(f"no review {review_id} (see `fastclass reviews`)")
    if review.action == "undo":
        raise FastclassError(f"review {review_id} is itself an undo; undo the decision again instead")
    if session.scalar(select(Review.id).where(Review.undoes_id == review_id)) is not None:
        raise FastclassError(f"review {review_id} was already undone")
    image = session.get(Image, review.image_id, populate_existing=True)
    if (image.status, image.label_id) != (review.new_status, review.new_label_id):
        later = session.scalar(select(func.max(Review.id)).where(Review.image_id == image.id))
        raise FastclassError(f"image {image.id} changed after review {review_id}; undo review {later} first")
    if review.old_label_id is not None:
        # A label retired since (merge, delete) comes back for the image that needs it again.
        session.execute(update(Label).where(Label.id == review.old_label_id, Label.deleted_at.is_not(None))
                        .values(deleted_at=None))
    values = {"status": review.old_status, "label_id": review.old_label_id, "updated_at": utcnow(),
              "conflict": review.old_conflict}
    if review.action == "delete":
        values["reason"] = image.reason if review.old_status == Status.REJECTED else None
    _guarded_update(session, image.id, image.status, image.label_id, image.conflict, values)
    if review.old_status == Status.OK and image.status != Status.OK:
        _revive(session, store, image)
    row = Review(image_id=image.id, action="undo", old_status=review.new_status, new_status=review.old_status,
                 old_label_id=review.new_label_id, new_label_id=review.old_label_id,
                 reviewer=reviewer or reviewer_name(), undoes_id=review_id)
    session.add(row)
    session.flush()
    session.execute(update(Image).where(Image.id == image.id).values(
        reviewed=image.id in reviewed_ids(session, [image.id])))
    session.commit()
    return Decision(row.id, image.id, "undo", review.new_status, review.old_status,
                    _label_name(session, review.new_label_id), _label_name(session, review.old_label_id))


def list_reviews(session: Session, limit: int | None = None, image_id: int | None = None) -> list[dict]:
    names = dict(session.execute(select(Label.id, Label.name)).all())
    query = select(Review, Image.sha256).join(Image, Image.id == Review.image_id).order_by(Review.id.desc())
    if image_id is not None:
        query = query.where(Review.image_id == image_id)
    if limit:
        query = query.limit(limit)
    return [{"id": r.id, "image": r.image_id, "sha256": sha, "action": r.action, "old_status": r.old_status,
             "new_status": r.new_status, "old_label": names.get(r.old_label_id), "new_label": names.get(r.new_label_id),
             "reviewer": r.reviewer, "undoes": r.undoes_id, "created_at": r.created_at}
            for r, sha in session.execute(query).all()]


def review_queue(session: Session, label: str | None = None, status: str = "ok", order: str = "label",
                 run: str | None = None, audit: int | None = None) -> list[int]:
    """The image ids a clean session walks, in order; the same filter always gives the same order.
    order "issues": an audit's label issues first (least likely label first), then its outliers (farthest
    first), then the rest; the latest audit unless `audit` names one."""
    if status not in STATUS_FILTERS:
        raise FastclassError(f"unknown --status {status!r}; use one of: {', '.join(STATUS_FILTERS)}")
    if order not in ORDERS:
        raise FastclassError(f"unknown --order {order!r}; use one of: {', '.join(ORDERS)}")
    run_id = run_with_losses(session, run) if run is not None else None
    if order == "loss" and run_id is None:
        raise FastclassError("--order loss needs --run RUN: the training run whose per-image losses to order by")
    rows = session.execute(_filtered(session, select(Image.id, Label.name, Image.created_at, Image.dup_group_id),
                                     label, status)).all()
    if status == "conflict":
        rows.sort(key=lambda r: (r.dup_group_id or 0, r.name or "", r.id))
    elif order == "label":
        rows.sort(key=lambda r: (r.name or "", r.id))
    elif order == "newest":
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    elif order == "issues":
        audit_id = audit_with_scores(session, audit)
        scores = {r.image_id: r for r in session.execute(
            select(AuditScore.image_id, AuditScore.label_issue, AuditScore.label_quality, AuditScore.outlier,
                   AuditScore.outlier_score).where(AuditScore.audit_id == audit_id))}

        def flagged(row) -> tuple:
            score = scores.get(row.id)
            if score is not None and score.label_issue:
                return (0, score.label_quality, row.id)
            if score is not None and score.outlier:
                return (1, score.outlier_score, row.id)
            return (2, 0.0, row.id)

        rows.sort(key=flagged)
    elif order == "loss":
        table = loss_table(session, run_id)
        losses = dict(session.execute(select(table.image_id, table.loss).where(table.run_id == run_id)).all())
        # Highest loss first: the images the model most disagrees with; images it never saw come last.
        rows.sort(key=lambda r: (r.id not in losses, -losses.get(r.id, 0.0), r.id))
    else:
        rows.sort(key=lambda r: r.id)
        random.Random(f"{label}:{status}").shuffle(rows)
    return [r.id for r in rows]


def _filtered(session: Session, query, label: str | None, status: str):
    """`query` (over images, outer-joined to their label here) limited to a review filter's images."""
    query = query.outerjoin(Label, Label.id == Image.label_id)
    if status == "conflict":
        # Open conflicts only: a reviewer's decision closes one, and a deleted image has none to settle.
        query = query.where(Image.conflict.is_not(None), Image.status.in_(LIVE))
    else:
        query = query.where(Image.status == status)
    if label is not None:
        query = query.where(Image.label_id == existing_label_id(session, label))
    return query


def _standing_decision():
    """Whether an image has a decision that stands (see reviewed_ids), as a correlated SQL condition."""
    undone = select(Review.undoes_id).where(Review.undoes_id.is_not(None))
    return exists().where(Review.image_id == Image.id, Review.action.not_in(("undo", "merge")),
                          Review.id.not_in(undone))


def review_page(session: Session, label: str | None, status: str, order: str, run: str | None,
                audit: int | None, page: int, size: int) -> tuple[list[int], int, int]:
    """One page of a review queue: (the ids on page `page` (from 1) of `size`, how many the queue holds,
    how many of those have a decision that stands). The same ids as slicing review_queue; for the label
    and newest orders the database orders, counts and pages, so a page of a 100,000-image view does not
    load the other 99,800."""
    if order not in ("label", "newest") or status == "conflict" or status not in STATUS_FILTERS:
        queue = review_queue(session, label, status, order, run, audit)
        return queue[(page - 1) * size:page * size], len(queue), len(reviewed_ids(session, queue))
    if run is not None:
        run_with_losses(session, run)
    ids = _filtered(session, select(Image.id), label, status)
    total = session.scalar(select(func.count()).select_from(ids.subquery()))
    reviewed = session.scalar(select(func.count()).select_from(ids.where(_standing_decision()).subquery()))
    ordering = ((func.coalesce(Label.name, ""), Image.id) if order == "label"
                else (Image.created_at.desc(), Image.id.desc()))
    shown = list(session.scalars(ids.order_by(*ordering).offset((page - 1) * size).limit(size)))
    return shown, total, reviewed


def audit_with_scores(session: Session, audit: int | None = None) -> int:
    """The id of an audit (the latest when None) that exists."""
    return find_audit(session, audit, "--order issues").id


def review_signals(session: Session) -> dict[str, list[int]]:
    """What can order a review: the runs with per-image losses and the audits, newest first."""
    runs = set(session.scalars(select(RunLoss.run_id).distinct())) | set(
        session.scalars(select(FoldLoss.run_id).distinct()))
    return {"runs": sorted(runs, reverse=True),
            "audits": list(session.scalars(select(Audit.id).order_by(Audit.id.desc())))}


def loss_table(session: Session, run_id: int) -> type[FoldLoss] | type[RunLoss]:
    """Where a run's per-image losses are: its out-of-fold losses (`train --folds`) when it has them, for
    they come from models that never trained on the image; else `interpret`'s, from the run's own model."""
    if session.scalar(select(FoldLoss.image_id).where(FoldLoss.run_id == run_id).limit(1)) is not None:
        return FoldLoss
    return RunLoss


def run_with_losses(session: Session, run: str) -> int:
    """The id of a training run with per-image losses (`train --folds` or `interpret`)."""
    found = find_run(session, run)
    if loss_table(session, found.id) is RunLoss and session.scalar(
            select(RunLoss.image_id).where(RunLoss.run_id == found.id).limit(1)) is None:
        raise FastclassError(f"run {found.id} has no per-image losses yet; run `fastclass interpret {found.id}` first "
                             "(or train with --folds for out-of-fold losses)")
    return found.id


def reviewed_ids(session: Session, image_ids: Iterable[int]) -> set[int]:
    """The images among image_ids with a decision that stands (one that was undone, or a label merge, does
    not count)."""
    ids = list(image_ids)
    undone = select(Review.undoes_id).where(Review.undoes_id.is_not(None))
    found: set[int] = set()
    for start in range(0, len(ids), 500):
        found.update(session.scalars(select(Review.image_id).where(
            Review.image_id.in_(ids[start:start + 500]), Review.action.not_in(("undo", "merge")), Review.id.not_in(undone))))
    return found


@dataclass
class ImageCard:
    """What the prompt shows about one image."""

    id: int
    sha256: str
    label: str | None
    label_id: int | None
    status: str
    reason: str | None
    width: int
    height: int
    format: str
    nbytes: int
    store_path: str
    sources: list[tuple[str, str, str]]
    """(engine, uri, label it claims) of each source."""
    group_id: int | None
    group_size: int
    group_labels: list[str]
    conflict: str | None
    claimed_labels: list[str]
    prediction: RunLoss | FoldLoss | None = None
    """With a run: its verdict on this image (out of fold when the run has fold losses)."""
    audit: AuditScore | None = None
    """With an audit: its verdict on this image (label issue and suggested label, outlier)."""


def image_card(session: Session, image_id: int, run_id: int | None = None,
               audit_id: int | None = None) -> ImageCard:
    """What the prompt shows about an image; with run_id, also that run's prediction and loss for it; with
    audit_id, that audit's scores."""
    image = session.get(Image, image_id, populate_existing=True)
    label = _label_name(session, image.label_id)
    sources = [tuple(row) for row in session.execute(
        select(Source.engine, Source.uri, Label.name).join(Label, Label.id == Source.label_id)
        .where(Source.image_id == image_id).order_by(Source.id)).all()]
    group_labels: list[str] = []
    size = 0
    if image.dup_group_id is not None:
        members = session.execute(select(Label.name).join(Image, Image.label_id == Label.id)
                                  .where(Image.dup_group_id == image.dup_group_id)).scalars().all()
        size = len(members)
        group_labels = sorted(set(members))
    return ImageCard(image.id, image.sha256, label, image.label_id, image.status, image.reason, image.width, image.height,
                     image.format, image.bytes, image.store_path, sources, image.dup_group_id, size, group_labels,
                     image.conflict, sorted({claim for _, _, claim in sources} | ({label} if label else set())),
                     session.get(loss_table(session, run_id), (run_id, image_id)) if run_id is not None else None,
                     session.get(AuditScore, (audit_id, image_id)) if audit_id is not None else None)


@dataclass
class ApplyResult:
    applied: int = 0
    errors: list[str] = None

    def as_dict(self) -> dict:
        return {"applied": self.applied, "errors": self.errors or []}


def apply_csv(session: Session, store, path: Path, reviewer: str | None = None,
              create_labels: bool = False) -> ApplyResult:
    """Apply a decisions CSV (`image,action,label`: image id or sha256; keep, delete or relabel).

    Every row is checked first; bad rows (an unknown image or action, a label that does not exist unless
    create_labels, a keep that cannot be) are reported with their line number and left out; the good rows
    are then applied together in one transaction (all of them or, on a failure, none).
    """
    result = ApplyResult(errors=[])
    good: list[tuple[int, str, str | None]] = []
    header: list[str] = []
    for line, record, problem in csv_records(path, "decisions file"):
        if problem is not None:
            if not header:
                raise FastclassError(f"{path}:{line}: {problem}")
            result.errors.append(f"{path}:{line}: {problem}")
            continue
        if not header:
            header = [h.strip().lower() for h in record]
            if header[:2] != ["image", "action"]:
                raise FastclassError(f"{path}: the first line must be the header `image,action,label`")
            continue
        cells = [c.strip() for c in record] + ["", "", ""]
        ref, action, label = cells[0], cells[1].lower(), cells[2] or None
        try:
            image = find_image(session, ref)
            if action not in ACTIONS:
                raise FastclassError(f"unknown action {action!r} (keep, delete or relabel)")
            if action == "relabel":
                if not label:
                    raise FastclassError("relabel needs a label in the third column")
                label = normalize_label(label)
                if not create_labels and not label_exists(session, label):
                    raise unknown_label(session, label, "add --create-labels to create new labels")
            if action == "keep" and keep_refusal(image):
                raise FastclassError(keep_refusal(image))
            if action == "keep" and image.status in (Status.DUPLICATE, Status.DELETED):
                revive_check(session, store, image)
        except FastclassError as exc:
            result.errors.append(f"{path}:{line}: {exc}")
            continue
        good.append((image.id, action, label))
    who = reviewer or reviewer_name()
    try:
        for image_id, action, label in good:
            decide(session, store, image_id, action, label, who, commit=False, create_label=create_labels)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    result.applied = len(good)
    return result
