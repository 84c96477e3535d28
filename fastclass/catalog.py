"""Where the catalog and its image store live; creating, upgrading and opening them."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from db import CatalogError, SchemaState, check_schema, open_engine, session_scope, upgrade_to_head
from db.engine import display_url
from db.models import Audit, Image, Setting, TrainingRun
from fastclass.errors import FastclassError, NotFoundError
from fastclass.store import ImageStore, Store, StoreError, open_store
from fastclass.text import parse_id

DEFAULT_CATALOG = "fastclass.db"
DEFAULT_STORE = "images"
ENV_CATALOG = "FASTCLASS_CATALOG"
STORE_SETTING = "store_root"


def resolve_location(option: str | None) -> str:
    """Catalog location by precedence: the --catalog option, then FASTCLASS_CATALOG, then ./fastclass.db."""
    return option or os.environ.get(ENV_CATALOG) or DEFAULT_CATALOG


def is_url(location: str) -> bool:
    return "://" in location


def catalog_url(location: str) -> str:
    return location if is_url(location) else f"sqlite:///{Path(location).expanduser().resolve()}"


def _base_dir(location: str) -> Path:
    """Relative store paths are relative to the catalog file's folder (or the working folder for a URL)."""
    return Path.cwd() if is_url(location) else Path(location).expanduser().resolve().parent


def is_recorded_in(session: Session):
    """A predicate for the store: does the catalog hold an image with this sha256?"""

    def is_recorded(sha256: str) -> bool:
        return session.execute(select(Image.id).where(Image.sha256 == sha256)).first() is not None

    return is_recorded


def find_run(session: Session, run_id: int | str) -> TrainingRun:
    """A training run by the id a user typed (the one run lookup: clean --run, runs show, interpret, predict)."""
    text = str(run_id).strip()
    run = session.get(TrainingRun, parse_id(text)) if parse_id(text) is not None else None
    if run is None:
        raise NotFoundError(f"no training run {text!r} in the catalog (see `fastclass runs`)")
    return run


def find_audit(session: Session, audit_id: int | None, needed_by: str) -> Audit:
    """An audit by id, or the latest when None (the one audit lookup: audit show, clean --order issues,
    dedup --embeddings, the gallery); `needed_by` names what asked, for the error when there is none."""
    audit = session.get(Audit, audit_id) if audit_id is not None else session.scalar(
        select(Audit).order_by(Audit.id.desc()).limit(1))
    if audit is None:
        raise NotFoundError(f"no audit {audit_id} in the catalog" if audit_id is not None
                            else f"{needed_by} needs an audit: run `fastclass embed`, then `fastclass audit`")
    return audit


@dataclass
class Catalog:
    location: str
    engine: Engine
    store: Store

    @property
    def work_dir(self) -> Path:
        """Where logs/, runs/ and cache/ go: beside a local store, else beside the catalog (file or cwd)."""
        if isinstance(self.store, ImageStore):
            return self.store.root.parent
        return _base_dir(self.location)

    @property
    def display(self) -> str:
        return display_url(self.location) if is_url(self.location) else self.location

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose scope commits at the end; a full disk under the catalog is named as such."""
        try:
            with session_scope(self.engine) as session:
                yield session
        except OperationalError as exc:
            text = _first_line(exc).lower()
            if "disk is full" in text or "disk i/o error" in text or "no space left" in text:
                raise FastclassError(
                    f"cannot write the catalog {self.display}: the disk is full or failing ({_first_line(exc)}); "
                    "free some space and re-run (what was committed is kept)") from exc
            raise

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class InitResult:
    location: str
    store: Path | str
    created: bool
    upgraded: bool
    notes: list[str] = field(default_factory=list)
    """What the upgrade's migrations reported (queued jobs carried over or marked interrupted)."""


def _check_sqlite_parent(location: str) -> None:
    parent = Path(location).expanduser().resolve().parent
    if parent.exists() and not parent.is_dir():
        raise FastclassError(f"cannot create catalog {location}: {parent} is not a folder")
    if not parent.is_dir():
        raise FastclassError(f"cannot create catalog {_shown(location)}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FastclassError(f"cannot create catalog {_shown(location)}: folder {parent} is not writable")


def init_catalog(location: str, store: str | None = None) -> InitResult:
    """Create a catalog (or upgrade an older one to this version's schema) and its image store."""
    if not is_url(location):
        _check_sqlite_parent(location)
    engine = _open(location)
    try:
        state = check_schema(engine)
        if state is SchemaState.NEWER:
            raise FastclassError(_newer_message(location))
        notes = []
        if state is not SchemaState.CURRENT:
            notes = upgrade_to_head(engine)
        with session_scope(engine) as session:
            configured = session.get(Setting, STORE_SETTING)
            images = session.scalar(select(func.count()).select_from(Image))
            if configured is None:
                root = _store_setting(location, store or DEFAULT_STORE)
                session.add(Setting(key=STORE_SETTING, value=root))
            else:
                root = configured.value
                if store and _resolve_store(location, _store_setting(location, store)) != _resolve_store(location, root):
                    root = _move_store(location, configured, store, images)
            store_path = _resolve_store(location, root)
            target = open_store(str(store_path))
            if images and not _store_exists(target):
                # Creating an empty store here would make every image's file "missing": verify --recheck
                # would reject them all and prune would delete the real files once the store came back.
                raise FastclassError(
                    f"catalog {_shown(location)} holds {images} image(s) but its image store {store_path} is "
                    "missing; restore the folder, or if it moved, point the catalog at it with "
                    "`fastclass init --store NEW_PATH`")
        target.create()
    except SQLAlchemyError as exc:
        raise FastclassError(f"cannot initialise catalog {_shown(location)}: {_first_line(exc)}") from exc
    finally:
        engine.dispose()
    return InitResult(location, store_path, created=state is SchemaState.EMPTY,
                      upgraded=state is SchemaState.OUTDATED, notes=notes)


def _store_exists(store: Store) -> bool:
    try:
        store.check()
    except StoreError:
        return False
    return True


def _move_store(location: str, configured: Setting, store: str, images: int) -> str:
    """Point the catalog at its store's new place (`init --store NEW`), when that is what happened: the
    old place is gone and the new one is a store. Anything else is refused, never half-done."""
    new = _store_setting(location, store)
    if _store_exists(open_store(str(_resolve_store(location, configured.value)))):
        raise FastclassError(
            f"catalog {_shown(location)} already uses the image store {configured.value}, which is still there; "
            "moving a store is not done by init (move the folder, then run `fastclass init --store NEW_PATH`)")
    if images and not _store_exists(open_store(str(_resolve_store(location, new)))):
        raise FastclassError(f"{store} is not an image store (no such folder); give the folder the store moved to")
    configured.value = new
    return new


def _store_setting(location: str, store: str) -> str:
    # A path relative to the catalog file is kept relative, so the catalog and its store can move together.
    if store.startswith("s3://"):
        return store.rstrip("/")
    path = Path(store).expanduser()
    if is_url(location) and not path.is_absolute():
        return str(path.resolve())
    return str(path)


def _resolve_store(location: str, value: str) -> Path | str:
    if value.startswith("s3://"):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else (_base_dir(location) / path).resolve()


def open_catalog(location: str) -> Catalog:
    """Open an existing, current catalog; clears temp files a crashed run left in its store."""
    if not is_url(location) and not Path(location).expanduser().exists():
        raise FastclassError(f"no catalog at {_shown(location)}; create one with `fastclass init`")
    engine = _open(location)
    try:
        state = check_schema(engine)
        if state is SchemaState.EMPTY:
            raise FastclassError(f"{_shown(location)} is not a fastclass catalog; create one with `fastclass init`")
        if state is SchemaState.OUTDATED:
            raise FastclassError(f"catalog {_shown(location)} has an older schema; upgrade it with `fastclass init`")
        if state is SchemaState.NEWER:
            raise FastclassError(_newer_message(location))
        with session_scope(engine) as session:
            setting = session.execute(select(Setting.value).where(Setting.key == STORE_SETTING)).scalar()
            if setting is None:
                raise FastclassError(f"catalog {_shown(location)} has no image store set; run `fastclass init`")
            store = open_store(str(_resolve_store(location, setting)))
            store.check()
            store.clear_stale_temp(is_recorded_in(session))
    except BaseException:
        engine.dispose()
        raise
    return Catalog(location, engine, store)


def _open(location: str) -> Engine:
    try:
        return open_engine(catalog_url(location))
    except CatalogError as exc:
        raise FastclassError(str(exc)) from exc


def _newer_message(location: str) -> str:
    return (f"catalog {_shown(location)} was written by a newer fastclass (unknown schema revision); "
            "upgrade fastclass to use it")


def _shown(location: str) -> str:
    return display_url(location) if is_url(location) else location


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
