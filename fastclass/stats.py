"""Counts of the catalog: images per status and label, sources per engine, labels."""
from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Image, ImageStatus, Label, Source
from fastclass.lifecycle import LIVE

STATUSES = [s.value for s in ImageStatus]


def catalog_stats(session: Session) -> dict:
    """{"images": {total, <status>: n}, "labels": {name: {status: n}}, "engines": {engine: sources}}."""
    images = {"total": 0, **{s: 0 for s in STATUSES}}
    labels: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in STATUSES})
    rows = session.execute(
        select(Label.name, Image.status, func.count(Image.id))
        .select_from(Image).outerjoin(Label, Image.label_id == Label.id)
        .group_by(Label.name, Image.status)
    ).all()
    for name, status, count in rows:
        images["total"] += count
        images[status] = images.get(status, 0) + count
        labels[name or "(unlabelled)"][status] = labels[name or "(unlabelled)"].get(status, 0) + count
    engines = dict(session.execute(
        select(Source.engine, func.count(Source.id)).group_by(Source.engine).order_by(Source.engine)
    ).all())
    conflicts = session.scalar(select(func.count()).select_from(Image).where(
        Image.conflict.is_not(None), Image.status.in_(LIVE)))
    return {"images": images, "labels": {k: labels[k] for k in sorted(labels)}, "engines": engines,
            "conflicts": conflicts}


def list_labels(session: Session) -> list[dict]:
    """Every live label with its relabel digit and image counts per status (labels with no image yet included)."""
    counts: dict[str, dict[str, int]] = {}
    digits: dict[str, int | None] = {}
    for name, digit in session.execute(select(Label.name, Label.digit).where(Label.deleted_at.is_(None))
                                       .order_by(Label.name)):
        counts[name] = {s: 0 for s in STATUSES}
        digits[name] = digit
    for name, status, count in session.execute(
        select(Label.name, Image.status, func.count(Image.id)).join(Image, Image.label_id == Label.id)
        .where(Label.deleted_at.is_(None)).group_by(Label.name, Image.status)
    ):
        counts[name][status] = count
    return [{"name": name, "digit": digits[name], "total": sum(c.values()), **c} for name, c in counts.items()]
