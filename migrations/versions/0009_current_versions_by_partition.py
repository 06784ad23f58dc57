"""current versions stored by partition: image_versions_current hash-partitioned on
(region_id, image_source)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

Additive for readers (same tables, columns and answers; ``images_as_of`` unchanged).
``SELECT * FROM inventory.images_as_of(ts) WHERE region_id = .. AND image_source = ..``
on a big partition read its rows through the index of ``image_versions_current``, one
heap page per row or so: the rows of one partition lie all over a table whose versions
every merge closes and reopens. On 1,000,000 images with a 406,250-image partition that
was 1.47 s (371 ms on a freshly packed table), where the same rows alone in a table of
their own read in 133 ms (bench/README.md, "Point-in-time reads").

So ``image_versions_current`` is now itself partitioned, ``PARTITION BY HASH
(region_id, image_source)`` into ``image_versions_current_0`` .. ``_15``: a partition's
current versions are stored together in one of 16 tables (with at most the few other
partitions that hash alike), and the reader's filter prunes to it. A whole read scans
the 16; one image (``region_id`` and ``image_id``, no source) is 16 index probes.

A unique key of a partitioned table holds its partition keys, so the primary key of
``image_versions`` gains ``image_source``: (region_id, image_id, image_source,
valid_to). A version without a source (back-filled by 0007 from events whose documents
lacked it, as hand-written history can) gets the image_source of the event that made
it. The merge closes every current version of an image it rewrites, whatever its
source, before it opens one, so an image still has one current version.

The rows are copied in the migration's transaction: the previous
``image_versions_current`` is detached, renamed, copied into the new one and dropped
(the one table an upgrade here drops: it is rebuilt under its own name;
``rebuild_partition`` does it, and migration 0010 does the same to the closed versions).
"""

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v2 = importlib.import_module("migrations.versions.0002_reader_views")

BUCKETS = 16
"""``image_versions_current_0`` .. ``_15``."""
CURRENT_INDEX = "ix_image_versions_current_region_id_image_source_valid_from"
CURRENT_COMMENT = (
    "Partition of image_versions: the current versions (valid_to infinity), one per "
    "listed image; hash-partitioned on (region_id, image_source) into "
    "image_versions_current_0 .. _15 (migration 0009)."
)


FILL_SOURCE = """
UPDATE inventory.image_versions v
   SET image_source = (SELECT e.image_source FROM inventory.image_events e
                        WHERE e.region_id = v.region_id AND e.image_id = v.image_id
                          AND e.occurred_at <= v.valid_from
                        ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1)
 WHERE v.image_source IS NULL
"""


def _bucket_comment(n: int) -> str:
    return (
        f"Partition of image_versions_current: the current versions of the partitions "
        f"(region_id, image_source) that hash to remainder {n} of {BUCKETS}."
    )


def rebuild_partition(
    name: str,
    bound: str,
    partition_by: str,
    comment: str,
    bucket_comment: Callable[[int], str],
    index: tuple[str, str] | None = None,
) -> None:
    """Replace the partition ``inventory.<name>`` of image_versions (``FOR VALUES
    <bound>``) by one created with ``partition_by`` and its ``BUCKETS`` hash partitions,
    or by a plain table for ``partition_by`` "": its rows, comments and grant kept, and
    ``index`` (name, columns), an index of its own, made again."""
    conn = op.get_bind()
    table, previous = f"inventory.{name}", f"{name}_0008"

    def rows(sql: str) -> list[Any]:
        return list(conn.execute(sa.text(sql), {"t": table, "p": f"inventory.{previous}"}))

    columns = rows(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass)"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    listed = ", ".join(f'"{c.attname}"' for c in columns)
    op.execute(f"ALTER TABLE inventory.image_versions DETACH PARTITION {table}")
    op.execute(f"ALTER TABLE {table} RENAME TO {previous}")
    # Its indexes go first, so that the new table's take their names.
    for index_name, constraint in rows(
        "SELECT i.relname, c.conname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid"
        " WHERE x.indrelid = CAST(:p AS regclass)"
    ):
        if constraint:
            op.execute(f'ALTER TABLE inventory.{previous} DROP CONSTRAINT "{constraint}"')
        else:
            op.execute(f'DROP INDEX inventory."{index_name}"')
    op.execute(
        f"CREATE TABLE {table} PARTITION OF inventory.image_versions"
        f" FOR VALUES {bound} {partition_by}"
    )
    tables = [(table, comment)]
    if partition_by:
        for n in range(BUCKETS):
            op.execute(
                f"CREATE TABLE {table}_{n} PARTITION OF {table}"
                f" FOR VALUES WITH (MODULUS {BUCKETS}, REMAINDER {n})"
            )
            tables.append((f"{table}_{n}", bucket_comment(n)))
    op.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM inventory.{previous}")
    op.execute(f"DROP TABLE inventory.{previous}")
    if index is not None:
        op.execute(f"CREATE INDEX {index[0]} ON {table} ({index[1]})")
    # Each table's columns mean what the parent's do.
    described = rows(
        "SELECT attname, col_description(attrelid, attnum) AS comment FROM pg_attribute"
        " WHERE attrelid = 'inventory.image_versions'::regclass AND attnum > 0"
        " AND NOT attisdropped"
    )
    for each, text in tables:
        op.execute(f"COMMENT ON TABLE {each} IS {_v2._literal(text)}")
        for column in described:
            op.execute(
                f'COMMENT ON COLUMN {each}."{column.attname}" IS {_v2._literal(column.comment)}'
            )
        op.execute(f"GRANT SELECT ON {each} TO inventory_reader")
    op.execute(f"ANALYZE {table}")


def _rebuild_current(partition_by: str, comment: str) -> None:
    rebuild_partition(
        "image_versions_current",
        "FROM ('infinity') TO (MAXVALUE)",
        partition_by,
        comment,
        _bucket_comment,
        (CURRENT_INDEX, "region_id, image_source, valid_from"),
    )


def upgrade() -> None:
    op.execute("LOCK TABLE inventory.image_versions IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE inventory.image_versions DROP CONSTRAINT pk_image_versions")
    # A version back-filled by 0007 from events whose documents lack the field (none a
    # release wrote; hand-written history can have them) gets the listing its change was
    # recorded in, the event's own image_source.
    op.execute(FILL_SOURCE)
    op.execute("ALTER TABLE inventory.image_versions ALTER COLUMN image_source SET NOT NULL")
    _rebuild_current("PARTITION BY HASH (region_id, image_source)", CURRENT_COMMENT)
    op.execute(
        "ALTER TABLE inventory.image_versions ADD CONSTRAINT pk_image_versions"
        " PRIMARY KEY (region_id, image_id, image_source, valid_to)"
    )


def downgrade() -> None:
    op.execute("LOCK TABLE inventory.image_versions IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE inventory.image_versions DROP CONSTRAINT pk_image_versions")
    _rebuild_current(
        "",
        "Partition of image_versions: the current versions (valid_to infinity), one per "
        "listed image.",
    )
    op.execute(
        "ALTER TABLE inventory.image_versions ADD CONSTRAINT pk_image_versions"
        " PRIMARY KEY (region_id, image_id, valid_to)"
    )
    op.execute("ALTER TABLE inventory.image_versions ALTER COLUMN image_source DROP NOT NULL")
