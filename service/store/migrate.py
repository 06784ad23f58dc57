"""Schema migrations through Alembic, on a connection of the service's own engine.

``image-sync migrate`` and the tests call these; ``alembic upgrade head`` from a shell
does the same through ``migrations/env.py``.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import migrations
from service.errors import DatabaseError, SchemaNotCurrent
from service.store.engine import database_errors
from service.store.tables import SCHEMA

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def _run(engine: AsyncEngine, fn: str, *args: str) -> None:
    def run(connection: Connection) -> None:
        getattr(command, fn)(alembic_config(connection), *args)

    async with engine.begin() as conn:
        await conn.run_sync(run)


READER_ROLE = "inventory_reader"

_MAY_NOT_CREATE_READER = sa.text(
    "SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :reader)"
    "   AND NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user)"
)


@database_errors("cannot migrate the schema")
async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema (idempotent).

    Checks first that the migrations can run to the end: a role that owns its database
    but may not create roles stops here, before any change, when ``inventory_reader``
    is missing (raises :class:`DatabaseError` naming the statement an administrator
    runs), instead of failing half-way through a migration."""
    if await current_revision(engine) != head_revision():
        async with engine.connect() as conn:
            if await conn.scalar(_MAY_NOT_CREATE_READER, {"reader": READER_ROLE}):
                user = await conn.scalar(sa.text("SELECT current_user"))
                raise DatabaseError(
                    f"role {READER_ROLE} does not exist and {user} may not create it "
                    f"(not superuser, no CREATEROLE); nothing was changed: an administrator "
                    f"runs `CREATE ROLE {READER_ROLE} NOLOGIN` once, then `image-sync migrate` "
                    "again (docs/operations.md, Database and roles)"
                )
    await _run(engine, "upgrade", revision)


@database_errors("cannot downgrade the schema")
async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    await _run(engine, "downgrade", revision)


@database_errors("cannot read the schema's revision")
async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        context = MigrationContext.configure(connection, opts={"version_table_schema": SCHEMA})
        return context.get_current_revision()

    async with engine.connect() as conn:
        has_schema = await conn.scalar(
            sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": SCHEMA}
        )
        if not has_schema:
            return None
        return await conn.run_sync(read)


async def revision_on(conn: AsyncConnection) -> str | None:
    """The schema's revision, read on ``conn``; None when it was never migrated (no
    version table). Any other failure (permission denied, a lost connection) raises."""
    table = await conn.scalar(sa.text("SELECT to_regclass(:t)"), {"t": f"{SCHEMA}.alembic_version"})
    if table is None:
        return None
    revision: str | None = await conn.scalar(
        sa.text(f"SELECT version_num FROM {SCHEMA}.alembic_version")
    )
    return revision


async def ensure_current(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaNotCurrent` when migrations are pending."""
    current, head = await current_revision(engine), head_revision()
    if current != head:
        raise SchemaNotCurrent(
            f"the database schema is at {current or 'nothing'}, this release needs {head}: "
            "run `image-sync migrate` (or start with --migrate)"
        )
