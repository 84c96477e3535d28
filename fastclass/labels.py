"""Labels as objects: validation of untrusted names, lookup and creation (with a stable relabel digit),
and rename, merge and delete, each recorded in the label history."""
from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import CrawlJob, Image, Label, LabelEvent, Review, Source, utcnow
from fastclass.errors import FastclassError, NotFoundError
from fastclass.lifecycle import LIVE, Actor, Conflict, Status, move
from fastclass.text import printable

MAX_LABEL_LENGTH = 100
MAX_LABEL_BYTES = 255  # a label becomes a folder name in exports; most file systems allow 255 bytes
_UNSAFE = re.compile(r"[/\\:*?\"<>|]")


def normalize_label(name: str) -> str:
    """A label as stored: NFC, trimmed, no path separators or control characters (labels become folder names)."""
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise FastclassError("a label cannot be empty")
    if len(cleaned) > MAX_LABEL_LENGTH:
        raise FastclassError(f"label {printable(cleaned[:20])!r}... is longer than {MAX_LABEL_LENGTH} characters")
    invisible = next((c for c in cleaned if not c.isprintable() and c != " "), None)
    if invisible is not None:
        # Control characters, bidirectional overrides, zero-width and other invisible characters make two
        # labels look alike or rewrite a terminal; file names that are not UTF-8 arrive as surrogates.
        raise FastclassError(f"label {printable(cleaned)!r} holds an invisible or control character "
                             f"(U+{ord(invisible):04X}); use visible characters only")
    if _UNSAFE.search(cleaned) or cleaned in {".", ".."} or cleaned.startswith("."):
        raise FastclassError(
            f"label {cleaned!r} holds a character that cannot be part of a folder name "
            "(/ \\ : * ? \" < > | or a control character) or starts with a dot"
        )
    if len(cleaned.encode("utf-8")) > MAX_LABEL_BYTES:
        raise FastclassError(f"label {cleaned[:20]!r}... is longer than {MAX_LABEL_BYTES} bytes in UTF-8, "
                             "too long for a folder name")
    return cleaned


def label_ids(session: Session, names: Iterable[str]) -> dict[str, int]:
    """Ids of the given (already normalized) labels, creating the missing ones (and reviving retired ones)."""
    wanted = set(names)
    if not wanted:
        return {}
    found = {}
    for name, label_id, deleted_at in session.execute(
            select(Label.name, Label.id, Label.deleted_at).where(Label.name.in_(wanted))).all():
        found[name] = label_id
        if deleted_at is not None:
            session.execute(update(Label).where(Label.id == label_id).values(
                deleted_at=None, digit=_free_digit(session)))
    for name in sorted(wanted - found.keys()):
        label = Label(name=name, digit=_free_digit(session))
        session.add(label)
        session.flush()
        found[name] = label.id
    return found


def _free_digit(session: Session) -> int | None:
    """The lowest relabel digit (1-9) no live label holds; None when all nine are taken."""
    taken = set(session.scalars(select(Label.digit).where(Label.digit.is_not(None), Label.deleted_at.is_(None))))
    return next((d for d in range(1, 10) if d not in taken), None)


def existing_label_id(session: Session, name: str) -> int:
    """The id of a label that must exist (a --label filter); the error says where to look."""
    label_id = session.scalar(select(Label.id).where(Label.name == name, Label.deleted_at.is_(None)))
    if label_id is None:
        raise unknown_label(session, name)
    return label_id


def unknown_label(session: Session, name: str, fix: str = "see `fastclass labels`") -> NotFoundError:
    """The error for a label name that is not a live label, with a did-you-mean and what to do."""
    return NotFoundError(f"no label {name!r} in the catalog{did_you_mean(session, name)} ({fix})")


def label_names(session: Session) -> dict[int, str]:
    """Every label's name by id (retired ones too: history and provenance still name them)."""
    return dict(session.execute(select(Label.id, Label.name)).all())


def did_you_mean(session: Session, name: str) -> str:
    """'; did you mean 'coffee'?' for a near-miss of a live label name, else ''."""
    names = session.scalars(select(Label.name).where(Label.deleted_at.is_(None))).all()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def label_exists(session: Session, name: str) -> bool:
    return session.scalar(select(Label.id).where(Label.name == name, Label.deleted_at.is_(None))) is not None


def relabel_digits(session: Session) -> dict[int, str]:
    """The prompt's relabel keys: digit -> live label name, as given when each label was created."""
    return dict(session.execute(select(Label.digit, Label.name).where(
        Label.digit.is_not(None), Label.deleted_at.is_(None)).order_by(Label.digit, Label.id)).all())


@dataclass(frozen=True)
class LabelChange:
    action: str
    old: str
    new: str | None
    images: int
    sources: int = 0
    deleted_images: int = 0

    def as_dict(self) -> dict:
        return {"action": self.action, "old": self.old, "new": self.new, "images": self.images,
                "sources": self.sources, "deleted_images": self.deleted_images}


def _live(session: Session, name: str) -> Label:
    return session.get(Label, existing_label_id(session, normalize_label(name)))


def _record(session: Session, action: str, old: str, new: str | None, images: int, reviewer: str,
            detail: str | None = None) -> None:
    session.add(LabelEvent(action=action, old_name=old, new_name=new, images=images, detail=detail,
                           reviewer=reviewer, created_at=utcnow()))


def rename_label(session: Session, old: str, new: str, reviewer: str) -> LabelChange:
    """Give a label a new name; its images, sources, digit and history stay with it."""
    label = _live(session, old)
    new_name = normalize_label(new)
    other = session.scalar(select(Label).where(Label.name == new_name))
    if other is not None and other.id != label.id:
        if other.deleted_at is None:
            raise FastclassError(f"label {new_name!r} exists; use `fastclass label merge {label.name} {new_name}`")
        # A retired label's name is free again: its rows keep their history under a tombstone name.
        session.execute(update(Label).where(Label.id == other.id).values(name=f"{new_name}~retired-{other.id}"))
    count = session.scalar(select(func.count()).select_from(Image).where(Image.label_id == label.id))
    old_name = label.name
    session.execute(update(Label).where(Label.id == label.id).values(name=new_name))
    _record(session, "rename", old_name, new_name, count, reviewer)
    return LabelChange("rename", old_name, new_name, count)


def merge_labels(session: Session, source: str, target: str, reviewer: str) -> LabelChange:
    """Move every image and source claim of `source` to `target` and retire `source`.

    Each image's move is a review row (`merge`, undoable one by one; it does not count as a decision on
    the image, so the prompt still shows it); claims that only disagreed
    because of the two names stop being conflicts.
    """
    src, dst = _live(session, source), _live(session, target)
    if src.id == dst.id:
        raise FastclassError("a label cannot be merged into itself")
    rows = session.execute(select(Image.id, Image.status).where(Image.label_id == src.id)).all()
    session.execute(update(Image).where(Image.label_id == src.id).values(label_id=dst.id, updated_at=utcnow()))
    for image_id, status in rows:
        session.add(Review(image_id=image_id, action="merge", old_status=status, new_status=status,
                           old_label_id=src.id, new_label_id=dst.id, reviewer=reviewer))
    # Claims: a source that already claims the target for the same URI would collide with the unique key.
    twins = session.execute(select(Source.id, Source.image_id, Source.uri).where(Source.label_id == src.id)).all()
    taken = set(session.execute(select(Source.image_id, Source.uri).where(
        Source.label_id == dst.id, Source.image_id.in_({t.image_id for t in twins} or {-1}))).all())
    drop = [t.id for t in twins if (t.image_id, t.uri) in taken]
    if drop:
        session.execute(delete(Source).where(Source.id.in_(drop)))
    moved = session.execute(update(Source).where(Source.label_id == src.id).values(label_id=dst.id)).rowcount
    session.execute(update(CrawlJob).where(CrawlJob.label_id == src.id).values(label_id=dst.id))
    _clear_settled_claims(session)
    session.execute(update(Label).where(Label.id == src.id).values(deleted_at=utcnow(), digit=None))
    _record(session, "merge", src.name, dst.name, len(rows), reviewer)
    return LabelChange("merge", src.name, dst.name, len(rows), sources=moved + len(drop))


def delete_label(session: Session, name: str, reviewer: str, force: bool = False) -> LabelChange:
    """Retire a label. One that images still carry needs force: those images are then marked deleted by
    review (each undoable) and keep the label in their history; claims of it by other images are dropped."""
    label = _live(session, name)
    rows = session.execute(select(Image.id, Image.status).where(Image.label_id == label.id)).all()
    if rows and not force:
        raise FastclassError(f"label {label.name!r} still has {len(rows)} image(s); relabel them, "
                             f"`fastclass label merge {label.name} OTHER`, or add --force to mark them deleted")
    live = [image_id for image_id, status in rows if status in LIVE]
    statuses = dict(rows)
    for image_id in live:
        session.add(Review(image_id=image_id, action="delete", old_status=statuses[image_id], new_status=Status.DELETED,
                           old_label_id=label.id, new_label_id=label.id, reviewer=reviewer))
    deleted = move(session, Actor.REVIEWER, live, LIVE, Status.DELETED, reason="deleted by review", reviewed=True,
                   conflict=None)
    claims = session.execute(delete(Source).where(Source.label_id == label.id, Source.image_id.not_in(
        select(Image.id).where(Image.label_id == label.id)))).rowcount
    _clear_settled_claims(session)
    session.execute(update(Label).where(Label.id == label.id).values(deleted_at=utcnow(), digit=None))
    _record(session, "delete", label.name, None, len(rows), reviewer,
            detail=f"{deleted} image(s) marked deleted, {claims} claim(s) by other images dropped")
    return LabelChange("delete", label.name, None, len(rows), sources=claims, deleted_images=deleted)


def _clear_settled_claims(session: Session) -> None:
    """Close 'labels' conflicts whose sources now claim one label only (after a merge or a dropped claim)."""
    several = (select(Source.image_id).group_by(Source.image_id)
               .having(func.count(func.distinct(Source.label_id)) > 1))
    session.execute(update(Image).where(Image.conflict == Conflict.LABELS.value, Image.id.not_in(several))
                    .values(conflict=None))


def label_history(session: Session, limit: int | None = None) -> list[dict]:
    query = select(LabelEvent).order_by(LabelEvent.id.desc())
    if limit:
        query = query.limit(limit)
    return [{"id": e.id, "action": e.action, "old": e.old_name, "new": e.new_name, "images": e.images,
             "detail": e.detail, "reviewer": e.reviewer, "created_at": e.created_at}
            for e in session.scalars(query)]
