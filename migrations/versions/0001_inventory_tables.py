"""inventory schema v1: tables

Revision ID: 0001
Revises:
Create Date: 2026-11-26 18:38:52.598417
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "images",
        sa.Column(
            "region_id", sa.Text(), nullable=False, comment="JD Cloud region, e.g. cn-north-1."
        ),
        sa.Column(
            "image_id", sa.Text(), nullable=False, comment="API imageId, e.g. img-m5s0abcd29."
        ),
        sa.Column(
            "image_source",
            sa.Text(),
            nullable=False,
            comment="Listing the image was found in: public, thirdparty, private, shared, community.",
        ),
        sa.Column("name", sa.Text(), nullable=True, comment="API name."),
        sa.Column(
            "platform",
            sa.Text(),
            nullable=True,
            comment="API platform: Ubuntu, CentOS, Windows Server, ...",
        ),
        sa.Column("os_version", sa.Text(), nullable=True, comment="API osVersion, e.g. 8.2."),
        sa.Column(
            "architecture", sa.Text(), nullable=True, comment="API architecture: x86_64 or i386."
        ),
        sa.Column("os_type", sa.Text(), nullable=True, comment="API osType: linux or windows."),
        sa.Column(
            "status", sa.Text(), nullable=True, comment="API status, e.g. ready, creating, error."
        ),
        sa.Column("description", sa.Text(), nullable=True, comment="API desc."),
        sa.Column(
            "owner_pin", sa.Text(), nullable=True, comment="API ownerPin: the owner's user PIN."
        ),
        sa.Column(
            "launch_permission",
            sa.Text(),
            nullable=True,
            comment="API launchPermission: all, specifiedUsers, ownerOnly.",
        ),
        sa.Column(
            "root_device_type",
            sa.Text(),
            nullable=True,
            comment="API rootDeviceType: cloudDisk or localDisk.",
        ),
        sa.Column(
            "snapshot_id",
            sa.Text(),
            nullable=True,
            comment="API snapshotId of the cloud system disk (null for local).",
        ),
        sa.Column(
            "boot_mode",
            sa.Text(),
            nullable=True,
            comment="API bootMode when given; else 'uefi'/'bios' from uefiSupport; null if neither.",
        ),
        sa.Column(
            "system_disk_size_gb", sa.Integer(), nullable=True, comment="API systemDiskSizeGB, GiB."
        ),
        sa.Column(
            "size_mb",
            sa.Integer(),
            nullable=True,
            comment="API sizeMB: actual image file size, MB.",
        ),
        sa.Column(
            "progress",
            sa.Integer(),
            nullable=True,
            comment="API progress, percent (the API sends a string).",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="API createTime, read as Beijing time (UTC+8).",
        ),
        sa.Column(
            "offline",
            sa.Boolean(),
            nullable=True,
            comment="API offline: true when taken offline; null where the API gives none.",
        ),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="The API object as received, unknown fields kept.",
        ),
        sa.Column(
            "content_hash",
            sa.LargeBinary(),
            nullable=False,
            comment="BLAKE2b-128 of the API object and its source; equal hash = unchanged image.",
        ),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When this service first listed the image.",
        ),
        sa.Column(
            "last_changed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the row last changed (a new API content hash).",
        ),
        sa.Column(
            "removed_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When a complete listing last missed the image; null while listed.",
        ),
        sa.PrimaryKeyConstraint("region_id", "image_id", name=op.f("pk_images")),
        schema="inventory",
        comment="Every image ever listed, one row per (region_id, image_id); removed_at is set while it is gone.",
    )
    op.create_index(
        op.f("ix_images_region_id_image_source"),
        "images",
        ["region_id", "image_source"],
        unique=False,
        schema="inventory",
    )
    op.create_table(
        "sync_runs",
        sa.Column(
            "run_id",
            sa.BigInteger(),
            sa.Identity(always=False),
            nullable=False,
            comment="Run identifier.",
        ),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the run started.",
        ),
        sa.Column(
            "finished_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When the run ended; null while running.",
        ),
        sa.Column(
            "status",
            sa.Text(),
            nullable=False,
            comment="running, succeeded, partial (some partitions failed), failed, abandoned (its process died).",
        ),
        sa.Column(
            "trigger",
            sa.Text(),
            nullable=False,
            comment="What started it: cli, schedule, demo, bench.",
        ),
        sa.Column("host", sa.Text(), nullable=False, comment="Host name of the process."),
        sa.Column("pid", sa.Integer(), nullable=False, comment="Process id on that host."),
        sa.Column(
            "partitions",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Partitions tried.",
        ),
        sa.Column(
            "partitions_failed",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Partitions failed or incomplete.",
        ),
        sa.Column(
            "api_requests",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="describeImages requests sent.",
        ),
        sa.Column(
            "retries", sa.Integer(), server_default="0", nullable=False, comment="Requests retried."
        ),
        sa.Column(
            "images_seen",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Distinct images listed.",
        ),
        sa.Column(
            "created", sa.Integer(), server_default="0", nullable=False, comment="created events."
        ),
        sa.Column(
            "updated", sa.Integer(), server_default="0", nullable=False, comment="updated events."
        ),
        sa.Column(
            "went_offline",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="went_offline events.",
        ),
        sa.Column(
            "came_online",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="came_online events.",
        ),
        sa.Column(
            "removed", sa.Integer(), server_default="0", nullable=False, comment="removed events."
        ),
        sa.Column(
            "reappeared",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="reappeared events.",
        ),
        sa.Column(
            "error_message", sa.Text(), nullable=True, comment="Why the run failed, when it did."
        ),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'partial', 'failed', 'abandoned')",
            name=op.f("ck_sync_runs_status"),
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_sync_runs")),
        schema="inventory",
        comment="One row per sync run (a CLI sync or a scheduler tick).",
    )
    op.create_index(
        op.f("ix_sync_runs_started_at"),
        "sync_runs",
        ["started_at"],
        unique=False,
        schema="inventory",
    )
    op.create_table(
        "image_disks",
        sa.Column("region_id", sa.Text(), nullable=False, comment="Region of the image."),
        sa.Column("image_id", sa.Text(), nullable=False, comment="The image the disk belongs to."),
        sa.Column(
            "position",
            sa.SmallInteger(),
            nullable=False,
            comment="0 = system disk; 1..n = data disks in API order.",
        ),
        sa.Column("role", sa.Text(), nullable=False, comment="system or data."),
        sa.Column(
            "device_name", sa.Text(), nullable=True, comment="API deviceName, e.g. vda, vdb."
        ),
        sa.Column(
            "disk_category", sa.Text(), nullable=True, comment="API diskCategory: local or cloud."
        ),
        sa.Column(
            "auto_delete",
            sa.Boolean(),
            nullable=True,
            comment="API autoDelete: deleted with the instance.",
        ),
        sa.Column(
            "cloud_disk_type",
            sa.Text(),
            nullable=True,
            comment="cloudDisk.diskType: ssd.gp1, ssd.io1, hdd.std1.",
        ),
        sa.Column(
            "cloud_disk_size_gb", sa.Integer(), nullable=True, comment="cloudDisk.diskSizeGB, GiB."
        ),
        sa.Column("cloud_iops", sa.Integer(), nullable=True, comment="cloudDisk.iops."),
        sa.Column("cloud_snapshot_id", sa.Text(), nullable=True, comment="cloudDisk.snapshotId."),
        sa.Column("cloud_encrypted", sa.Boolean(), nullable=True, comment="cloudDisk.encrypted."),
        sa.Column("local_disk_type", sa.Text(), nullable=True, comment="localDisk.diskType."),
        sa.Column(
            "local_disk_size_gb", sa.Integer(), nullable=True, comment="localDisk.diskSizeGB, GiB."
        ),
        sa.CheckConstraint("role IN ('system', 'data')", name=op.f("ck_image_disks_role")),
        sa.ForeignKeyConstraint(
            ["region_id", "image_id"],
            ["inventory.images.region_id", "inventory.images.image_id"],
            name=op.f("fk_image_disks_region_id_image_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("region_id", "image_id", "position", name=op.f("pk_image_disks")),
        schema="inventory",
        comment="System and data disks of each image as the API last described them.",
    )
    op.create_table(
        "image_events",
        sa.Column(
            "event_id",
            sa.BigInteger(),
            sa.Identity(always=False),
            nullable=False,
            comment="Increasing event number; orders events.",
        ),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the sync recorded the change (its transaction time).",
        ),
        sa.Column(
            "sync_run_id", sa.BigInteger(), nullable=False, comment="The run that recorded it."
        ),
        sa.Column("region_id", sa.Text(), nullable=False, comment="Region of the image."),
        sa.Column("image_id", sa.Text(), nullable=False, comment="The image."),
        sa.Column(
            "image_source", sa.Text(), nullable=False, comment="Source partition of the image."
        ),
        sa.Column(
            "event_type",
            sa.Text(),
            nullable=False,
            comment="created, updated, went_offline, came_online, removed, reappeared.",
        ),
        sa.Column(
            "changed_fields",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
            comment="Fields that changed (updated, reappeared), or the fields of the transition.",
        ),
        sa.Column(
            "before",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="Values before: the changed fields (updated, transitions); the whole image (removed).",
        ),
        sa.Column(
            "after",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="Values after: the changed fields (updated, transitions); the whole image (created, reappeared).",
        ),
        sa.CheckConstraint(
            "event_type IN ('created', 'updated', 'went_offline', 'came_online', 'removed', 'reappeared')",
            name=op.f("ck_image_events_event_type"),
        ),
        sa.ForeignKeyConstraint(
            ["sync_run_id"],
            ["inventory.sync_runs.run_id"],
            name=op.f("fk_image_events_sync_run_id"),
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_image_events")),
        schema="inventory",
        comment="Append-only history of every change to images, in event_id order.",
    )
    op.create_index(
        op.f("ix_image_events_occurred_at"),
        "image_events",
        ["occurred_at"],
        unique=False,
        schema="inventory",
    )
    op.create_index(
        op.f("ix_image_events_region_id_image_id_event_id"),
        "image_events",
        ["region_id", "image_id", "event_id"],
        unique=False,
        schema="inventory",
    )
    op.create_index(
        op.f("ix_image_events_sync_run_id"),
        "image_events",
        ["sync_run_id"],
        unique=False,
        schema="inventory",
    )
    op.create_table(
        "sync_partitions",
        sa.Column(
            "run_id", sa.BigInteger(), nullable=False, comment="The run this outcome belongs to."
        ),
        sa.Column("region_id", sa.Text(), nullable=False, comment="Partition region."),
        sa.Column("image_source", sa.Text(), nullable=False, comment="Partition image source."),
        sa.Column(
            "status",
            sa.Text(),
            nullable=False,
            comment="succeeded, incomplete (listing never settled), failed, skipped_locked (another process held it).",
        ),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the partition started.",
        ),
        sa.Column(
            "finished_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the partition ended.",
        ),
        sa.Column("pages", sa.Integer(), server_default="0", nullable=False, comment="Pages read."),
        sa.Column(
            "api_requests",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Requests sent, retries included.",
        ),
        sa.Column(
            "retries", sa.Integer(), server_default="0", nullable=False, comment="Requests retried."
        ),
        sa.Column(
            "total_count", sa.Integer(), nullable=True, comment="Sum of the listings' totalCount."
        ),
        sa.Column(
            "images_seen",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Distinct images listed.",
        ),
        sa.Column(
            "created", sa.Integer(), server_default="0", nullable=False, comment="created events."
        ),
        sa.Column(
            "updated", sa.Integer(), server_default="0", nullable=False, comment="updated events."
        ),
        sa.Column(
            "unchanged",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Listed images with no change.",
        ),
        sa.Column(
            "went_offline",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="went_offline events.",
        ),
        sa.Column(
            "came_online",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="came_online events.",
        ),
        sa.Column(
            "removed", sa.Integer(), server_default="0", nullable=False, comment="removed events."
        ),
        sa.Column(
            "reappeared",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="reappeared events.",
        ),
        sa.Column(
            "invalid_items",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="API items rejected at validation (missing imageId, wrong types).",
        ),
        sa.Column(
            "error_status",
            sa.Text(),
            nullable=True,
            comment="API error.status (e.g. QUOTA_EXCEEDED) or an internal kind.",
        ),
        sa.Column(
            "error_message",
            sa.Text(),
            nullable=True,
            comment="Why the partition failed or was incomplete.",
        ),
        sa.CheckConstraint(
            "status IN ('succeeded', 'incomplete', 'failed', 'skipped_locked')",
            name=op.f("ck_sync_partitions_status"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["inventory.sync_runs.run_id"],
            name=op.f("fk_sync_partitions_run_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "region_id", "image_source", name=op.f("pk_sync_partitions")
        ),
        schema="inventory",
        comment="Outcome of each (region, source) partition in each run; freshness lives here.",
    )
    op.create_index(
        op.f("ix_sync_partitions_region_id_image_source_finished_at"),
        "sync_partitions",
        ["region_id", "image_source", "finished_at"],
        unique=False,
        schema="inventory",
    )


def downgrade() -> None:

    op.drop_index(
        op.f("ix_sync_partitions_region_id_image_source_finished_at"),
        table_name="sync_partitions",
        schema="inventory",
    )
    op.drop_table("sync_partitions", schema="inventory")
    op.drop_index(
        op.f("ix_image_events_sync_run_id"), table_name="image_events", schema="inventory"
    )
    op.drop_index(
        op.f("ix_image_events_region_id_image_id_event_id"),
        table_name="image_events",
        schema="inventory",
    )
    op.drop_index(
        op.f("ix_image_events_occurred_at"), table_name="image_events", schema="inventory"
    )
    op.drop_table("image_events", schema="inventory")
    op.drop_table("image_disks", schema="inventory")
    op.drop_index(op.f("ix_sync_runs_started_at"), table_name="sync_runs", schema="inventory")
    op.drop_table("sync_runs", schema="inventory")
    op.drop_index(op.f("ix_images_region_id_image_source"), table_name="images", schema="inventory")
    op.drop_table("images", schema="inventory")
