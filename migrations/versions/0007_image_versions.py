"""point-in-time reads that use an index: image_versions, an inlinable images_as_of

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Additive. ``images_as_of(ts)`` rebuilt the catalogue by folding every event up to
``ts``: no filter a reader adds (``WHERE region_id = .. AND image_id = ..``) reached an
index, so one image cost a full scan of the history. Now:

- ``inventory.image_versions`` (SCD2, as dbt snapshots keep them): one row per period
  in which an image was listed unchanged, ``valid_from`` <= t < ``valid_to``
  (``infinity`` while current), with the columns ``images_as_of`` returns, disks and
  extra already built. Range-partitioned on ``valid_to``: ``image_versions_current``
  (valid_to = infinity, one row per listed image) and ``image_versions_closed``, so a
  whole read of a recent moment scans the current rows and reaches the closed ones
  through their ``valid_to`` index. The merge writes versions set-based in the
  partition's transaction (new and changed images open one, the change or removal
  closes the previous one); existing history is back-filled here from the events,
  folded as ``images_as_of`` folded them.
- ``images_as_of(ts)`` is one SQL statement over the versions (``LANGUAGE sql
  STABLE``: inlined into the reader's query, so its filters reach the indexes). Same
  name, columns and NULL guard (``inventory.as_of_moment``), same answer.
- ``images_as_of_events(ts)``: the former function under a new name, the fold of the
  events; ``image-sync check`` compares the current state with it.
- ``change_batches.account``: the account of the partition whose commit a batch is
  (two accounts' partitions of one region and source in one run were two batches that
  only their events told apart), back-filled from the batch's first event.
- A guard on ``inventory.images`` (``inventory.images_writer_guard``, a statement
  trigger): a writer that does not say it keeps the versions (``SET LOCAL
  image_sync.writes_versions = 'on'``, as this release's merge does) is refused with one
  line. So an older release still running when this migration lands stops at its next
  write, rolled back, instead of leaving images whose versions are stale. The trigger is
  created before the back-fill: it waits for that release's open writes to commit, whose
  events the back-fill then reads.
"""

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v2 = importlib.import_module("migrations.versions.0002_reader_views")
_v3 = importlib.import_module("migrations.versions.0003_configured_partitions")
_v4 = importlib.import_module("migrations.versions.0004_full_image_record")

COLUMNS: list[tuple[str, str]] = _v4.AS_OF_COLUMNS
"""images_as_of's columns, region_id and image_id first."""
VALUE_COLUMNS = [(n, t) for n, t in COLUMNS if n not in ("region_id", "image_id")]

AS_OF_MOMENT = """
CREATE FUNCTION inventory.as_of_moment(ts timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
  IF ts IS NULL THEN
    RAISE EXCEPTION 'inventory.images_as_of(ts): ts is NULL; give a moment, '
                    'e.g. images_as_of(now() - interval ''1 day'')'
          USING ERRCODE = 'null_value_not_allowed';
  END IF;
  RETURN ts;
END
$fn$"""

# Inlinable: one SELECT, LANGUAGE sql, STABLE, not STRICT, no SET. The guard has no
# column in it, so PostgreSQL makes it a one-time filter (evaluated once before any row
# is read, not per row), and folds it at plan time for a constant ts (a NULL raises
# then, before the NULL comparisons could reduce the query to nothing). ts itself stays
# in the comparisons, so the planner estimates them from the statistics (an initplan
# there made it guess a third of the rows). ts = 'infinity' (everything recorded) must include
# the current versions, whose valid_to is infinity: hence the largest finite moment.
IMAGES_AS_OF = f"""
CREATE FUNCTION inventory.images_as_of(ts timestamptz)
RETURNS TABLE ({", ".join(f"{n} {t}" for n, t in COLUMNS)})
LANGUAGE sql STABLE AS $fn$
SELECT {", ".join(f"v.{n}" for n, _ in COLUMNS)}
  FROM inventory.image_versions v
 WHERE inventory.as_of_moment(ts) IS NOT NULL
   AND v.valid_to > least(ts, '294276-12-31 23:59:59.999999+00'::timestamptz)
   AND v.valid_from <= ts
$fn$"""

# Existing history as versions: one group per (image, moment) (the events of one
# merge share their occurred_at), folded in order as images_as_of_events folds them
# (s.doc, s.old: migration 0004's names). A group ending with `removed` opens no
# version; the last group of a listed image is its current version.
BACKFILL = f"""
WITH g AS (
    SELECT e.region_id, e.image_id, e.occurred_at,
           (array_agg(e.event_type ORDER BY e.event_id DESC))[1] AS last_type,
           inventory.jsonb_merge_agg(e.after ORDER BY e.event_id)
               FILTER (WHERE e.after IS NOT NULL) AS part,
           inventory.jsonb_merge_agg(
               jsonb_build_object('extra', e.after -> 'extra') ORDER BY e.event_id
           ) FILTER (WHERE e.occurred_at < CAST(:cutoff AS timestamptz) AND e.after ? 'extra') AS old_part
      FROM inventory.image_events e
     WHERE e.event_type NOT IN ('access_granted', 'access_revoked')  -- no content
     GROUP BY e.region_id, e.image_id, e.occurred_at
), s AS (
    SELECT g.region_id, g.image_id, g.occurred_at, g.last_type,
           inventory.jsonb_merge_agg(g.part) OVER w AS doc,
           inventory.jsonb_merge_agg(g.old_part) OVER w AS old,
           lead(g.occurred_at) OVER w AS next_at
      FROM g
    WINDOW w AS (PARTITION BY g.region_id, g.image_id ORDER BY g.occurred_at)
)
INSERT INTO inventory.image_versions
       (region_id, image_id, valid_from, valid_to, {", ".join(n for n, _ in VALUE_COLUMNS)})
SELECT * FROM (
    SELECT s.region_id, s.image_id, s.occurred_at,
           coalesce(s.next_at, 'infinity') AS valid_to,
           {", ".join(_v4.as_of_fields())}
      FROM s
     WHERE s.last_type <> 'removed'
) v
 WHERE v.valid_to > v.occurred_at
"""


WRITES_VERSIONS = "image_sync.writes_versions"
"""The setting a writer of inventory.images sets (``SET LOCAL .. = 'on'``) to say it keeps
image_versions in step (service.store.apply does)."""

WRITER_GUARD = f"""
CREATE FUNCTION inventory.images_writer_guard() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  IF coalesce(current_setting('{WRITES_VERSIONS}', true), '') <> 'on' THEN
    RAISE EXCEPTION 'inventory.images is kept with its versions (image_versions) since '
                    'schema 0007, and this writer does not keep them: upgrade image-sync '
                    '(or SET LOCAL {WRITES_VERSIONS} = on after updating the versions too)'
          USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN NULL;
END
$fn$"""


def upgrade() -> None:
    conn = op.get_bind()
    op.execute(WRITER_GUARD)
    op.execute(
        "COMMENT ON FUNCTION inventory.images_writer_guard() IS "
        f"'Refuses a write to inventory.images unless the writer set {WRITES_VERSIONS} "
        "(it keeps image_versions in step): an older image-sync stops with one line.'"
    )
    op.execute(
        "CREATE TRIGGER images_writer_guard BEFORE INSERT OR UPDATE OR DELETE"
        " ON inventory.images FOR EACH STATEMENT"
        " EXECUTE FUNCTION inventory.images_writer_guard()"
    )
    # The moment 0004 ran (before it, documents kept some API fields in extra): it is
    # written into the fold's body; absent on a database that never had it.
    cutoff = conn.scalar(
        sa.text(
            "SELECT substring(prosrc FROM 'occurred_at < ''([^'']+)''::timestamptz')"
            " FROM pg_proc WHERE oid = 'inventory.images_as_of(timestamptz)'::regprocedure"
        )
    )
    op.execute("ALTER FUNCTION inventory.images_as_of(timestamptz) RENAME TO images_as_of_events")
    op.execute(
        "COMMENT ON FUNCTION inventory.images_as_of_events(timestamptz) IS "
        "'The catalogue as it stood at ts, rebuilt by folding image_events (the reference "
        "images_as_of is checked against; reads the whole history: use images_as_of). "
        "Raises for a NULL ts.'"
    )
    op.execute(f"""
        CREATE TABLE inventory.image_versions (
            region_id text NOT NULL,
            image_id text NOT NULL,
            valid_from timestamptz NOT NULL,
            valid_to timestamptz NOT NULL,
            {", ".join(f'"{n}" {t}' for n, t in VALUE_COLUMNS)},
            CONSTRAINT pk_image_versions PRIMARY KEY (region_id, image_id, valid_to),
            CONSTRAINT ck_image_versions_period CHECK (valid_from < valid_to)
        ) PARTITION BY RANGE (valid_to)""")
    op.execute(
        "CREATE TABLE inventory.image_versions_current PARTITION OF inventory.image_versions"
        " FOR VALUES FROM ('infinity') TO (MAXVALUE)"
    )
    op.execute(
        "CREATE TABLE inventory.image_versions_closed PARTITION OF inventory.image_versions"
        " FOR VALUES FROM (MINVALUE) TO ('infinity')"
    )
    op.execute(
        "CREATE INDEX ix_image_versions_region_id_image_source_valid_to"
        " ON inventory.image_versions (region_id, image_source, valid_to)"
    )
    op.execute("CREATE INDEX ix_image_versions_valid_to ON inventory.image_versions (valid_to)")
    # valid_to is the same (infinity) for every current version: there, a partition's
    # versions at an earlier moment are found by valid_from.
    op.execute(
        "CREATE INDEX ix_image_versions_current_region_id_image_source_valid_from"
        " ON inventory.image_versions_current (region_id, image_source, valid_from)"
    )
    table_comments = {
        "image_versions": "Every version of each image (SCD2): one row per period in which "
        "it was listed unchanged (valid_from <= t < valid_to; valid_to infinity while "
        "current), with the columns of images_as_of. Written by the merge in the "
        "partition's transaction; read through images_as_of(ts).",
        "image_versions_current": "Partition of image_versions: the current versions "
        "(valid_to infinity), one per listed image.",
        "image_versions_closed": "Partition of image_versions: the earlier versions "
        "(valid_to the moment of the next change or removal).",
    }
    comments = {
        "region_id": "Region of the image.",
        "image_id": "Image id.",
        "valid_from": "Start of the period: the moment (occurred_at) of the change that "
        "made this version.",
        "valid_to": "End of the period, exclusive: the moment of the next change or the "
        "removal; infinity while current.",
        "disks": "The image's disks in the period, as images_as_of returns them.",
        "extra": "Unknown API fields in the period (raw minus the documented fields).",
    }
    for name, _ in VALUE_COLUMNS:
        comments.setdefault(name, f"images.{name} in the period.")
    for table, table_comment in table_comments.items():
        op.execute(f"COMMENT ON TABLE inventory.{table} IS {_v2._literal(table_comment)}")
        for name, comment in comments.items():
            op.execute(f'COMMENT ON COLUMN inventory.{table}."{name}" IS {_v2._literal(comment)}')
    op.execute(sa.text(BACKFILL).bindparams(cutoff=cutoff or "-infinity"))
    op.add_column(
        "change_batches",
        sa.Column(
            "account",
            sa.Text(),
            comment="Account of the partition whose commit this is (image_events.account); "
            "NULL for a catalogue partition (migration 0007; back-filled from the events).",
        ),
        schema="inventory",
    )
    op.execute(
        "UPDATE inventory.change_batches b SET account = e.account"
        "  FROM inventory.image_events e"
        " WHERE e.event_id = b.event_ids[1] AND e.account IS NOT NULL"
    )
    op.execute("ANALYZE inventory.image_versions_current")
    op.execute("ANALYZE inventory.image_versions_closed")
    op.execute(AS_OF_MOMENT)
    op.execute(
        "COMMENT ON FUNCTION inventory.as_of_moment(timestamptz) IS "
        "'ts itself; raises for a NULL ts (the guard of images_as_of).'"
    )
    op.execute(IMAGES_AS_OF)
    op.execute(
        "COMMENT ON FUNCTION inventory.images_as_of(timestamptz) IS "
        "'The catalogue as it stood at ts: one row per image listed then, with its disks "
        "and unknown API fields (extra) as jsonb, and its shares and instance-type "
        "constraints. Read from image_versions; filters on region_id, image_id, "
        "image_source reach its indexes. Raises for a NULL ts.'"
    )
    for table in table_comments:
        op.execute(f"GRANT SELECT ON inventory.{table} TO inventory_reader")
    for function in ("images_as_of", "as_of_moment"):
        op.execute(
            f"GRANT EXECUTE ON FUNCTION inventory.{function}(timestamptz) TO inventory_reader"
        )


def downgrade() -> None:
    op.drop_column("change_batches", "account", schema="inventory")
    op.execute("DROP TRIGGER images_writer_guard ON inventory.images")
    op.execute("DROP FUNCTION inventory.images_writer_guard()")
    op.execute("DROP FUNCTION inventory.images_as_of(timestamptz)")
    op.execute("DROP FUNCTION inventory.as_of_moment(timestamptz)")
    op.execute("DROP TABLE inventory.image_versions")
    op.execute("ALTER FUNCTION inventory.images_as_of_events(timestamptz) RENAME TO images_as_of")
    op.execute(f"COMMENT ON FUNCTION inventory.images_as_of(timestamptz) IS {_v4.AS_OF_COMMENT}")
