"""The ``inventory`` schema as the live database describes it: relations, columns,
keys, functions and their comments, read from the system catalogues.

``image-sync schema-doc`` renders it (:mod:`service.schema_doc`); the comments are
written by the migrations, so it always describes the schema as deployed.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from service.store.engine import Connection, Engine, connect
from service.store.tables import SCHEMA

_SCHEMA_COMMENT = "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :s"
_RELATIONS = """
SELECT c.oid, c.relname, c.relkind::text, obj_description(c.oid, 'pg_class') AS comment,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partitioned_by,
       (SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
         WHERE c.relispartition AND i.inhrelid = c.oid) AS partition_of,
       pg_get_expr(c.relpartbound, c.oid) AS bound
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm')
   AND c.relname <> 'alembic_version'
 ORDER BY c.relkind IN ('v', 'm'), c.relname
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       col_description(a.attrelid, a.attnum) AS comment
  FROM pg_attribute a
 WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""
_KEYS = """
SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = :oid AND contype = 'p'
"""
_FUNCTIONS = """
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
       pg_get_function_result(p.oid) AS result, p.prokind::text,
       obj_description(p.oid, 'pg_proc') AS comment
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = :schema
 ORDER BY p.proname
"""


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    comment: str | None


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """A table (``kind`` r), partitioned table (p), view (v) or materialized view (m)."""

    name: str
    kind: str
    comment: str | None
    primary_key: str | None
    """``PRIMARY KEY (...)`` as PostgreSQL prints it; None for views."""
    columns: tuple[ColumnInfo, ...]
    partitioned_by: str | None = None
    """``HASH (region_id, image_source)`` and the like, for a partitioned table."""
    partition_of: str | None = None
    """The parent's name, for a partition."""
    bound: str | None = None
    """``FOR VALUES ..``, for a partition."""


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    name: str
    arguments: str
    result: str
    kind: str
    """``f`` function, ``a`` aggregate, ``p`` procedure, ``w`` window function."""
    comment: str | None


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    name: str
    comment: str | None
    relations: tuple[RelationInfo, ...]
    """Tables (partitioned ones among them) first, then views, each by name (the version
    table left out)."""
    functions: tuple[FunctionInfo, ...]


async def describe_schema(engine: Engine) -> SchemaInfo:
    """The ``inventory`` schema as the database describes it."""
    async with connect(engine, "cannot read the schema's catalogue") as conn:
        comment = await conn.scalar(sa.text(_SCHEMA_COMMENT), {"s": SCHEMA})
        rows = (await conn.execute(sa.text(_RELATIONS), {"schema": SCHEMA})).all()
        relations = [await _relation(conn, *row) for row in rows]
        functions = [
            FunctionInfo(*row)
            for row in (await conn.execute(sa.text(_FUNCTIONS), {"schema": SCHEMA})).all()
        ]
    return SchemaInfo(SCHEMA, comment, tuple(relations), tuple(functions))


async def _relation(
    conn: Connection,
    oid: int,
    name: str,
    kind: str,
    comment: str | None,
    partitioned_by: str | None,
    partition_of: str | None,
    bound: str | None,
) -> RelationInfo:
    key = await conn.scalar(sa.text(_KEYS), {"oid": oid})
    columns = (await conn.execute(sa.text(_COLUMNS), {"oid": oid})).all()
    return RelationInfo(
        name,
        kind,
        comment,
        key,
        tuple(ColumnInfo(*c) for c in columns),
        partitioned_by,
        partition_of,
        bound,
    )
