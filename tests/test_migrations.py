"""The schema: migrations reach the models exactly, and stale or newer catalogs are refused with the fix."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from db import SchemaState, check_schema, open_engine, upgrade_to_head
from db.migrate import HEAD_REVISION, alembic_config, head_revision, ours
from db.models import Base
from fastclass.catalog import catalog_url
from tests.helpers import run_cli


def test_empty_database_upgraded_to_head_matches_models(catalog_location):
    engine = open_engine(catalog_url(catalog_location))
    assert check_schema(engine) is SchemaState.EMPTY
    upgrade_to_head(engine)
    assert check_schema(engine) is SchemaState.CURRENT
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True, "include_name": ours}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_cheap_head_check_names_the_newest_migration():
    assert HEAD_REVISION == head_revision()


def test_sqlite_catalog_uses_wal_and_foreign_keys(sqlite_catalog):
    engine = open_engine(catalog_url(sqlite_catalog))
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


def test_every_older_revision_is_refused_then_upgraded_by_init(tmp_path):
    revisions = [r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    for older in ["base"] + [r for r in revisions if r != head_revision()]:
        location = str(tmp_path / f"cat_{older}.db")
        assert run_cli(["init"], location).exit_code == 0
        engine = open_engine(catalog_url(location))
        from alembic import command

        command.downgrade(alembic_config(engine), older)
        engine.dispose()
        result = run_cli(["stats"], location)
        assert result.exit_code == 1
        if older == "base":
            assert result.stderr == f"Error: {location} is not a fastclass catalog; create one with `fastclass init`\n"
        else:
            assert result.stderr == f"Error: catalog {location} has an older schema; upgrade it with `fastclass init`\n"
        assert run_cli(["init"], location).exit_code == 0
        assert run_cli(["stats"], location).exit_code == 0


def test_catalog_from_a_newer_fastclass_is_refused(sqlite_catalog):
    engine = open_engine(catalog_url(sqlite_catalog))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    engine.dispose()
    for command in (["stats"], ["init"]):
        result = run_cli(command, sqlite_catalog)
        assert result.exit_code == 1
        assert result.stderr == (f"Error: catalog {sqlite_catalog} was written by a newer fastclass "
                                 "(unknown schema revision); upgrade fastclass to use it\n")
