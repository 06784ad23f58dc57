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
valid_to). The merge closes every current version of an image it rewrites, whatever
its source, before it opens one, so an image still has one current version.

The rows are copied in the migration's transaction: the previous
``image_versions_current`` is detached, renamed, copied into the new one and dropped
(the one table an upgrade here drops: it is rebuilt under its own name).
"""

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v2 = importlib.import_module("migrations.versions.0002_reader_views")

BUCKETS = 16
"""``image_versions_current_0`` .. ``_15``."""
CURRENT = "inventory.image_versions_current"
PREVIOUS = "image_versions_current_0008"
CURRENT_INDEX = "ix_image_versions_current_region_id_image_source_valid_from"
CURRENT_COMMENT = (
    "Partition of image_versions: the current versions (valid_to infinity), one per "
    "listed image; hash-partitioned on (region_id, image_source) into "
    "image_versions_current_0 .. _15 (migration 0009)."
)


def _bucket_comment(n: int) -> str:
    return (
        f"Partition of image_versions_current: the current versions of the partitions "
        f"(region_id, image_source) that hash to remainder {n} of {BUCKETS}."
    )


def _rebuild_current(partition_by: str, comment: str) -> None:
    """Replace image_versions_current by a table created with ``partition_by`` (or a plain
    one for ""), its rows, index, comments and grant kept."""
    conn = op.get_bind()
    columns = [
        r.attname
        for r in conn.execute(
            sa.text(
                "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass)"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            {"t": CURRENT},
        )
    ]
    listed = ", ".join(f'"{c}"' for c in columns)
    op.execute(f"ALTER TABLE inventory.image_versions DETACH PARTITION {CURRENT}")
    op.execute(f"DROP INDEX inventory.{CURRENT_INDEX}")
    op.execute(f"ALTER TABLE {CURRENT} RENAME TO {PREVIOUS}")
    op.execute(
        f"CREATE TABLE {CURRENT} PARTITION OF inventory.image_versions"
        f" FOR VALUES FROM ('infinity') TO (MAXVALUE) {partition_by}"
    )
    tables = [CURRENT]
    if partition_by:
        for n in range(BUCKETS):
            op.execute(
                f"CREATE TABLE {CURRENT}_{n} PARTITION OF {CURRENT}"
                f" FOR VALUES WITH (MODULUS {BUCKETS}, REMAINDER {n})"
            )
            tables.append(f"{CURRENT}_{n}")
    op.execute(f"INSERT INTO {CURRENT} ({listed}) SELECT {listed} FROM inventory.{PREVIOUS}")
    op.execute(f"DROP TABLE inventory.{PREVIOUS}")
    op.execute(f"CREATE INDEX {CURRENT_INDEX} ON {CURRENT} (region_id, image_source, valid_from)")
    # Each table's columns mean what the parent's do.
    described = list(
        conn.execute(
            sa.text(
                "SELECT attname, col_description(attrelid, attnum) AS comment FROM pg_attribute"
                " WHERE attrelid = 'inventory.image_versions'::regclass AND attnum > 0"
                " AND NOT attisdropped"
            )
        )
    )
    for i, table in enumerate(tables):
        text = comment if i == 0 else _bucket_comment(i - 1)
        op.execute(f"COMMENT ON TABLE {table} IS {_v2._literal(text)}")
        for column in described:
            op.execute(
                f'COMMENT ON COLUMN {table}."{column.attname}" IS {_v2._literal(column.comment)}'
            )
        op.execute(f"GRANT SELECT ON {table} TO inventory_reader")
    op.execute(f"ANALYZE {CURRENT}")


def upgrade() -> None:
    op.execute("LOCK TABLE inventory.image_versions IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE inventory.image_versions DROP CONSTRAINT pk_image_versions")
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
