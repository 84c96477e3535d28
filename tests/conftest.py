"""Shared fixtures: real SQLite catalogs in tmp_path, a fresh PostgreSQL database per test (helpers: tests/helpers.py)."""
from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from fastclass.catalog import init_catalog, open_catalog
from tests.helpers import PG_DEFAULT, PG_ENV, libpq_url, pg_server_url

# A suite started in the background by a shell without job control (`make test &` in a script) inherits
# SIGINT ignored, and so would every command the Ctrl-C tests start: give them back Python's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pg_server() -> str:
    url = pg_server_url()
    if url is None:
        pytest.skip(f"no PostgreSQL server reachable at {os.environ.get(PG_ENV, PG_DEFAULT)} "
                    f"(set {PG_ENV} to a server URL to run the PostgreSQL catalog tests)")
    return url


@pytest.fixture
def pg_database(pg_server: str):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"fastclass_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(pg_server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(libpq_url(pg_server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_location(request, tmp_path: Path) -> str:
    """An uninitialised catalog location on each backend (PostgreSQL skipped when absent)."""
    if request.param == "sqlite":
        return str(tmp_path / "catalog.db")
    return request.getfixturevalue("pg_database")


@pytest.fixture
def catalog(catalog_location: str, tmp_path: Path):
    """An initialised catalog (store under tmp_path), on each backend."""
    init_catalog(catalog_location, str(tmp_path / "store"))
    cat = open_catalog(catalog_location)
    yield cat
    cat.close()


@pytest.fixture
def initialized_catalog(catalog_location: str, tmp_path: Path) -> str:
    """An initialised catalog location on each backend, its store in tmp_path/images."""
    init_catalog(catalog_location, str(tmp_path / "images"))
    return catalog_location


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> str:
    location = str(tmp_path / "catalog.db")
    init_catalog(location)
    return location
