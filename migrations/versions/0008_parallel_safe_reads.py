"""point-in-time and feed reads may run in parallel: the reader functions are PARALLEL SAFE

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Additive (function attributes only; no table, column or answer changes). A function is
``PARALLEL UNSAFE`` unless it says otherwise, and an unsafe function anywhere in a query
forbids a parallel plan for all of it, inlined or not: ``SELECT * FROM
inventory.images_as_of(ts) WHERE region_id = .. AND image_source = ..`` on a big
partition was one backend scanning the current versions alone however many cores the
server has (bench/README.md, "Point-in-time reads"). These functions only read (no
writes, no temporary tables, no session state), so they are marked ``PARALLEL SAFE``:

- ``images_as_of(ts)`` and its NULL guard ``as_of_moment(ts)``;
- ``changes_since(cursor, max_rows)``, the change feed's read;
- ``beijing_time(text)``, the API's timestamp parser of the views.

``images_as_of_events`` (the fold of the events, kept as the reference) and the
aggregate ``jsonb_merge_agg`` (no combine function) stay as they were.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    "inventory.images_as_of(timestamptz)",
    "inventory.as_of_moment(timestamptz)",
    "inventory.changes_since(bigint, integer)",
    "inventory.beijing_time(text)",
)


def upgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} PARALLEL SAFE")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} PARALLEL UNSAFE")
