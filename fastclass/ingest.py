"""The one way images enter the catalog: analyze bytes, store them by content, record rows and provenance.

`analyze_bytes` and `prepare_file` are pure CPU/store work and run in worker processes; `record_batch`
writes the catalog rows of many prepared images in a few bulk statements; `commit_batch` commits them and
then releases the store's temp twins (or undoes the store writes when the commit fails).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import warnings
from operator import itemgetter
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageFile
from sqlalchemy import Table, func, insert, select, text, tuple_, update
from sqlalchemy.orm import Session

from db.models import Image as ImageRow
from db.models import ImageHash, Review, Source, utcnow
from fastclass.hashes import HASH_KINDS, compute_hashes
from fastclass.labels import label_ids
from fastclass.lifecycle import LIVE, Conflict, take_write_lock
from fastclass.store import ImageStore, StoredFile

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold; verify enforces the configured one
HASH_DRAFT_SIZE = (32, 32)
SQL_CHUNK = 500

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "PPM": "ppm"}

# fastclass checks the pixel count itself before any decode, so Pillow's warning/raise is redundant here.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class NotAnImage(Exception):
    """The bytes are not an image fastclass can store; the message is the reason recorded for the skip."""


@dataclass(frozen=True)
class ImageFacts:
    """What ingest learns from the bytes alone."""

    sha256: str
    format: str
    width: int
    height: int
    mode: str
    nbytes: int
    hashes: dict[str, int]
    decode_error: str | None = None

    @property
    def ext(self) -> str:
        return EXTENSIONS.get(self.format, self.format.lower())


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


def _sniff_non_image(data: bytes) -> str | None:
    if not data:
        return "empty file"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        if b"<svg" in data[:4096].lower():
            return "vector image (SVG) is not supported"
        return "not an image (HTML/XML text)"
    return None


def analyze_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFacts:
    """Identify the real format from the bytes, read the header, and hash a reduced-size decode.

    Raises NotAnImage for bytes that are not a raster image. A file whose header is fine but whose pixels
    do not decode (truncated, corrupt) is still an image: it gets `decode_error` and no hashes, and verify
    rejects it with that reason.
    """
    reason = _sniff_non_image(data)
    if reason:
        raise NotAnImage(reason)
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt, (width, height), mode = img.format or "UNKNOWN", img.size, img.mode
    except Exception as exc:  # Pillow raises many types for garbage; each means "not an image"
        raise NotAnImage(f"not an image ({type(exc).__name__})") from exc
    if width <= 0 or height <= 0:
        raise NotAnImage("not an image (zero width or height)")
    hashes: dict[str, int] = {}
    decode_error = None
    if width * height > max_pixels:
        decode_error = f"decompression bomb ({width}x{height} pixels is over the limit of {max_pixels})"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # One reduced-size decode (JPEG DCT scaling) serves the pixel check and every hash kind.
                img.draft("L", HASH_DRAFT_SIZE)
                hashes = compute_hashes(img.convert("L"))
        except Exception as exc:
            decode_error = decode_reason(exc)
    return ImageFacts(sha, fmt, width, height, mode, len(data), hashes, decode_error)


def decode_reason(exc: BaseException) -> str:
    """The reason recorded for bytes whose header reads but whose pixels do not decode (ingest and verify)."""
    if isinstance(exc, MemoryError):
        return "decoding needs more memory than the per-file limit"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "truncated" in text.lower() or "premature end" in text.lower():
        return "truncated image data"
    if isinstance(exc, (OSError, SyntaxError)) and ("crc" in text.lower() or "broken" in text.lower()):
        return f"corrupt image data ({text[:120]})"
    return f"cannot decode ({type(exc).__name__}: {text[:120]})"


def reason_kind(reason: str | None) -> str:
    """A reason without its figures, for summary tables ('too small (20x10 ...)' -> 'too small')."""
    return (reason or "").split(" (")[0]


def read_capped(path: Path, max_bytes: int) -> bytes:
    """Read a file, refusing one over the byte cap before reading it whole."""
    with open(path, "rb") as fh:
        # Ask for what the file holds, not the cap: a read buffer of max_bytes per file costs more than
        # the read itself. One byte more shows a file that grew (or a pipe, whose size reads 0).
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise NotAnImage(f"file is over the size limit of {max_bytes} bytes")
        data = fh.read(size + 1)
        if len(data) > size:
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise NotAnImage(f"file is over the size limit of {max_bytes} bytes")
    return data


def prepare_bytes(data: bytes, store: ImageStore, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageFacts, StoredFile]:
    facts = analyze_bytes(data, max_pixels)
    return facts, store.put(facts.sha256, facts.ext, data)


# Any constant: the advisory lock that writers of images, sources and the fetch log take turns on.
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
            "status": "pending", "reason": facts.decode_error, "label_id": labels[item.label],
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
    result.new_sources = _insert_sources(session, items, ids, labels, now, set(new_facts))
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


def _insert_sources(session: Session, items: Sequence[PreparedImage], ids: dict[str, int],
                    labels: dict[str, int], now: dt.datetime, new_shas: set[str]) -> int:
    keys = {(ids[i.facts.sha256], i.source.uri, labels[i.label]): i for i in items}
    existing: set[tuple] = set()
    # Images inserted by this batch cannot have sources yet; only known images need the lookup.
    key_list = [key for key, item in keys.items() if item.facts.sha256 not in new_shas]
    for chunk in _chunks(key_list, SQL_CHUNK):
        existing.update(session.execute(
            select(Source.image_id, Source.uri, Source.label_id).where(
                tuple_(Source.image_id, Source.uri, Source.label_id).in_(chunk))
        ).all())
    rows = []
    for key, item in keys.items():
        if key in existing:
            continue
        src = item.source
        rows.append({
            "image_id": key[0], "label_id": key[2], "uri": src.uri, "engine": src.engine, "query": src.query,
            "crawl_job_id": src.crawl_job_id, "rank": src.rank, "page_url": src.page_url,
            "http_status": src.http_status, "content_type": src.content_type, "fetched_at": src.fetched_at or now,
        })
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


def is_recorded_in(session: Session):
    """A predicate for the store: does the catalog hold an image with this sha256?"""

    def is_recorded(sha256: str) -> bool:
        return session.execute(select(ImageRow.id).where(ImageRow.sha256 == sha256)).first() is not None

    return is_recorded


def commit_batch(session: Session, store: ImageStore, items: Sequence[PreparedImage]) -> RecordResult:
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


def ingest_bytes(session: Session, store: ImageStore, data: bytes, label: str, source: SourceInfo,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> RecordResult:
    """Ingest one image's bytes and commit (crawl and single-file callers); raises NotAnImage."""
    facts, stored = prepare_bytes(data, store, max_pixels)
    return commit_batch(session, store, [PreparedImage(facts, stored, label, source)])


def _chunks(seq: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]
