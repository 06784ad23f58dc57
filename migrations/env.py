"""Alembic environment: async, on the service's own MetaData and settings.

The URL never comes from alembic.ini. Either the caller hands over a live connection
(``config.attributes["connection"]``, Alembic's cookbook recipe: tests and
``image-sync migrate`` migrate exactly the database the code uses), or the URL is
resolved like the service does (``DATABASE_URL``, else the embedded PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from service.store.tables import SCHEMA, VERSION_PARTITIONS, metadata

config = context.config
target_metadata = metadata


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Only the inventory schema is ours; leave everything else in the database alone."""
    if type_ == "schema":
        return name == SCHEMA
    # The partitions of image_versions: their parent is the table the metadata describes.
    return not (type_ == "table" and name in VERSION_PARTITIONS)


def do_run_migrations(connection: Connection) -> None:
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_schemas=True,
        include_name=include_name,
        version_table_schema=SCHEMA,
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    from service.config import load_settings
    from service.store.engine import open_database

    settings = load_settings(os.environ, needs_api=False)  # migrations never call the API
    async with open_database(settings) as database, database.engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
run_migrations_online()
