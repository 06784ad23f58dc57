"""accounts: several JD Cloud accounts in one inventory, images stored once

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Additive (DESIGN.md, Accounts; numbered 0006 because 0003-0005 were taken):

- ``inventory.accounts``: the configured accounts (written at start);
- ``inventory.image_access``: which account can use which private or shared image, one
  row per (account, image); ``images`` stays one row per (region_id, image_id);
- ``sync_partitions.account``, ``partitions.account``: the account of an account
  partition (null for the catalogue partitions). Both tables are now unique per
  partition identity (account, region, source) through an index on
  ``coalesce(account, '')`` instead of their (region, source) primary keys;
- ``image_events.account`` and the event types ``access_granted``/``access_revoked``;
- view ``inventory.account_images``: every image each configured account can use now;
- ``sync_health`` per partition identity (``account`` appended as its last column).

On a database written by the one-account release every row is kept: that account
(named by ``IMAGE_SYNC_ACCOUNT``, default ``default``) gets an ``accounts`` row when there
is anything of it, its private and shared images get ``image_access`` rows, and its
partitions and events get its name; catalogue rows keep a null account.
"""

import importlib
import os
import re
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v2 = importlib.import_module("migrations.versions.0002_reader_views")
_v3 = importlib.import_module("migrations.versions.0003_configured_partitions")

ACCOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # service.config.ACCOUNT_NAME
OLD_EVENT_TYPES = ("created", "updated", "went_offline", "came_online", "removed", "reappeared")
EVENT_TYPES = (*OLD_EVENT_TYPES, "access_granted", "access_revoked")
ACCOUNT_SOURCES = ("private", "shared")
CATALOGUE_SOURCES = ("public", "thirdparty", "community")

COUNTERS = (
    ("access_granted", "access_granted events (an account gained an existing image)."),
    ("access_revoked", "access_revoked events (an account lost an image another lists)."),
)
SYNC_HEALTH_COMMENT = (
    "Latest outcome and freshness of each configured partition (account, region, source; "
    "inventory.partitions); every partition with history while no start registered any."
)
SYNC_HEALTH = """
WITH latest AS (
    SELECT DISTINCT ON (account, region_id, image_source) *
      FROM inventory.sync_partitions
     WHERE status <> 'skipped_locked'
     ORDER BY account, region_id, image_source, finished_at DESC
), success AS (
    SELECT account, region_id, image_source, max(finished_at) AS last_success_at
      FROM inventory.sync_partitions
     WHERE status = 'succeeded'
     GROUP BY account, region_id, image_source
), shown AS (
    SELECT account, region_id, image_source, true AS configured, first_configured_at
      FROM inventory.partitions
     WHERE configured
    UNION ALL
    -- No start has written the registry yet (an older daemon): what has history.
    SELECT account, region_id, image_source, NULL::boolean, NULL::timestamptz
      FROM latest
     WHERE NOT EXISTS (SELECT 1 FROM inventory.partitions)
)
SELECT p.region_id, p.image_source, l.status AS last_status,
       l.started_at AS last_started_at, l.finished_at AS last_finished_at,
       s.last_success_at,
       extract(epoch FROM now() - s.last_success_at)::double precision AS age_seconds,
       l.error_status AS last_error_status, l.error_message AS last_error_message,
       l.run_id AS last_run_id,
       p.configured, p.first_configured_at AS configured_since,
       p.account
  FROM shown p
  LEFT JOIN latest l
    ON l.region_id = p.region_id AND l.image_source = p.image_source
   AND l.account IS NOT DISTINCT FROM p.account
  LEFT JOIN success s
    ON s.region_id = p.region_id AND s.image_source = p.image_source
   AND s.account IS NOT DISTINCT FROM p.account
"""
SYNC_HEALTH_COLUMNS = {
    **_v3.SYNC_HEALTH_COLUMNS,
    "account": "The partition's account (private, shared); null for a catalogue partition.",
}

ACCOUNT_IMAGES_COMMENT = (
    "For each configured account, every image it can use now: the catalogue images "
    "(public, thirdparty, community) of its regions and its current private and shared "
    "images (image_access). Offline images included, as in current_images."
)
ACCOUNT_IMAGES = f"""
SELECT a.account, c.*
  FROM inventory.accounts a
  JOIN inventory.current_images c
    ON c.region_id = ANY (a.regions)
   AND c.image_source IN ({", ".join(repr(s) for s in CATALOGUE_SOURCES)})
 WHERE a.configured
UNION ALL
SELECT a.account, c.*
  FROM inventory.accounts a
  JOIN inventory.image_access x ON x.account = a.account AND x.removed_at IS NULL
  JOIN inventory.current_images c ON c.region_id = x.region_id AND c.image_id = x.image_id
 WHERE a.configured
"""


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def one_account_name() -> str:
    """The name of the one account the previous release synced: IMAGE_SYNC_ACCOUNT, or
    ``default``. A malformed name stops the migration before it changes anything."""
    name = os.environ.get("IMAGE_SYNC_ACCOUNT", "").strip() or "default"
    if not ACCOUNT_NAME.match(name):
        raise ValueError(
            f"IMAGE_SYNC_ACCOUNT: {name!r} is not an account name like prod-1 "
            "(lower-case letters, digits and '-')"
        )
    return name


LOCK_ORDER = ("sync_partitions", "images", "image_disks", "image_events", "sync_runs", "partitions")
"""The tables this migration changes, locked first in the order a partition transaction
of a running sync takes them (its freshness check reads sync_partitions first): the
migration waits for running merges instead of deadlocking with one of them."""


LOCK_PATIENCE = 30.0
"""Seconds the migration tries to take its locks without waiting (so that it cannot be
part of a deadlock) before it waits for them in LOCK_ORDER."""


def _lock_tables() -> None:
    """Lock every table this migration changes before changing any. A running sync's
    partition transactions take these tables in an order of their own (the staging reads
    images first, the daemon's freshness check sync_partitions first), so waiting for one
    lock while holding another could deadlock with them: the locks are tried all at once
    with NOWAIT (a savepoint undoes a failed try) until they are all free at once."""
    conn = op.get_bind()
    tables = ", ".join(f"inventory.{table}" for table in LOCK_ORDER)
    deadline = time.monotonic() + LOCK_PATIENCE
    while time.monotonic() < deadline:
        savepoint = conn.begin_nested()
        try:
            conn.execute(sa.text(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE NOWAIT"))
        except sa.exc.DBAPIError as exc:
            savepoint.rollback()
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            time.sleep(0.05)
            continue
        savepoint.commit()
        return
    conn.execute(sa.text(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE"))


def upgrade() -> None:
    name = one_account_name()
    _lock_tables()
    op.create_table(
        "accounts",
        sa.Column(
            "account",
            sa.Text(),
            nullable=False,
            comment="The account's name, as the configuration gives it ([[accounts]] name, "
            "or IMAGE_SYNC_ACCOUNT).",
        ),
        sa.Column(
            "role_jrn", sa.Text(), comment="The STS role assumed for it; null for a key pair."
        ),
        sa.Column(
            "regions",
            ARRAY(sa.Text()),
            nullable=False,
            comment="The regions the latest start configured for it.",
        ),
        sa.Column(
            "configured",
            sa.Boolean(),
            server_default=sa.text("true"),
            nullable=False,
            comment="True while the configuration of the latest start has the account; an "
            "account removed from it keeps its rows.",
        ),
        sa.Column(
            "first_configured_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a start first had the account configured.",
        ),
        sa.Column(
            "last_configured_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a start last had the account configured.",
        ),
        sa.PrimaryKeyConstraint("account", name=op.f("pk_accounts")),
        schema="inventory",
        comment="The configured JD Cloud accounts, written from the configuration at start.",
    )
    op.create_table(
        "image_access",
        sa.Column(
            "account", sa.Text(), nullable=False, comment="The account (inventory.accounts)."
        ),
        sa.Column("region_id", sa.Text(), nullable=False, comment="Region of the image."),
        sa.Column("image_id", sa.Text(), nullable=False, comment="The image (inventory.images)."),
        sa.Column(
            "image_source",
            sa.Text(),
            nullable=False,
            comment="private (the account owns it) or shared (shared with it), as that "
            "account lists it.",
        ),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a listing of this account first had the image.",
        ),
        sa.Column(
            "removed_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When a complete listing of this account last lost the image (access "
            "revoked or image removed); null while the account lists it.",
        ),
        sa.CheckConstraint(
            _in("image_source", ACCOUNT_SOURCES), name=op.f("ck_image_access_image_source")
        ),
        sa.ForeignKeyConstraint(
            ["region_id", "image_id"],
            ["inventory.images.region_id", "inventory.images.image_id"],
            name=op.f("fk_image_access_region_id_image_id"),
        ),
        sa.PrimaryKeyConstraint("account", "region_id", "image_id", name=op.f("pk_image_access")),
        schema="inventory",
        comment="Which account can use which private or shared image: one row per "
        "(account, image); an image stored once in images has one row here per account "
        "that sees it.",
    )
    op.create_index(
        op.f("ix_image_access_region_id_image_id"),
        "image_access",
        ["region_id", "image_id"],
        schema="inventory",
    )

    op.add_column(
        "sync_partitions",
        sa.Column(
            "account",
            sa.Text(),
            comment="The account of an account partition (private, shared); null for a "
            "catalogue partition (public, thirdparty, community).",
        ),
        schema="inventory",
    )
    op.add_column(
        "partitions",
        sa.Column(
            "account",
            sa.Text(),
            comment="The account of an account partition; null for a catalogue partition.",
        ),
        schema="inventory",
    )
    for table in ("sync_runs", "sync_partitions"):
        for column, comment in COUNTERS:
            op.add_column(
                table,
                sa.Column(
                    column, sa.Integer(), server_default="0", nullable=False, comment=comment
                ),
                schema="inventory",
            )
    op.add_column(
        "image_events",
        sa.Column(
            "account",
            sa.Text(),
            comment="The account whose listing produced the event; null for catalogue partitions.",
        ),
        schema="inventory",
    )

    # The one account's rows (before the new unique indexes: they cannot collide).
    params = {"name": name, "sources": list(ACCOUNT_SOURCES)}
    for table in ("sync_partitions", "partitions", "image_events"):
        op.get_bind().execute(
            sa.text(
                f"UPDATE inventory.{table} SET account = :name"
                " WHERE image_source = ANY (CAST(:sources AS text[]))"
            ),
            params,
        )
    op.get_bind().execute(
        sa.text("""
        INSERT INTO inventory.accounts
               (account, role_jrn, regions, configured, first_configured_at,
                last_configured_at)
        SELECT :name, NULL, coalesce(array_agg(DISTINCT region_id ORDER BY region_id), '{}'),
               true, coalesce(min(at), now()), coalesce(max(at), now())
          FROM (SELECT region_id, first_seen_at AS at FROM inventory.images
                 WHERE image_source = ANY (CAST(:sources AS text[]))
                UNION ALL
                SELECT region_id, finished_at FROM inventory.sync_partitions
                 WHERE account = :name) seen
        HAVING count(*) > 0
        """),
        params,
    )
    op.get_bind().execute(
        sa.text("""
        INSERT INTO inventory.image_access
               (account, region_id, image_id, image_source, first_seen_at, removed_at)
        SELECT :name, region_id, image_id, image_source, first_seen_at, removed_at
          FROM inventory.images
         WHERE image_source = ANY (CAST(:sources AS text[]))
        """),
        params,
    )

    # Unique per partition identity: the account is null for catalogue partitions.
    op.drop_constraint("pk_sync_partitions", "sync_partitions", schema="inventory")
    op.execute(
        "CREATE UNIQUE INDEX uq_sync_partitions_identity ON inventory.sync_partitions"
        " (run_id, region_id, image_source, coalesce(account, ''))"
    )
    op.drop_constraint("pk_partitions", "partitions", schema="inventory")
    op.execute(
        "CREATE UNIQUE INDEX uq_partitions_identity ON inventory.partitions"
        " (region_id, image_source, coalesce(account, ''))"
    )
    op.drop_constraint("ck_image_events_event_type", "image_events", schema="inventory")
    op.create_check_constraint(
        op.f("ck_image_events_event_type"),
        "image_events",
        _in("event_type", EVENT_TYPES),
        schema="inventory",
    )
    op.execute(
        "COMMENT ON COLUMN inventory.image_events.event_type IS "
        + _v2._literal(
            "created, updated, went_offline, came_online, removed, reappeared, access_granted "
            "(an account lists an image another account already listed), access_revoked (an "
            "account's complete listing lost an image another still lists)."
        )
    )
    op.execute(
        "COMMENT ON COLUMN inventory.images.image_source IS "
        + _v2._literal(
            "Listing the image was found in: public, thirdparty, private, shared, community. "
            "An image seen through accounts is private while a configured account lists it "
            "as private, else shared."
        )
    )
    op.execute(
        "COMMENT ON TABLE inventory.sync_partitions IS "
        + _v2._literal(
            "Outcome of each partition (account, region, source) in each run; freshness lives here."
        )
    )
    op.execute(
        "COMMENT ON TABLE inventory.partitions IS "
        + _v2._literal(
            "Registry of configured partitions (account, region, source), written when "
            "`image-sync run` or a `sync --once` without --region/--source starts; health "
            "views show these."
        )
    )
    _v3._create_sync_health("CREATE OR REPLACE VIEW", SYNC_HEALTH, SYNC_HEALTH_COMMENT)
    # _create_sync_health comments columns from 0003's map: the new column's comment.
    op.execute(
        "COMMENT ON COLUMN inventory.sync_health.account IS "
        + _v2._literal(SYNC_HEALTH_COLUMNS["account"])
    )
    _create_account_images()
    for table in ("accounts", "image_access"):
        op.execute(f"GRANT SELECT ON inventory.{table} TO inventory_reader")


def _create_account_images() -> None:
    op.execute(f"CREATE VIEW inventory.account_images AS {ACCOUNT_IMAGES}")
    op.execute(
        f"COMMENT ON VIEW inventory.account_images IS {_v2._literal(ACCOUNT_IMAGES_COMMENT)}"
    )
    # Every column but account is a column of current_images: its comment is theirs.
    op.execute(
        "COMMENT ON COLUMN inventory.account_images.account IS "
        + _v2._literal("The configured account that can use the image (inventory.accounts).")
    )
    op.execute("""
        DO $$ DECLARE c record; BEGIN
          FOR c IN SELECT a.attname, d.description
                     FROM pg_attribute a
                     JOIN pg_description d
                       ON d.objoid = 'inventory.current_images'::regclass
                      AND d.objsubid = a.attnum
                    WHERE a.attrelid = 'inventory.current_images'::regclass AND a.attnum > 0
          LOOP
            EXECUTE format('COMMENT ON COLUMN inventory.account_images.%I IS %L',
                           c.attname, c.description);
          END LOOP;
        END $$""")
    op.execute("GRANT SELECT ON inventory.account_images TO inventory_reader")


def downgrade() -> None:
    op.execute("DROP VIEW inventory.account_images")
    # sync_health reads sync_partitions.*: dropped first, created again without account.
    op.execute("DROP VIEW inventory.sync_health")
    op.drop_constraint("ck_image_events_event_type", "image_events", schema="inventory")
    op.execute(
        "DELETE FROM inventory.image_events WHERE event_type IN "
        "('access_granted', 'access_revoked')"
    )
    op.create_check_constraint(
        op.f("ck_image_events_event_type"),
        "image_events",
        _in("event_type", OLD_EVENT_TYPES),
        schema="inventory",
    )
    op.execute("DROP INDEX inventory.uq_partitions_identity")
    op.execute(
        "DELETE FROM inventory.partitions WHERE account IS NOT NULL AND ctid NOT IN ("
        " SELECT min(ctid) FROM inventory.partitions GROUP BY region_id, image_source)"
    )
    op.create_primary_key("pk_partitions", "partitions", ["region_id", "image_source"],
                          schema="inventory")  # fmt: skip
    op.execute("DROP INDEX inventory.uq_sync_partitions_identity")
    op.execute(
        "DELETE FROM inventory.sync_partitions p WHERE ctid NOT IN ("
        " SELECT min(ctid) FROM inventory.sync_partitions"
        " GROUP BY run_id, region_id, image_source)"
    )
    op.create_primary_key(
        "pk_sync_partitions",
        "sync_partitions",
        ["run_id", "region_id", "image_source"],
        schema="inventory",
    )
    op.drop_column("image_events", "account", schema="inventory")
    for table in ("sync_runs", "sync_partitions"):
        for column, _ in COUNTERS:
            op.drop_column(table, column, schema="inventory")
    op.drop_column("partitions", "account", schema="inventory")
    op.drop_column("sync_partitions", "account", schema="inventory")
    op.drop_index(
        op.f("ix_image_access_region_id_image_id"), table_name="image_access", schema="inventory"
    )
    op.drop_table("image_access", schema="inventory")
    op.drop_table("accounts", schema="inventory")
    _v3._create_sync_health("CREATE VIEW", _v3.SYNC_HEALTH, _v3.SYNC_HEALTH_COMMENT)
