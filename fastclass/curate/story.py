"""`fastclass image`: one image's whole story, from where it came from to the runs that judged it."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import DuplicateGroup, FoldLoss, Image, ImageHash, RunLoss, Snapshot, SnapshotItem, Source
from fastclass.curate.review import find_image, list_reviews
from fastclass.errors import NotFoundError
from fastclass.labels import label_names


def resolve_image(session: Session, ref: str) -> Image:
    """An image by id, sha256 (or a unique prefix of at least 6 hex digits), or a source URL or path."""
    text = ref.strip()
    if "/" in text or ":" in text:
        image_id = session.scalar(select(Source.image_id).where(Source.uri == text).limit(1))
        if image_id is None:
            raise NotFoundError(f"no image came from {text!r} (give an image id, its sha256 or a source URL)")
        return session.get(Image, image_id)
    return find_image(session, text)


def image_story(session: Session, ref: str, store=None) -> dict:
    """Everything the catalog knows about one image, as plain data (the CLI prints it or its JSON)."""
    image = resolve_image(session, ref)
    names = label_names(session)
    sources = [{"uri": s.uri, "engine": s.engine, "label": names.get(s.label_id), "query": s.query,
                "crawl_job": s.crawl_job_id, "rank": s.rank, "page_url": s.page_url, "http_status": s.http_status,
                "content_type": s.content_type, "at": s.fetched_at}
               for s in session.scalars(select(Source).where(Source.image_id == image.id).order_by(Source.id))]
    group = None
    if image.dup_group_id is not None:
        row = session.get(DuplicateGroup, image.dup_group_id)
        members = session.execute(select(Image.id, Image.status, Image.label_id).where(
            Image.dup_group_id == row.id).order_by(Image.id)).all()
        group = {"id": row.id, "keeper": row.keeper_id, "hash": row.hash_kind, "threshold": row.threshold,
                 "spans_labels": row.is_conflict,
                 "members": [{"image": m.id, "status": m.status, "label": names.get(m.label_id)} for m in members]}
    snapshots = [{"snapshot": name, "label": label, "split": "valid" if is_valid else "train"}
                 for name, label, is_valid in session.execute(
                     select(Snapshot.name, SnapshotItem.label, SnapshotItem.is_valid)
                     .join(Snapshot, Snapshot.id == SnapshotItem.snapshot_id)
                     .where(SnapshotItem.image_id == image.id).order_by(Snapshot.id))]
    losses = [{"run": r.run_id, "split": r.split, "label": r.label, "predicted": r.predicted,
               "probability": r.probability, "loss": r.loss}
              for table in (RunLoss, FoldLoss)
              for r in session.scalars(select(table).where(table.image_id == image.id).order_by(table.run_id))]
    claimed = sorted({s["label"] for s in sources if s["label"]} | ({names[image.label_id]} if image.label_id else set()))
    return {
        "id": image.id, "sha256": image.sha256, "label": names.get(image.label_id), "status": image.status,
        "reason": image.reason, "reviewed": image.reviewed, "conflict": image.conflict, "claimed_labels": claimed,
        "format": image.format, "width": image.width, "height": image.height, "mode": image.mode,
        "bytes": image.bytes, "store_path": image.store_path,
        "file": None if store is None else ("present" if store.exists(image.store_path) else "missing"),
        "hashes": {h.kind: f"{h.value & (2 ** 64 - 1):016x}" for h in session.scalars(
            select(ImageHash).where(ImageHash.image_id == image.id).order_by(ImageHash.kind))},
        "created_at": image.created_at, "updated_at": image.updated_at,
        "sources": sources, "group": group, "reviews": list(reversed(list_reviews(session, image_id=image.id))),
        "snapshots": snapshots, "losses": losses,
    }
