"""closed versions stored by partition: image_versions_closed hash-partitioned on
(region_id, image_source)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04

Additive for readers (same tables, columns and answers). Migration 0009 stored the
current versions by partition; a read of an earlier moment gets the versions that have
changed since from ``image_versions_closed``, where every partition's closed versions
lay together in closing order. A big partition read there went through the ``valid_to``
index past the moment, every partition's rows, and kept its own: on 1,000,000 images a
406,250-image partition between the first and second of three rounds read 1,333,431
rows for its 406,250 (633 ms; bench/README.md). Now ``image_versions_closed`` is
``PARTITION BY HASH (region_id, image_source)`` into ``image_versions_closed_0`` ..
``_15``, the same hash as the current versions: a partition form prunes to one table
of each, and one image is an index probe of each of the 32.

The rows are copied in the migration's transaction (migration 0009's
``rebuild_partition``).
"""

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v9 = importlib.import_module("migrations.versions.0009_current_versions_by_partition")

CLOSED_COMMENT = (
    "Partition of image_versions: the earlier versions (valid_to the moment of the next "
    "change or removal); hash-partitioned on (region_id, image_source) into "
    "image_versions_closed_0 .. _15 (migration 0010)."
)


def _bucket_comment(n: int) -> str:
    return (
        "Partition of image_versions_closed: the earlier versions of the partitions "
        f"(region_id, image_source) that hash to remainder {n} of {_v9.BUCKETS}."
    )


def _rebuild_closed(partition_by: str, comment: str) -> None:
    op.execute("LOCK TABLE inventory.image_versions IN ACCESS EXCLUSIVE MODE")
    _v9.rebuild_partition(
        "image_versions_closed",
        "FROM (MINVALUE) TO ('infinity')",
        partition_by,
        comment,
        _bucket_comment,
    )


def upgrade() -> None:
    _rebuild_closed("PARTITION BY HASH (region_id, image_source)", CLOSED_COMMENT)


def downgrade() -> None:
    _rebuild_closed(
        "",
        "Partition of image_versions: the earlier versions (valid_to the moment of the next "
        "change or removal).",
    )
