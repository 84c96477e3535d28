"""Typed SQLAlchemy models of the catalog; migrations/ is the only way their tables change."""
from __future__ import annotations

import datetime as dt
import enum
from typing import Optional

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ImageStatus(str, enum.Enum):
    """Life cycle of an image: pending until verified, then ok or rejected; deleted by review or prune.

    fastclass/lifecycle.py owns the transitions between them and who may make each.
    """

    PENDING = "pending"
    OK = "ok"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    DELETED = "deleted"

    def __str__(self) -> str:  # the value in messages and f-strings, as the catalog stores it
        return self.value

    __format__ = str.__format__


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Label(Base):
    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # The prompt's relabel key (1-9), given once at creation and kept: muscle memory must not relabel wrong.
    digit: Mapped[Optional[int]] = mapped_column(Integer)
    # `label delete` and `label merge` retire a label rather than erase it: history rows still name it.
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class CrawlJob(Base):
    """One run of a crawl for one class; counts and timings are filled in as it goes."""

    __tablename__ = "crawl_jobs"
    __table_args__ = (Index("ix_crawl_jobs_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query: Mapped[str] = mapped_column(Text)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), index=True)
    engines: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="running")
    found: Mapped[int] = mapped_column(Integer, default=0)
    downloaded: Mapped[int] = mapped_column(Integer, default=0)
    new_images: Mapped[int] = mapped_column(Integer, default=0)
    exact_duplicates: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    reject_reasons: Mapped[str] = mapped_column(Text, default="{}")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    engine_stats: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    worker: Mapped[Optional[str]] = mapped_column(String(200))
    """The `fastclass worker` that last ran this job (queued crawls only)."""
    queue_job_id: Mapped[Optional[int]] = mapped_column(BigInteger, index=True)
    """The procrastinate job that carries a queued crawl (`crawl --queue`, PostgreSQL only): its status,
    attempts and schedule live in procrastinate_jobs."""


class Image(Base):
    """One distinct image by content (sha256); its bytes live in the store under store_path."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_status_label", "status", "label_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    store_path: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=ImageStatus.PENDING.value)
    reason: Mapped[Optional[str]] = mapped_column(Text)
    label_id: Mapped[Optional[int]] = mapped_column(ForeignKey("labels.id"))
    dup_group_id: Mapped[Optional[int]] = mapped_column(ForeignKey("duplicate_groups.id", ondelete="SET NULL"), index=True)
    # A reviewer's decision stands on this image: automatic steps (dedup, split) never override it.
    reviewed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # An open label conflict until a reviewer decides: "labels" (sources claim several labels) or "group"
    # (a near-duplicate group spans labels).
    conflict: Mapped[Optional[str]] = mapped_column(String(16), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    label: Mapped[Optional[Label]] = relationship()


class DuplicateGroup(Base):
    """Near-duplicate images found by `dedup`; a group spanning labels is a conflict and keeps all members."""

    __tablename__ = "duplicate_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash_kind: Mapped[str] = mapped_column(String(32))
    threshold: Mapped[int] = mapped_column(Integer)
    flip: Mapped[bool] = mapped_column(Boolean, default=False)
    keeper_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE", use_alter=True))
    size: Mapped[int] = mapped_column(Integer)
    label_count: Mapped[int] = mapped_column(Integer)
    is_conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ImageHash(Base):
    """A perceptual hash of an image as a signed 64-bit integer; kind and version say how to recompute it."""

    __tablename__ = "image_hashes"
    __table_args__ = (Index("ix_image_hashes_kind_value", "kind", "value"),)

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    value: Mapped[int] = mapped_column(BigInteger)


class Source(Base):
    """Where an image came from: one row per (image, URL or path, claimed label)."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("image_id", "uri", "label_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    engine: Mapped[str] = mapped_column(String(32))
    query: Mapped[Optional[str]] = mapped_column(Text)
    crawl_job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("crawl_jobs.id"), index=True)
    rank: Mapped[Optional[int]] = mapped_column(Integer)
    page_url: Mapped[Optional[str]] = mapped_column(Text)
    http_status: Mapped[Optional[int]] = mapped_column(Integer)
    content_type: Mapped[Optional[str]] = mapped_column(String(200))
    license: Mapped[Optional[str]] = mapped_column(String(32))
    """The --license filter the crawl asked its engine for (None: no filter, or not crawled)."""
    fetched_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class EngineCheck(Base):
    """One canary check of a crawl engine (`fastclass engines check`): its figures and verdict."""

    __tablename__ = "engine_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    engine: Mapped[str] = mapped_column(String(32), index=True)
    checked_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    query: Mapped[str] = mapped_column(Text)
    verdict: Mapped[str] = mapped_column(String(16))
    page1: Mapped[int] = mapped_column(Integer)
    page2: Mapped[int] = mapped_column(Integer)
    sampled: Mapped[int] = mapped_column(Integer)
    downloaded: Mapped[int] = mapped_column(Integer)
    decoded: Mapped[int] = mapped_column(Integer)
    problem: Mapped[Optional[str]] = mapped_column(Text)


class Review(Base):
    """One review decision; rows are only ever added, so the history is complete."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    old_status: Mapped[Optional[str]] = mapped_column(String(16))
    new_status: Mapped[Optional[str]] = mapped_column(String(16))
    old_label_id: Mapped[Optional[int]] = mapped_column(ForeignKey("labels.id"))
    new_label_id: Mapped[Optional[int]] = mapped_column(ForeignKey("labels.id"))
    reviewer: Mapped[str] = mapped_column(String(100))
    undoes_id: Mapped[Optional[int]] = mapped_column(ForeignKey("reviews.id"))
    # The open conflict this decision closed, so that its undo opens it again.
    old_conflict: Mapped[Optional[str]] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LabelEvent(Base):
    """One change to a label as an object (rename, merge, delete); rows are only ever added."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    old_name: Mapped[Optional[str]] = mapped_column(String(200))
    new_name: Mapped[Optional[str]] = mapped_column(String(200))
    images: Mapped[int] = mapped_column(Integer)
    detail: Mapped[Optional[str]] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Split(Base):
    """The parameters of a train/valid split; only the current one is extended by `fastclass split`."""

    __tablename__ = "splits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    valid_pct: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    min_valid: Mapped[int] = mapped_column(Integer)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SplitAssignment(Base):
    """Which side of a split an image is on; written once, so later images never move it."""

    __tablename__ = "split_assignments"
    # One b-tree keyed by (split, image) on SQLite: a million-row split inserts about twice as fast.
    __table_args__ = {"sqlite_with_rowid": False}

    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    is_valid: Mapped[bool] = mapped_column(Boolean)


class Snapshot(Base):
    """A named, immutable freeze of (sha256, label, split); database triggers refuse updates once sealed.

    The row is inserted with digest NULL, its items are added, then the digest and counts are set once,
    which seals it: after that neither the row nor its items can change, and no item can be added.
    """

    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id"))
    valid_pct: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    min_valid: Mapped[int] = mapped_column(Integer)
    label_filter: Mapped[Optional[str]] = mapped_column(Text)
    min_per_label: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[Optional[str]] = mapped_column(Text)
    digest: Mapped[Optional[str]] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    train_count: Mapped[int] = mapped_column(Integer, default=0)
    valid_count: Mapped[int] = mapped_column(Integer, default=0)
    label_counts: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SnapshotItem(Base):
    """One image of a snapshot with the label and split it had then (names, not ids: relabels cannot reach it)."""

    __tablename__ = "snapshot_items"
    __table_args__ = {"sqlite_with_rowid": False}

    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True)
    # No cascade: an image a snapshot holds cannot be deleted from the catalog.
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True, index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    is_valid: Mapped[bool] = mapped_column(Boolean)


class FetchedUrl(Base):
    """The outcome of fetching one image URL, so that a resumed crawl never fetches it again.

    One row per URL (keyed by the sha256 of the URL, since URLs can be longer than an index allows).
    A temporary failure (timeout, 5xx, 429) is retried by the next run; a permanent one (404, not an
    image, too large, redirect loop) and a success are not.
    """

    __tablename__ = "fetched_urls"

    url_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[Optional[str]] = mapped_column(Text)
    http_status: Mapped[Optional[int]] = mapped_column(Integer)
    sha256: Mapped[Optional[str]] = mapped_column(String(64))
    crawl_job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("crawl_jobs.id"), index=True)
    fetched_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class RunStatus(str, enum.Enum):
    """A training run is running until it ends done, failed or interrupted (Ctrl-C); a killed one stays running
    with a dead pid, which listings show as interrupted."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class TrainingRun(Base):
    """One `fastclass train` of a snapshot: its resolved config, where it ran, its outcome and artifacts."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No cascade: a snapshot that a run was trained on cannot be deleted.
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"), index=True)
    arch: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING.value)
    config: Mapped[str] = mapped_column(Text, default="{}")
    code_version: Mapped[str] = mapped_column(String(100))
    device: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    artifact_dir: Mapped[str] = mapped_column(Text)
    valid_loss: Mapped[Optional[float]] = mapped_column(Float)
    accuracy: Mapped[Optional[float]] = mapped_column(Float)
    tta_accuracy: Mapped[Optional[float]] = mapped_column(Float)
    error: Mapped[Optional[str]] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)


class RunEpoch(Base):
    """The metrics of one epoch of a run, written (and committed) as the epoch ends."""

    __tablename__ = "run_epochs"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    phase: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[Optional[float]] = mapped_column(Float)
    valid_loss: Mapped[Optional[float]] = mapped_column(Float)
    error_rate: Mapped[Optional[float]] = mapped_column(Float)
    accuracy: Mapped[Optional[float]] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    images_per_s: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class _Verdict:
    """A model's prediction and loss for one image of a run's snapshot."""

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    label: Mapped[str] = mapped_column(String(200))
    predicted: Mapped[str] = mapped_column(String(200))
    probability: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)


class RunLoss(_Verdict, Base):
    """A trained run's verdict on one image of its snapshot (written by `interpret`): the most likely
    mislabeled images are those with the highest loss, which `clean --order loss` shows first."""

    __tablename__ = "run_losses"
    __table_args__ = (Index("ix_run_losses_run_id_loss", "run_id", "loss"), {"sqlite_with_rowid": False})

    is_valid: Mapped[bool] = mapped_column(Boolean)

    @property
    def split(self) -> str:
        """Where the image was for the model that judged it."""
        return "valid" if self.is_valid else "train"


class FoldLoss(_Verdict, Base):
    """An out-of-fold verdict on one image of a run's snapshot (written by `train --folds K`): the prediction
    and loss of a model trained the run's way on every fold but this image's."""

    __tablename__ = "fold_losses"
    __table_args__ = (Index("ix_fold_losses_run_id_loss", "run_id", "loss"), {"sqlite_with_rowid": False})

    fold: Mapped[int] = mapped_column(Integer)

    @property
    def split(self) -> str:
        return f"out of fold {self.fold + 1}"


class EmbeddingModel(Base):
    """One way of turning images into vectors: a backbone, the weights it was given, the input size.
    Weights are named by what they are ("pretrained", or the sha256 of a weights file), so the same file
    under another path is the same model and a changed file is a new one."""

    __tablename__ = "embedding_models"
    __table_args__ = (UniqueConstraint("arch", "weights", "size"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    arch: Mapped[str] = mapped_column(String(100))
    weights: Mapped[str] = mapped_column(String(200))
    weights_loaded: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Embedding(Base):
    """An image's pooled backbone features under one embedding model (float32 bytes, dim values)."""

    __tablename__ = "embeddings"
    __table_args__ = ({"sqlite_with_rowid": False},)

    model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Audit(Base):
    """One `fastclass audit`: which embeddings, how it was run, what it found (scores in audit_scores)."""

    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id"), index=True)
    folds: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[str] = mapped_column(Text, default="{}")
    images: Mapped[int] = mapped_column(Integer)
    label_issues: Mapped[int] = mapped_column(Integer)
    outliers: Mapped[int] = mapped_column(Integer)
    near_copies: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuditScore(Base):
    """An audit's verdict on one image: its label's quality (out-of-fold self-confidence), the label the
    classifier suggests, and how far it is from every class (outlier score, low = far)."""

    __tablename__ = "audit_scores"
    __table_args__ = ({"sqlite_with_rowid": False},)

    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    label: Mapped[str] = mapped_column(String(200))
    suggested: Mapped[str] = mapped_column(String(200))
    label_quality: Mapped[float] = mapped_column(Float)
    label_issue: Mapped[bool] = mapped_column(Boolean)
    outlier_score: Mapped[float] = mapped_column(Float)
    outlier: Mapped[bool] = mapped_column(Boolean)


class AuditPair(Base):
    """Two images whose embeddings are near-copies (cosine similarity over the audit's threshold) that the
    perceptual hashes did not group; `dedup --embeddings` groups them."""

    __tablename__ = "audit_pairs"
    __table_args__ = ({"sqlite_with_rowid": False},)

    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True)
    image_a: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    image_b: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    similarity: Mapped[float] = mapped_column(Float)


class QueueFailure(Base):
    """The last error of a queued job's latest failed run (PostgreSQL catalogs, `fastclass jobs queue`):
    procrastinate keeps a job's status and attempts but not why it failed."""

    __tablename__ = "queue_failures"

    queue_job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    task: Mapped[str] = mapped_column(String(128))
    worker: Mapped[str] = mapped_column(String(200))
    error: Mapped[str] = mapped_column(Text)
    failed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
