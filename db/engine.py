"""Engine and session setup for SQLite and PostgreSQL catalogs."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


class CatalogError(Exception):
    """The catalog cannot be opened or used as it is; the message says how to fix it."""


def _set_sqlite_pragmas(dbapi_connection, connection_record) -> None:
    # WAL lets readers (stats, the clean prompt) run beside a writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_engine(url: str) -> Engine:
    """Create an engine for a catalog URL and check that it can connect."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CatalogError(f"not a catalog path or database URL: {url!r}") from exc
    try:
        engine = _create(parsed)
    except NoSuchModuleError as exc:
        raise CatalogError(f"unsupported database URL {display_url(url)}; use a file path or postgresql+psycopg://...") from exc
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise CatalogError(f"cannot open catalog {display_url(url)}: {reason}") from exc
    return engine


def _create(parsed) -> Engine:
    if parsed.get_backend_name() == "sqlite":
        # One connection per checkout: pooled SQLite connections across threads and forks cause lock surprises.
        engine = create_engine(parsed, poolclass=NullPool)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=_connect_args(parsed.get_backend_name()))
    except ModuleNotFoundError as exc:
        raise CatalogError(
            f"no database driver for {parsed.drivername} ({exc.name} is not installed); "
            "install it with: pip install 'fastclass[postgres]'"
        ) from exc


def _connect_args(backend: str) -> dict:
    return {"connect_timeout": 10} if backend == "postgresql" else {}


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
