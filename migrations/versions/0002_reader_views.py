"""inventory schema v1: reader views, images_as_of(), the inventory_reader role

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The views are the contract other teams query; they hide bookkeeping columns.
``images_as_of(ts)`` rebuilds the catalogue at a past moment from ``image_events``:
an image's state is the left-to-right merge of its events' ``after`` documents
(created and reappeared carry the whole image, updated and the offline transitions
the changed fields), and the image is listed at ``ts`` unless its last event by then
is ``removed``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IMAGE_COLUMN_COMMENTS = {
    "region_id": "JD Cloud region, e.g. cn-north-1.",
    "image_id": "API imageId.",
    "image_source": "public, thirdparty, private, shared or community.",
    "name": "API name.",
    "platform": "API platform: Ubuntu, CentOS, Windows Server, ...",
    "os_version": "API osVersion.",
    "architecture": "API architecture: x86_64 or i386.",
    "os_type": "API osType: linux or windows.",
    "status": "API status, e.g. ready.",
    "description": "API desc.",
    "owner_pin": "API ownerPin.",
    "launch_permission": "API launchPermission: all, specifiedUsers, ownerOnly.",
    "root_device_type": "API rootDeviceType: cloudDisk or localDisk.",
    "snapshot_id": "API snapshotId of the cloud system disk.",
    "boot_mode": "bootMode, or uefi/bios from uefiSupport.",
    "system_disk_size_gb": "API systemDiskSizeGB, GiB.",
    "size_mb": "API sizeMB, MB.",
    "progress": "API progress, percent.",
    "created_at": "API createTime (Beijing time) as timestamptz.",
    "offline": "API offline; null where the API gives none.",
    "raw": "The API object as received.",
    "first_seen_at": "When this service first listed the image.",
    "last_changed_at": "When the row last changed.",
}

VIEWS = {
    "current_images": (
        "Images listed now (removed_at is null), without bookkeeping columns.",
        """
        SELECT region_id, image_id, image_source, name, platform, os_version, architecture,
               os_type, status, description, owner_pin, launch_permission, root_device_type,
               snapshot_id, boot_mode, system_disk_size_gb, size_mb, progress, created_at,
               offline, raw, first_seen_at, last_changed_at
          FROM inventory.images
         WHERE removed_at IS NULL
        """,
        {},
    ),
    "offline_transitions": (
        "Every went_offline / came_online event with the image's current name.",
        """
        SELECT e.event_id, e.occurred_at, e.region_id, e.image_id, e.image_source, i.name,
               e.event_type, e.event_type = 'went_offline' AS offline, e.sync_run_id
          FROM inventory.image_events e
          LEFT JOIN inventory.images i USING (region_id, image_id)
         WHERE e.event_type IN ('went_offline', 'came_online')
        """,
        {
            "event_id": "The event (inventory.image_events.event_id).",
            "occurred_at": "When the sync recorded the transition.",
            "event_type": "went_offline or came_online.",
            "offline": "The offline state after the transition.",
            "sync_run_id": "The run that recorded it.",
            "name": "The image's current name.",
        },
    ),
    "inventory_summary": (
        "Listed images counted by region, source, platform and offline state.",
        """
        SELECT region_id, image_source, platform, offline,
               count(*)::bigint AS images,
               coalesce(sum(size_mb), 0)::bigint AS total_size_mb
          FROM inventory.images
         WHERE removed_at IS NULL
         GROUP BY region_id, image_source, platform, offline
        """,
        {
            "images": "Number of listed images.",
            "total_size_mb": "Sum of size_mb, MB.",
        },
    ),
    "sync_health": (
        "Latest outcome and freshness of each (region, source) partition.",
        """
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
        )
        SELECT l.region_id, l.image_source, l.status AS last_status,
               l.started_at AS last_started_at, l.finished_at AS last_finished_at,
               s.last_success_at,
               extract(epoch FROM now() - s.last_success_at)::double precision AS age_seconds,
               l.error_status AS last_error_status, l.error_message AS last_error_message,
               l.run_id AS last_run_id
          FROM latest l
          LEFT JOIN success s USING (region_id, image_source)
        """,
        {
            "last_status": "succeeded, incomplete or failed: the latest attempt.",
            "last_started_at": "When the latest attempt started.",
            "last_finished_at": "When the latest attempt ended.",
            "last_success_at": "When the partition last synced successfully.",
            "age_seconds": "Seconds since the last success (null if never).",
            "last_error_status": "error_status of the latest attempt.",
            "last_error_message": "error_message of the latest attempt.",
            "last_run_id": "The run of the latest attempt.",
        },
    ),
}

AS_OF_COLUMNS = [
    ("region_id", "text"),
    ("image_id", "text"),
    ("image_source", "text"),
    ("name", "text"),
    ("platform", "text"),
    ("os_version", "text"),
    ("architecture", "text"),
    ("os_type", "text"),
    ("status", "text"),
    ("description", "text"),
    ("owner_pin", "text"),
    ("launch_permission", "text"),
    ("root_device_type", "text"),
    ("snapshot_id", "text"),
    ("boot_mode", "text"),
    ("system_disk_size_gb", "integer"),
    ("size_mb", "integer"),
    ("progress", "integer"),
    ("created_at", "timestamptz"),
    ("offline", "boolean"),
    ("disks", "jsonb"),
    ("extra", "jsonb"),
]


def _as_of_select() -> str:
    fields = []
    for name, type_ in AS_OF_COLUMNS[2:]:
        if type_ == "jsonb":
            fields.append(f"s.doc -> '{name}'")
        else:
            fields.append(f"(s.doc ->> '{name}')::{type_}")
    return ",\n               ".join(fields)


AS_OF_QUERY = f"""
        WITH ev AS (
            SELECT e.region_id, e.image_id, e.event_id, e.event_type, e.after
              FROM inventory.image_events e
             WHERE e.occurred_at <= ts
        ), last AS (
            SELECT DISTINCT ON (region_id, image_id) region_id, image_id, event_type
              FROM ev
             ORDER BY region_id, image_id, event_id DESC
        ), s AS (
            SELECT region_id, image_id,
                   inventory.jsonb_merge_agg(after ORDER BY event_id) AS doc
              FROM ev
             WHERE after IS NOT NULL
             GROUP BY region_id, image_id
        )
        SELECT s.region_id, s.image_id,
               {_as_of_select()}
          FROM s
          JOIN last l USING (region_id, image_id)
         WHERE l.event_type <> 'removed'
"""
"""The body of images_as_of(ts): the catalogue rebuilt from the events up to ``ts``."""


def upgrade() -> None:
    for name, (comment, body, column_comments) in VIEWS.items():
        op.execute(f"CREATE VIEW inventory.{name} AS {body}")
        op.execute(f"COMMENT ON VIEW inventory.{name} IS {_literal(comment)}")
        columns = {**IMAGE_COLUMN_COMMENTS, **column_comments}
        op.execute(f"""
            DO $$ DECLARE c record; BEGIN
              FOR c IN SELECT attname FROM pg_attribute
                        WHERE attrelid = 'inventory.{name}'::regclass AND attnum > 0 LOOP
                EXECUTE format('COMMENT ON COLUMN inventory.{name}.%I IS %L', c.attname,
                  ({_sql_map(columns)})->>c.attname);
              END LOOP;
            END $$""")

    op.execute(
        "CREATE AGGREGATE inventory.jsonb_merge_agg(jsonb) "
        "(SFUNC = jsonb_concat, STYPE = jsonb, INITCOND = '{}')"
    )
    op.execute(
        "COMMENT ON AGGREGATE inventory.jsonb_merge_agg(jsonb) IS "
        "'Merges jsonb objects left to right (later keys win); used by images_as_of.'"
    )
    returns = ", ".join(f"{n} {t}" for n, t in AS_OF_COLUMNS)
    op.execute(f"""
        CREATE FUNCTION inventory.images_as_of(ts timestamptz)
        RETURNS TABLE ({returns})
        LANGUAGE sql STABLE AS $fn$
{AS_OF_QUERY}
        $fn$""")
    op.execute(
        "COMMENT ON FUNCTION inventory.images_as_of(timestamptz) IS "
        "'The catalogue as it stood at ts, rebuilt from image_events: one row per image "
        "listed then, with its disks and unknown API fields (extra) as jsonb.'"
    )

    op.execute("""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'inventory_reader') THEN
            CREATE ROLE inventory_reader NOLOGIN;
          END IF;
        END $$""")
    op.execute("GRANT USAGE ON SCHEMA inventory TO inventory_reader")
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA inventory TO inventory_reader")
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA inventory GRANT SELECT ON TABLES TO inventory_reader"
    )
    op.execute("GRANT EXECUTE ON FUNCTION inventory.images_as_of(timestamptz) TO inventory_reader")
    op.execute(
        "COMMENT ON SCHEMA inventory IS 'JD Cloud VM image catalogue and its history, "
        "kept by jdcloud-image-sync. Read the views; see docs/schema.md.'"
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_map(mapping: dict[str, str]) -> str:
    pairs = ", ".join(f"{_literal(k)}, {_literal(v)}" for k, v in mapping.items())
    return f"jsonb_build_object({pairs})"


def downgrade() -> None:
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA inventory REVOKE SELECT ON TABLES FROM inventory_reader"
    )
    op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA inventory FROM inventory_reader")
    op.execute("REVOKE ALL ON SCHEMA inventory FROM inventory_reader")
    op.execute("DROP FUNCTION inventory.images_as_of(timestamptz)")
    op.execute("DROP AGGREGATE inventory.jsonb_merge_agg(jsonb)")
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW inventory.{name}")
    # The role is cluster-wide and may serve other databases: drop it only when unused.
    op.execute("""
        DO $$ BEGIN
          DROP ROLE IF EXISTS inventory_reader;
        EXCEPTION WHEN dependent_objects_still_exist THEN NULL;
        END $$""")
