"""Runs the alembic migrations programmatically and tells whether a catalog's schema is current.

Opening a catalog must be cheap (`fastclass stats` answers in a fraction of a second), so the check reads
the catalog's revision with one query and compares it with HEAD_REVISION; alembic itself, which parses
every migration script, is imported only to upgrade or to tell an older catalog from a newer one.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

import migrations

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
HEAD_REVISION = "0013"
"""The newest revision in migrations/versions (a test keeps the two equal)."""


class SchemaState(str, enum.Enum):
    EMPTY = "empty"
    CURRENT = "current"
    OUTDATED = "outdated"
    NEWER = "newer"


def alembic_config(engine: Engine | None = None) -> "Config":
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The head revision as alembic reads it from the migration scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def check_schema(engine: Engine) -> SchemaState:
    """Compare the catalog's alembic revision with the newest one this code ships."""
    current = current_revision(engine)
    if current is None:
        return SchemaState.EMPTY
    if current == HEAD_REVISION:
        return SchemaState.CURRENT
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    return SchemaState.OUTDATED if current in known else SchemaState.NEWER


QUEUE_PREFIX = "procrastinate_"
"""procrastinate's tables, types and functions (its schema, applied by migration 0012 on PostgreSQL)."""


def ours(name: str | None, type_: str, parent_names: dict) -> bool:
    """Whether a database object belongs to fastclass's models (alembic's include_name): procrastinate's
    tables are created by a migration but are not ours to compare with the models."""
    return not (type_ == "table" and name is not None and name.startswith(QUEUE_PREFIX))


def upgrade_to_head(engine: Engine) -> list[str]:
    """Upgrade to the newest schema; returns what the migrations had to tell (e.g. queued jobs moved)."""
    from alembic import command

    config = alembic_config(engine)
    command.upgrade(config, "head")
    return list(config.attributes.get("notes", []))
