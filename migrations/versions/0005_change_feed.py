"""change feed: a commit-ordered cursor over image_events, webhook subscriber cursors

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Partition transactions commit concurrently and out of ``event_id`` order, so a reader
polling ``event_id > last`` can pass an id whose transaction is still open and miss it
for ever. Each transaction that recorded events therefore takes, as its last statement,
the next number from the one-row ``feed_clock`` (the row lock is held to commit, so the
numbers become visible in order) and writes its events' ids under that number into
``change_batches``. ``changes_since(cursor)`` reads the batches after a cursor; the
argument that it cannot skip is in docs/queries.md ("Change feed"). Events already
recorded are back-filled as one batch per (run, region, source), in event order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION_BITS = 24  # service.store.tables.FEED_POSITION_BITS (migrations stand alone)

CHANGE_COLUMNS = (
    ("cursor", "bigint", "Feed cursor of the event: store it and pass it to the next call."),
    ("committed_at", "timestamptz", "When the event's transaction took its batch number."),
    ("event_id", "bigint", "image_events.event_id."),
    ("occurred_at", "timestamptz", "image_events.occurred_at."),
    ("sync_run_id", "bigint", "image_events.sync_run_id."),
    ("region_id", "text", "image_events.region_id."),
    ("image_id", "text", "image_events.image_id."),
    ("image_source", "text", "image_events.image_source."),
    ("event_type", "text", "image_events.event_type."),
    ("changed_fields", "text[]", "image_events.changed_fields."),
    ("before", "jsonb", "image_events.before."),
    ("after", "jsonb", "image_events.after."),
    (
        "document",
        "jsonb",
        "The whole image_events row as jsonb (every column, also columns added later).",
    ),
)

_MASK = (1 << POSITION_BITS) - 1

CHANGES_SINCE = f"""
CREATE FUNCTION inventory.changes_since(cursor bigint, max_rows integer DEFAULT 1000)
RETURNS SETOF inventory.change
LANGUAGE sql STABLE AS $fn$
SELECT (b.batch << {POSITION_BITS}) | x.pos, b.committed_at,
       e.event_id, e.occurred_at, e.sync_run_id, e.region_id, e.image_id, e.image_source,
       e.event_type, e.changed_fields, e.before, e.after, to_jsonb(e)
  FROM inventory.change_batches b
 CROSS JOIN LATERAL (
        SELECT CASE WHEN b.batch = greatest($1, 0) >> {POSITION_BITS}
                    THEN (greatest($1, 0) & {_MASK})::integer ELSE 0 END AS skip
       ) s
 CROSS JOIN LATERAL (
        SELECT u.event_id, u.pos + s.skip AS pos
          FROM unnest(b.event_ids[s.skip + 1 : s.skip + greatest($2, 0)])
               WITH ORDINALITY AS u(event_id, pos)
       ) x
  JOIN inventory.image_events e ON e.event_id = x.event_id
 WHERE b.batch >= greatest($1, 0) >> {POSITION_BITS}
 ORDER BY b.batch, x.pos
 LIMIT greatest($2, 0)
$fn$"""

BACKFILL = """
WITH runs AS (
    SELECT sync_run_id, region_id, image_source, min(event_id) AS first_id,
           max(occurred_at) AS at, count(*)::integer AS n,
           array_agg(event_id ORDER BY event_id) AS ids
      FROM inventory.image_events
     GROUP BY sync_run_id, region_id, image_source
)
INSERT INTO inventory.change_batches
       (batch, committed_at, run_id, region_id, image_source, event_count, event_ids)
SELECT row_number() OVER (ORDER BY first_id), at, sync_run_id, region_id, image_source, n, ids
  FROM runs
"""


def upgrade() -> None:
    op.create_table(
        "feed_clock",
        sa.Column(
            "singleton",
            sa.Boolean(),
            server_default=sa.text("true"),
            nullable=False,
            comment="Always true: the table has exactly one row.",
        ),
        sa.Column(
            "batch",
            sa.BigInteger(),
            server_default="0",
            nullable=False,
            comment="Number of the last commit that recorded events. Incremented by each "
            "such commit as its last statement; the row lock held to commit orders the "
            "commits.",
        ),
        sa.CheckConstraint("singleton", name=op.f("ck_feed_clock_singleton")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_feed_clock")),
        schema="inventory",
        comment="The change feed's commit counter (one row); see docs/queries.md, Change feed.",
    )
    op.create_table(
        "change_batches",
        sa.Column(
            "batch",
            sa.BigInteger(),
            nullable=False,
            comment="Commit number from feed_clock: batches become visible in this order.",
        ),
        sa.Column(
            "committed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the batch took its number (moments before its commit).",
        ),
        sa.Column(
            "run_id", sa.BigInteger(), nullable=False, comment="The sync run that recorded it."
        ),
        sa.Column("region_id", sa.Text(), nullable=False, comment="Partition region."),
        sa.Column("image_source", sa.Text(), nullable=False, comment="Partition image source."),
        sa.Column(
            "event_count", sa.Integer(), nullable=False, comment="Number of events in the batch."
        ),
        sa.Column(
            "event_ids",
            ARRAY(sa.BigInteger()),
            nullable=False,
            comment="image_events.event_id of the batch's events, in event_id order; an "
            "event's position in the feed is its 1-based index here.",
        ),
        sa.PrimaryKeyConstraint("batch", name=op.f("pk_change_batches")),
        schema="inventory",
        comment="One row per committed partition transaction that recorded events: the "
        "commit-ordered batches read by changes_since().",
    )
    op.create_table(
        "webhook_cursors",
        sa.Column(
            "subscriber",
            sa.Text(),
            nullable=False,
            comment="Stable subscriber name: the [[webhooks]] name, or url- and a hash of "
            "the URL without credentials.",
        ),
        sa.Column(
            "url", sa.Text(), nullable=False, comment="The webhook URL, credentials removed."
        ),
        sa.Column(
            "cursor",
            sa.BigInteger(),
            nullable=False,
            comment="Feed cursor of the last event the subscriber acknowledged (2xx).",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the subscriber was first seen.",
        ),
        sa.Column(
            "delivered_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When a batch was last acknowledged.",
        ),
        sa.Column(
            "attempted_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When a delivery was last attempted.",
        ),
        sa.Column(
            "failing",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="True after a delivery failed all its attempts, until one succeeds.",
        ),
        sa.Column(
            "failures",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Deliveries that failed all their attempts since the last success.",
        ),
        sa.Column(
            "last_error",
            sa.Text(),
            nullable=True,
            comment="Why the last failed delivery failed (no secrets).",
        ),
        sa.PrimaryKeyConstraint("subscriber", name=op.f("pk_webhook_cursors")),
        schema="inventory",
        comment="Per webhook subscriber: how far it has acknowledged the change feed.",
    )
    op.execute(BACKFILL)
    op.execute(
        "INSERT INTO inventory.feed_clock (singleton, batch)"
        " SELECT true, coalesce(max(batch), 0) FROM inventory.change_batches"
    )

    fields = ", ".join(f"{name} {type_}" for name, type_, _ in CHANGE_COLUMNS)
    op.execute(f"CREATE TYPE inventory.change AS ({fields})")
    op.execute(
        "COMMENT ON TYPE inventory.change IS 'One event of the change feed, as "
        "changes_since() returns it.'"
    )
    for name, _, comment in CHANGE_COLUMNS:
        op.execute(f"COMMENT ON COLUMN inventory.change.{name} IS {_literal(comment)}")
    op.execute(CHANGES_SINCE)
    op.execute(
        "COMMENT ON FUNCTION inventory.changes_since(bigint, integer) IS "
        + _literal(
            "Events committed after cursor (0 = the beginning), in commit order, at most "
            "max_rows; store the last row's cursor and pass it to the next call: every "
            "event is returned exactly once, however partitions commit. See "
            "docs/queries.md, Change feed."
        )
    )
    for table in ("feed_clock", "change_batches", "webhook_cursors"):
        op.execute(f"GRANT SELECT ON inventory.{table} TO inventory_reader")
    op.execute("GRANT USAGE ON TYPE inventory.change TO inventory_reader")
    op.execute(
        "GRANT EXECUTE ON FUNCTION inventory.changes_since(bigint, integer) TO inventory_reader"
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def downgrade() -> None:
    op.execute("DROP FUNCTION inventory.changes_since(bigint, integer)")
    op.execute("DROP TYPE inventory.change")
    op.drop_table("webhook_cursors", schema="inventory")
    op.drop_table("change_batches", schema="inventory")
    op.drop_table("feed_clock", schema="inventory")
