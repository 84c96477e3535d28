"""The catalog database: SQLAlchemy models, engine/session setup and the migration runner."""
from db.engine import CatalogError, open_engine, session_scope
from db.migrate import SchemaState, check_schema, upgrade_to_head

__all__ = ["CatalogError", "SchemaState", "check_schema", "open_engine", "session_scope", "upgrade_to_head"]
