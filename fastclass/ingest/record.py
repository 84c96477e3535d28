"""The one way images enter the catalog: record prepared images (analysed and stored in workers, see
analyze.py), their hashes and their provenance in a few bulk statements.

`record_batch` writes the rows of many prepared images; `commit_batch` commits them and then releases the
store's temp twins (or undoes the store writes when the commit fails).
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Iterable, Sequence

from sqlalchemy import Table, func, insert, select, text, tuple_, update
from sqlalchemy.orm import Session

from db.models import Image as ImageRow
from db.models import ImageHash, Review, Source, utcnow
from fastclass.catalog import is_recorded_in
from fastclass.ingest import MAX_PIXELS
from fastclass.ingest.hashes import HASH_KINDS
from fastclass.labels import label_ids
from fastclass.lifecycle import LIVE, Conflict, Status, take_write_lock
from fastclass.store import Store, StoredFile

if TYPE_CHECKING:
    from fastclass.ingest.analyze import ImageFacts

SQL_CHUNK = 500

@dataclass
class SourceInfo:
    """Provenance of one fetched or imported file."""

    uri: str
    engine: str
    query: str | None = None
    crawl_job_id: int | None = None
    rank: int | None = None
    page_url: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    fetched_at: dt.datetime | None = None
    license: str | None = None


@dataclass
class PreparedImage:
    facts: ImageFacts
    stored: StoredFile
    label: str
    source: SourceInfo


@dataclass
class RecordResult:
    new_images: int = 0
    exact_duplicates: int = 0
    new_sources: int = 0
    new_claims: int = 0
    """Known images now also claimed for another label: each is an open label conflict."""
    new_per_label: Counter = field(default_factory=Counter)

WRITE_LOCK_KEY = 0x6661737463  # "fastc"


def serialize_writes(session: Session) -> None:
    """Take turns with other processes writing this catalog until the transaction ends, so that the
    look-up-then-insert of images, sources and fetched URLs never races (two crawl workers that find the
    same image). PostgreSQL: a transaction-scoped advisory lock. SQLite: its one write lock, taken
    before the look-ups (a deferred transaction would take it only at the first insert, after them)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
    else:
        take_write_lock(session)


def record_batch(session: Session, items: Sequence[PreparedImage]) -> RecordResult:
    """Insert rows for prepared images in bulk: new images with their hashes, and one source per new provenance."""
    result = RecordResult()
    if not items:
        return result
    serialize_writes(session)
    labels = label_ids(session, {item.label for item in items})
    shas = list(dict.fromkeys(item.facts.sha256 for item in items))
    ids = ids_by_sha256(session, shas)
    now = utcnow()
    new_rows, new_facts = [], {}
    for item in items:
        facts = item.facts
        if facts.sha256 in ids or facts.sha256 in new_facts:
            continue
        new_facts[facts.sha256] = facts
        new_rows.append({
            "sha256": facts.sha256, "store_path": item.stored.relpath, "format": facts.format,
            "width": facts.width, "height": facts.height, "mode": facts.mode, "bytes": facts.nbytes,
            "status": Status.PENDING, "reason": facts.decode_error, "label_id": labels[item.label],
            "created_at": now, "updated_at": now,
        })
        result.new_per_label[item.label] += 1
    if new_rows:
        insert_rows(session, ImageRow.__table__, new_rows)
        ids.update(ids_by_sha256(session, list(new_facts)))
        hash_rows = [
            {"image_id": ids[sha], "kind": kind, "version": HASH_KINDS[kind].version, "value": value}
            for sha, facts in new_facts.items()
            for kind, value in facts.hashes.items()
        ]
        if hash_rows:
            insert_rows(session, ImageHash.__table__, hash_rows)
    result.new_images = len(new_rows)
    result.exact_duplicates = len(items) - len(new_rows)
    result.new_sources = record_sources(
        session, [(ids[item.facts.sha256], labels[item.label], item.source) for item in items],
        {ids[sha] for sha in new_facts})
    result.new_claims = open_claim_conflicts(session, {ids[item.facts.sha256] for item in items})
    session.flush()
    return result


def open_claim_conflicts(session: Session, image_ids: set[int]) -> int:
    """Mark as open label conflicts the images among image_ids whose sources now claim a label other than
    the image's own (the same bytes crawled or imported for two classes); returns how many were opened.

    Only a claim newer than the image's last review reopens a conflict the reviewer settled.
    """
    if not image_ids:
        return 0
    other = (select(Source.image_id).join(ImageRow, ImageRow.id == Source.image_id)
             .where(Source.label_id != ImageRow.label_id))
    opened = 0
    ids = sorted(image_ids)
    for start in range(0, len(ids), SQL_CHUNK):
        chunk = ids[start:start + SQL_CHUNK]
        candidates = session.execute(select(ImageRow.id, ImageRow.updated_at, ImageRow.reviewed).where(
            ImageRow.id.in_(chunk), ImageRow.conflict.is_distinct_from(Conflict.LABELS.value),
            ImageRow.status.in_(LIVE), ImageRow.id.in_(other))).all()
        fresh = [c.id for c in candidates if not c.reviewed or _claimed_since(session, c.id)]
        if fresh:
            opened += session.execute(update(ImageRow).where(ImageRow.id.in_(fresh)).values(
                conflict=Conflict.LABELS.value)).rowcount
    return opened


def _claimed_since(session: Session, image_id: int) -> bool:
    """Whether a source claiming another label arrived after the image's last review decision."""
    last = session.scalar(select(func.max(Review.created_at)).where(Review.image_id == image_id))
    newest = session.scalar(select(func.max(Source.fetched_at)).join(ImageRow, ImageRow.id == Source.image_id)
                            .where(Source.image_id == image_id, Source.label_id != ImageRow.label_id))
    return last is None or (newest is not None and newest > last)


def record_sources(session: Session, claims: Sequence[tuple[int, int, SourceInfo]],
                   new_images: set[int] = frozenset()) -> int:
    """Record where images came from: one source row per (image id, label id, provenance) not recorded
    before; returns how many were added. The one place source rows are written (import, crawl, and a
    crawl that finds a URL fetched before for another class). Images in new_images, inserted by this
    transaction, cannot have sources yet and skip the lookup."""
    keys = {(image_id, source.uri, label_id): source for image_id, label_id, source in claims}
    existing: set[tuple] = set()
    for chunk in _chunks([key for key in keys if key[0] not in new_images], SQL_CHUNK):
        existing.update(session.execute(
            select(Source.image_id, Source.uri, Source.label_id).where(
                tuple_(Source.image_id, Source.uri, Source.label_id).in_(chunk))
        ).all())
    now = utcnow()
    rows = [{"image_id": key[0], "label_id": key[2], "uri": src.uri, "engine": src.engine, "query": src.query,
             "crawl_job_id": src.crawl_job_id, "rank": src.rank, "page_url": src.page_url,
             "http_status": src.http_status, "content_type": src.content_type, "license": src.license,
             "fetched_at": src.fetched_at or now}
            for key, src in keys.items() if key not in existing]
    if rows:
        insert_rows(session, Source.__table__, rows)
    return len(rows)


def insert_rows(session: Session, table: Table, rows: Sequence[dict]) -> None:
    """Bulk INSERT through the database driver's executemany, in the session's transaction.

    SQLAlchemy's Core executemany spends most of its time building and processing each row's
    parameters (about 0.55x the driver's rate here); the rows written by ingest are plain values, so
    they go to the driver directly, with datetimes written the way SQLAlchemy's SQLite type stores them.
    Every row must have the same keys.
    """
    connection = session.connection()
    dialect = connection.dialect
    placeholder = _placeholder(dialect.paramstyle)
    if placeholder is None:
        session.execute(insert(table), list(rows))
        return
    columns = list(rows[0])
    quote = dialect.identifier_preparer.quote
    sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
           f"VALUES ({', '.join([placeholder] * len(columns))})")
    getter = itemgetter(*columns)
    values = [getter(row) for row in rows] if len(columns) > 1 else [(getter(row),) for row in rows]
    if dialect.name == "sqlite":
        stamps = [i for i, c in enumerate(columns) if isinstance(rows[0][c], dt.datetime)]
        if stamps:
            # Column by column: transposing with zip is C-speed, a per-value generator is not.
            text: dict[dt.datetime, str] = {}
            by_column = list(zip(*values))
            for i in stamps:
                by_column[i] = [_stamp(v, text) for v in by_column[i]]
            values = list(zip(*by_column))
    connection.exec_driver_sql(sql, values)


def _placeholder(paramstyle: str) -> str | None:
    """The driver's positional parameter marker, or None for a style these helpers do not write."""
    return {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(paramstyle)


def _stamp(value, cache: dict) -> object:
    """A datetime as SQLAlchemy's SQLite DateTime stores it (batches share one `now`, so cache it)."""
    if not isinstance(value, dt.datetime):
        return value
    found = cache.get(value)
    if found is None:
        found = cache[value] = value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return found


def ids_by_sha256(session: Session, shas: Sequence[str]) -> dict[str, int]:
    """Image ids by sha256, read through the driver (no per-row result objects), SQL_CHUNK at a time."""
    connection = session.connection()
    placeholder = _placeholder(connection.dialect.paramstyle)
    found: dict[str, int] = {}
    for chunk in _chunks(list(shas), SQL_CHUNK):
        if placeholder is None:
            found.update(session.execute(select(ImageRow.sha256, ImageRow.id).where(ImageRow.sha256.in_(chunk))).all())
            continue
        sql = f"SELECT sha256, id FROM images WHERE sha256 IN ({', '.join([placeholder] * len(chunk))})"
        found.update(connection.exec_driver_sql(sql, tuple(chunk)).fetchall())
    return found


def commit_batch(session: Session, store: Store, items: Sequence[PreparedImage]) -> RecordResult:
    """Record and commit a batch; on any failure roll back and remove the files nobody else claims."""
    try:
        result = record_batch(session, items)
        session.commit()
    except BaseException:
        session.rollback()
        store.discard([item.stored for item in items], is_recorded_in(session))
        raise
    store.release([item.stored for item in items])
    return result


def ingest_bytes(session: Session, store: Store, data: bytes, label: str, source: SourceInfo,
                 max_pixels: int = MAX_PIXELS) -> RecordResult:
    """Ingest one image's bytes and commit (crawl and single-file callers); raises NotAnImage."""
    from fastclass.ingest.analyze import prepare_bytes

    facts, stored = prepare_bytes(data, store, max_pixels)
    return commit_batch(session, store, [PreparedImage(facts, stored, label, source)])


def _chunks(seq: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]
