"""configured partitions, baseline events, images_as_of(NULL) refused

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- ``inventory.partitions``: the registry of configured partitions, written when
  ``image-sync run`` or an unfiltered ``sync --once`` starts. ``sync_health`` now shows
  the configured partitions (also those never attempted), so a partition touched once
  by a mistyped ``--region`` no longer stays red; while the registry is empty (a
  database no start has written yet) it shows every partition with history, as before.
  Its old columns keep their order; ``configured`` and ``configured_since`` are new,
  at the end.
- ``image_events.baseline``: true for the events of a partition's first successful
  sync (the initial load is not news); existing events are back-filled from the run
  records by the same rule.
- ``images_as_of(NULL)`` raises instead of silently returning nothing (same signature
  and result columns, now PL/pgSQL).
"""

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v0002 = importlib.import_module("migrations.versions.0002_reader_views")

SYNC_HEALTH_COMMENT = (
    "Latest outcome and freshness of each configured (region, source) partition "
    "(inventory.partitions); every partition with history while no start registered any."
)
SYNC_HEALTH = """
WITH latest AS (
    SELECT DISTINCT ON (region_id, image_source) *
      FROM inventory.sync_partitions
     WHERE status <> 'skipped_locked'
     ORDER BY region_id, image_source, finished_at DESC
), success AS (
    SELECT region_id, image_source, max(finished_at) AS last_success_at
      FROM inventory.sync_partitions
     WHERE status = 'succeeded'
     GROUP BY region_id, image_source
), shown AS (
    SELECT region_id, image_source, true AS configured, first_configured_at
      FROM inventory.partitions
     WHERE configured
    UNION ALL
    -- No start has written the registry yet (an older daemon): what has history.
    SELECT region_id, image_source, NULL::boolean, NULL::timestamptz
      FROM latest
     WHERE NOT EXISTS (SELECT 1 FROM inventory.partitions)
)
SELECT p.region_id, p.image_source, l.status AS last_status,
       l.started_at AS last_started_at, l.finished_at AS last_finished_at,
       s.last_success_at,
       extract(epoch FROM now() - s.last_success_at)::double precision AS age_seconds,
       l.error_status AS last_error_status, l.error_message AS last_error_message,
       l.run_id AS last_run_id,
       p.configured, p.first_configured_at AS configured_since
  FROM shown p
  LEFT JOIN latest l USING (region_id, image_source)
  LEFT JOIN success s USING (region_id, image_source)
"""
SYNC_HEALTH_COLUMNS = {
    **_v0002.IMAGE_COLUMN_COMMENTS,
    **_v0002.VIEWS["sync_health"][2],
    "image_source": "public, thirdparty, private, shared or community.",
    "last_status": "succeeded, incomplete or failed: the latest attempt; null if never tried.",
    "configured": "True: in the registry of configured partitions; null: no registry yet.",
    "configured_since": "When a start first had the partition configured.",
}

AS_OF_QUERY = _v0002.AS_OF_QUERY


def create_as_of(returns: str, query: str, *, verb: str = "CREATE OR REPLACE") -> None:
    """``images_as_of(ts)`` returning ``returns`` rows of ``query``, refusing a NULL ts
    (later migrations that change its columns create it the same way)."""
    op.execute(f"""
        {verb} FUNCTION inventory.images_as_of(ts timestamptz)
        RETURNS TABLE ({returns})
        LANGUAGE plpgsql STABLE AS $fn$
        #variable_conflict use_column
        BEGIN
          IF ts IS NULL THEN
            RAISE EXCEPTION 'inventory.images_as_of(ts): ts is NULL; give a moment, '
                            'e.g. images_as_of(now() - interval ''1 day'')'
                  USING ERRCODE = 'null_value_not_allowed';
          END IF;
          RETURN QUERY {query};
        END
        $fn$""")


AS_OF_RETURNS = ", ".join(f"{n} {t}" for n, t in _v0002.AS_OF_COLUMNS)

BASELINE_BACKFILL = """
UPDATE inventory.image_events e
   SET baseline = true
  FROM (SELECT DISTINCT ON (region_id, image_source) region_id, image_source, run_id
          FROM inventory.sync_partitions
         WHERE status = 'succeeded'
         ORDER BY region_id, image_source, finished_at, run_id) first_success
 WHERE e.sync_run_id = first_success.run_id
   AND e.region_id = first_success.region_id
   AND e.image_source = first_success.image_source
"""


def upgrade() -> None:
    op.create_table(
        "partitions",
        sa.Column("region_id", sa.Text(), nullable=False, comment="Partition region."),
        sa.Column("image_source", sa.Text(), nullable=False, comment="Partition image source."),
        sa.Column(
            "configured",
            sa.Boolean(),
            nullable=False,
            comment="True when the configuration of the latest `run` / `sync --once` start "
            "(IMAGE_SYNC_REGIONS x IMAGE_SYNC_SOURCES) includes the partition.",
        ),
        sa.Column(
            "first_configured_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a start first had the partition configured.",
        ),
        sa.Column(
            "last_configured_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a start last had the partition configured.",
        ),
        sa.Column(
            "unconfigured_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When a start last left the partition out; null while configured.",
        ),
        sa.PrimaryKeyConstraint("region_id", "image_source", name=op.f("pk_partitions")),
        schema="inventory",
        comment="Registry of configured partitions, written when `image-sync run` or a "
        "`sync --once` without --region/--source starts; health views show these.",
    )
    op.add_column(
        "image_events",
        sa.Column(
            "baseline",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="True for events of the first successful sync of the partition (the "
            "initial load: the image existed before the service watched it); false otherwise.",
        ),
        schema="inventory",
    )
    op.execute(BASELINE_BACKFILL)
    _create_sync_health("CREATE OR REPLACE VIEW", SYNC_HEALTH, SYNC_HEALTH_COMMENT)
    create_as_of(AS_OF_RETURNS, AS_OF_QUERY)
    op.execute(
        "COMMENT ON FUNCTION inventory.images_as_of(timestamptz) IS "
        "'The catalogue as it stood at ts, rebuilt from image_events: one row per image "
        "listed then, with its disks and unknown API fields (extra) as jsonb. "
        "Raises for a NULL ts.'"
    )
    op.execute("GRANT SELECT ON inventory.partitions TO inventory_reader")


def _create_sync_health(verb: str, body: str, comment: str) -> None:
    op.execute(f"{verb} inventory.sync_health AS {body}")
    op.execute(f"COMMENT ON VIEW inventory.sync_health IS {_v0002._literal(comment)}")
    op.execute(f"""
        DO $$ DECLARE c record; BEGIN
          FOR c IN SELECT attname FROM pg_attribute
                    WHERE attrelid = 'inventory.sync_health'::regclass AND attnum > 0 LOOP
            EXECUTE format('COMMENT ON COLUMN inventory.sync_health.%I IS %L', c.attname,
              ({_v0002._sql_map(SYNC_HEALTH_COLUMNS)})->>c.attname);
          END LOOP;
        END $$""")
    op.execute("GRANT SELECT ON inventory.sync_health TO inventory_reader")


def downgrade() -> None:
    op.execute(f"""
        CREATE OR REPLACE FUNCTION inventory.images_as_of(ts timestamptz)
        RETURNS TABLE ({AS_OF_RETURNS})
        LANGUAGE sql STABLE AS $fn$ {AS_OF_QUERY} $fn$""")
    old_comment, old_body, _ = _v0002.VIEWS["sync_health"]
    op.execute("DROP VIEW inventory.sync_health")
    _create_sync_health("CREATE VIEW", old_body, old_comment)
    op.drop_column("image_events", "baseline", schema="inventory")
    op.drop_table("partitions", schema="inventory")
