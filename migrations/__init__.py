"""Alembic environment and versions: the only way the catalog schema changes."""
