"""The ``inventory`` schema as SQLAlchemy Core tables: one MetaData for code and Alembic.

Every table and column carries a comment; Alembic copies them into PostgreSQL as
``COMMENT ON``, and ``docs/schema.md`` is generated from the live database.
Views, functions and roles live in migrations (``migrations/versions``) as SQL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from service.normalize import TRACKED_FIELDS
from service.vocabulary import EVENT_TYPES, PARTITION_STATUSES, RUN_STATUSES

SCHEMA = "inventory"

metadata = MetaData(
    schema=SCHEMA,
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    },
)

ACCESS_SOURCES = ("private", "shared")
"""Sources whose images an account sees as its own or shared with it (image_access)."""


def _tz(name: str, comment: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable, comment=comment)


def _count(name: str, comment: str) -> Column[object]:
    """A non-null integer counter starting at 0."""
    return Column(name, Integer, nullable=False, server_default="0", comment=comment)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


images = Table(
    "images",
    metadata,
    Column("region_id", Text, nullable=False, comment="JD Cloud region, e.g. cn-north-1."),
    Column("image_id", Text, nullable=False, comment="API imageId, e.g. img-m5s0abcd29."),
    Column(
        "image_source",
        Text,
        nullable=False,
        comment="Listing the image was found in: public, thirdparty, private, shared, "
        "community. An image seen through accounts is private while a configured account "
        "lists it as private, else shared.",
    ),
    Column("name", Text, comment="API name."),
    Column("platform", Text, comment="API platform: Ubuntu, CentOS, Windows Server, ..."),
    Column("os_version", Text, comment="API osVersion, e.g. 8.2."),
    Column("architecture", Text, comment="API architecture: x86_64, arm64 or i386."),
    Column("os_type", Text, comment="API osType: linux or windows."),
    Column("status", Text, comment="API status, e.g. ready, creating, error."),
    Column("description", Text, comment="API desc."),
    Column("owner_pin", Text, comment="API ownerPin: the owner's user PIN."),
    Column(
        "launch_permission", Text, comment="API launchPermission: all, specifiedUsers, ownerOnly."
    ),
    Column("root_device_type", Text, comment="API rootDeviceType: cloudDisk or localDisk."),
    Column(
        "snapshot_id", Text, comment="API snapshotId of the cloud system disk (null for local)."
    ),
    Column(
        "boot_mode",
        Text,
        comment="API bootMode when given; else 'uefi'/'bios' from uefiSupport; null if neither.",
    ),
    Column("system_disk_size_gb", Integer, comment="API systemDiskSizeGB, GiB."),
    Column("size_mb", Integer, comment="API sizeMB: actual image file size, MB."),
    Column("progress", Integer, comment="API progress, percent (the API sends a string)."),
    _tz("created_at", "API createTime, read as Beijing time (UTC+8)."),
    Column(
        "offline",
        Boolean,
        comment="API offline: true when taken offline; null where the API gives none.",
    ),
    Column(
        "raw", JSONB, nullable=False, comment="The API object as received, unknown fields kept."
    ),
    Column(
        "content_hash",
        LargeBinary,
        nullable=False,
        comment="BLAKE2b-128 of the API object and its source; equal hash = unchanged image.",
    ),
    _tz("first_seen_at", "When this service first listed the image.", nullable=False),
    _tz("last_changed_at", "When the row last changed (a new API content hash).", nullable=False),
    _tz("removed_at", "When a complete listing last missed the image; null while listed."),
    *(
        Column(name, type_, comment=comment)
        for name, type_, comment in (
            ("login_name", Text, "API loginName: the owner's cloud account name."),
            ("imported", Boolean, "API imported: true when the image was imported."),
            ("expired_at", DateTime(timezone=True), "API expiredTime (Beijing time); null: never."),
            ("instance_id", Text, "API instanceId: the instance the image was made from."),
            ("charge_service_code", Text, "API chargeInfo.serviceCode (billing resource type)."),
            ("charge_formula", JSONB, "API chargeInfo.formula (billing items), as received."),
            (
                "shared_with",
                ARRAY(Text),
                "describeImageMembers pins, sorted, for private images shared with specified "
                "users; null when not fetched or not applicable.",
            ),
            (
                "instance_types_constraint",
                Text,
                "describeImageConstraintsBatch constraintsType: includes, excludes; null: none.",
            ),
            (
                "instance_types",
                ARRAY(Text),
                "describeImageConstraintsBatch instanceTypes the constraint lists; null: none.",
            ),
        )
    ),
    PrimaryKeyConstraint("region_id", "image_id"),
    Index(None, "region_id", "image_source"),
    comment="Every image ever listed, one row per (region_id, image_id); "
    "removed_at is set while it is gone.",
)

image_disks = Table(
    "image_disks",
    metadata,
    Column("region_id", Text, nullable=False, comment="Region of the image."),
    Column("image_id", Text, nullable=False, comment="The image the disk belongs to."),
    Column(
        "position",
        SmallInteger,
        nullable=False,
        comment="0 = system disk; 1..n = data disks in API order.",
    ),
    Column("role", Text, nullable=False, comment="system or data."),
    Column("device_name", Text, comment="API deviceName, e.g. vda, vdb."),
    Column("disk_category", Text, comment="API diskCategory: local or cloud."),
    Column("auto_delete", Boolean, comment="API autoDelete: deleted with the instance."),
    Column("cloud_disk_type", Text, comment="cloudDisk.diskType: ssd.gp1, ssd.io1, hdd.std1."),
    Column("cloud_disk_size_gb", Integer, comment="cloudDisk.diskSizeGB, GiB."),
    Column("cloud_iops", Integer, comment="cloudDisk.iops."),
    Column("cloud_snapshot_id", Text, comment="cloudDisk.snapshotId."),
    Column("cloud_encrypted", Boolean, comment="cloudDisk.encrypted."),
    Column("local_disk_type", Text, comment="localDisk.diskType."),
    Column("local_disk_size_gb", Integer, comment="localDisk.diskSizeGB, GiB."),
    PrimaryKeyConstraint("region_id", "image_id", "position"),
    ForeignKeyConstraint(
        ["region_id", "image_id"],
        ["inventory.images.region_id", "inventory.images.image_id"],
        ondelete="CASCADE",
    ),
    CheckConstraint(_in("role", ("system", "data")), name="role"),
    comment="System and data disks of each image as the API last described them.",
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("run_id", BigInteger, Identity(), nullable=False, comment="Run identifier."),
    _tz("started_at", "When the run started.", nullable=False),
    _tz("finished_at", "When the run ended; null while running."),
    Column(
        "status",
        Text,
        nullable=False,
        comment="running, succeeded, partial (some partitions failed), failed, "
        "abandoned (its process died).",
    ),
    Column("trigger", Text, nullable=False, comment="What started it: cli, schedule, demo, bench."),
    Column("host", Text, nullable=False, comment="Host name of the process."),
    Column("pid", Integer, nullable=False, comment="Process id on that host."),
    _count("partitions", "Partitions tried."),
    _count("partitions_failed", "Partitions failed or incomplete."),
    _count("api_requests", "describeImages requests sent."),
    _count("retries", "Requests retried."),
    _count("images_seen", "Distinct images listed."),
    _count("created", "created events."),
    _count("updated", "updated events."),
    _count("went_offline", "went_offline events."),
    _count("came_online", "came_online events."),
    _count("removed", "removed events."),
    _count("reappeared", "reappeared events."),
    _count("access_granted", "access_granted events (an account gained an existing image)."),
    _count("access_revoked", "access_revoked events (an account lost an image another lists)."),
    Column("error_message", Text, comment="Why the run failed, when it did."),
    PrimaryKeyConstraint("run_id"),
    CheckConstraint(_in("status", RUN_STATUSES), name="status"),
    Index(None, "started_at"),
    comment="One row per sync run (a CLI sync or a scheduler tick).",
)

sync_partitions = Table(
    "sync_partitions",
    metadata,
    Column("run_id", BigInteger, nullable=False, comment="The run this outcome belongs to."),
    Column("region_id", Text, nullable=False, comment="Partition region."),
    Column("image_source", Text, nullable=False, comment="Partition image source."),
    Column(
        "status",
        Text,
        nullable=False,
        comment="succeeded, incomplete (listing never settled), failed, "
        "skipped_locked (another process held it).",
    ),
    _tz("started_at", "When the partition started.", nullable=False),
    _tz("finished_at", "When the partition ended.", nullable=False),
    _count("pages", "Pages read."),
    _count("api_requests", "Requests sent, retries included."),
    _count("retries", "Requests retried."),
    Column("total_count", Integer, comment="Sum of the listings' totalCount."),
    _count("images_seen", "Distinct images listed."),
    _count("created", "created events."),
    _count("updated", "updated events."),
    _count("unchanged", "Listed images with no change."),
    _count("went_offline", "went_offline events."),
    _count("came_online", "came_online events."),
    _count("removed", "removed events."),
    _count("reappeared", "reappeared events."),
    _count("access_granted", "access_granted events (an account gained an existing image)."),
    _count("access_revoked", "access_revoked events (an account lost an image another lists)."),
    _count("invalid_items", "API items rejected at validation (missing imageId, wrong types)."),
    Column(
        "error_status", Text, comment="API error.status (e.g. QUOTA_EXCEEDED) or an internal kind."
    ),
    Column("error_message", Text, comment="Why the partition failed or was incomplete."),
    Column(
        "account",
        Text,
        comment="The account of an account partition (private, shared); null for a "
        "catalogue partition (public, thirdparty, community).",
    ),
    ForeignKeyConstraint(["run_id"], ["inventory.sync_runs.run_id"], ondelete="CASCADE"),
    CheckConstraint(_in("status", PARTITION_STATUSES), name="status"),
    Index(None, "region_id", "image_source", "finished_at"),
    # One row per partition identity (account, region, source) and run; the account is
    # null for catalogue partitions, hence an index on an expression, not a primary key.
    Index(
        "uq_sync_partitions_identity",
        "run_id",
        "region_id",
        "image_source",
        text("coalesce(account, '')"),
        unique=True,
    ),
    comment="Outcome of each partition (account, region, source) in each run; freshness "
    "lives here.",
)

image_events = Table(
    "image_events",
    metadata,
    Column(
        "event_id",
        BigInteger,
        Identity(),
        nullable=False,
        comment="Increasing event number; orders events.",
    ),
    _tz("occurred_at", "When the sync recorded the change (its transaction time).", nullable=False),
    Column("sync_run_id", BigInteger, nullable=False, comment="The run that recorded it."),
    Column("region_id", Text, nullable=False, comment="Region of the image."),
    Column("image_id", Text, nullable=False, comment="The image."),
    Column("image_source", Text, nullable=False, comment="Source partition of the image."),
    Column(
        "event_type",
        Text,
        nullable=False,
        comment="created, updated, went_offline, came_online, removed, reappeared, "
        "access_granted (an account lists an image another account already listed), "
        "access_revoked (an account's complete listing lost an image another still lists).",
    ),
    Column(
        "changed_fields",
        ARRAY(Text),
        nullable=False,
        server_default=text("'{}'::text[]"),
        comment="Fields that changed (updated, reappeared), or the fields of the transition.",
    ),
    Column(
        "before",
        JSONB,
        comment="Values before: the changed fields (updated, transitions); "
        "the whole image (removed).",
    ),
    Column(
        "after",
        JSONB,
        comment="Values after: the changed fields (updated, transitions); "
        "the whole image (created, reappeared).",
    ),
    PrimaryKeyConstraint("event_id"),
    ForeignKeyConstraint(["sync_run_id"], ["inventory.sync_runs.run_id"]),
    CheckConstraint(_in("event_type", EVENT_TYPES), name="event_type"),
    Column(
        "baseline",
        Boolean,
        nullable=False,
        server_default=text("false"),
        comment="True for events of the first successful sync of the partition (the initial "
        "load: the image existed before the service watched it); false otherwise.",
    ),
    Column(
        "account",
        Text,
        comment="The account whose listing produced the event; null for catalogue partitions.",
    ),
    Index(None, "region_id", "image_id", "event_id"),
    Index(None, "occurred_at"),
    Index(None, "sync_run_id"),
    comment="Append-only history of every change to images, in event_id order.",
)

# -- versions (migration 0007): range-partitioned on valid_to into image_versions_current
# (valid_to infinity) and image_versions_closed, each hash-partitioned on (region_id,
# image_source) into <name>_0 .. _15 (migrations 0009 and 0010); the partitions are
# created there.

VERSION_BUCKETS = 16
VERSION_PARTITIONS = tuple(
    name
    for half in ("image_versions_current", "image_versions_closed")
    for name in (half, *(f"{half}_{n}" for n in range(VERSION_BUCKETS)))
)
_VERSION_COMMENTS = {
    "disks": "The image's disks in the period, as images_as_of returns them.",
    "extra": "Unknown API fields in the period (raw minus the documented fields).",
}

image_versions = Table(
    "image_versions",
    metadata,
    Column("region_id", Text, nullable=False, comment="Region of the image."),
    Column("image_id", Text, nullable=False, comment="Image id."),
    _tz(
        "valid_from",
        "Start of the period: the moment (occurred_at) of the change that made this version.",
        nullable=False,
    ),
    _tz(
        "valid_to",
        "End of the period, exclusive: the moment of the next change or the removal; "
        "infinity while current.",
        nullable=False,
    ),
    *(
        Column(
            name,
            JSONB if name in ("disks", "extra") else images.c[name].type,
            comment=_VERSION_COMMENTS.get(name, f"images.{name} in the period."),
        )
        for name in TRACKED_FIELDS  # the columns of images_as_of after the key
    ),
    # image_source: a unique key of a partitioned table holds its partition keys (0009).
    PrimaryKeyConstraint("region_id", "image_id", "image_source", "valid_to"),
    CheckConstraint("valid_from < valid_to", name="period"),
    Index(None, "region_id", "image_source", "valid_to"),
    Index(None, "valid_to"),
    postgresql_partition_by="RANGE (valid_to)",
    comment="Every version of each image (SCD2): one row per period in which it was listed "
    "unchanged (valid_from <= t < valid_to; valid_to infinity while current), with the "
    "columns of images_as_of. Written by the merge in the partition's transaction; read "
    "through images_as_of(ts).",
)

partitions = Table(
    "partitions",
    metadata,
    Column("region_id", Text, nullable=False, comment="Partition region."),
    Column("image_source", Text, nullable=False, comment="Partition image source."),
    Column(
        "configured",
        Boolean,
        nullable=False,
        comment="True when the configuration of the latest `run` / `sync --once` start "
        "(IMAGE_SYNC_REGIONS x IMAGE_SYNC_SOURCES) includes the partition.",
    ),
    _tz("first_configured_at", "When a start first had the partition configured.", nullable=False),
    _tz("last_configured_at", "When a start last had the partition configured.", nullable=False),
    _tz("unconfigured_at", "When a start last left the partition out; null while configured."),
    Column(
        "account",
        Text,
        comment="The account of an account partition; null for a catalogue partition.",
    ),
    Index(
        "uq_partitions_identity",
        "region_id",
        "image_source",
        text("coalesce(account, '')"),
        unique=True,
    ),
    comment="Registry of configured partitions (account, region, source), written when "
    "`image-sync run` or a `sync --once` without --region/--source starts; health views "
    "show these.",
)

# -- accounts (migration 0006) -----------------------------------------------------------

accounts = Table(
    "accounts",
    metadata,
    Column(
        "account",
        Text,
        nullable=False,
        comment="The account's name, as the configuration gives it ([[accounts]] name, or "
        "IMAGE_SYNC_ACCOUNT).",
    ),
    Column("role_jrn", Text, comment="The STS role assumed for it; null for a key pair."),
    Column(
        "regions",
        ARRAY(Text),
        nullable=False,
        comment="The regions the latest start configured for it.",
    ),
    Column(
        "configured",
        Boolean,
        nullable=False,
        server_default=text("true"),
        comment="True while the configuration of the latest start has the account; an "
        "account removed from it keeps its rows.",
    ),
    _tz("first_configured_at", "When a start first had the account configured.", nullable=False),
    _tz("last_configured_at", "When a start last had the account configured.", nullable=False),
    PrimaryKeyConstraint("account"),
    comment="The configured JD Cloud accounts, written from the configuration at start.",
)

image_access = Table(
    "image_access",
    metadata,
    Column("account", Text, nullable=False, comment="The account (inventory.accounts)."),
    Column("region_id", Text, nullable=False, comment="Region of the image."),
    Column("image_id", Text, nullable=False, comment="The image (inventory.images)."),
    Column(
        "image_source",
        Text,
        nullable=False,
        comment="private (the account owns it) or shared (shared with it), as that account "
        "lists it.",
    ),
    _tz("first_seen_at", "When a listing of this account first had the image.", nullable=False),
    _tz(
        "removed_at",
        "When a complete listing of this account last lost the image (access revoked or "
        "image removed); null while the account lists it.",
    ),
    PrimaryKeyConstraint("account", "region_id", "image_id"),
    ForeignKeyConstraint(
        ["region_id", "image_id"],
        ["inventory.images.region_id", "inventory.images.image_id"],
    ),
    CheckConstraint(_in("image_source", ACCESS_SOURCES), name="image_source"),
    Index(None, "region_id", "image_id"),
    comment="Which account can use which private or shared image: one row per (account, "
    "image); an image stored once in images has one row here per account that sees it.",
)

# -- change feed (migration 0005) --------------------------------------------------------

FEED_POSITION_BITS = 24
"""An event's feed cursor is ``batch << 24 | position``: ``batch`` numbers the commits
that recorded events (``change_batches.batch``), ``position`` (1-based) the event within
its commit. A cursor ending in 24 zero bits stands before its batch."""

feed_clock = Table(
    "feed_clock",
    metadata,
    Column(
        "singleton",
        Boolean,
        nullable=False,
        server_default=text("true"),
        comment="Always true: the table has exactly one row.",
    ),
    Column(
        "batch",
        BigInteger,
        nullable=False,
        server_default="0",
        comment="Number of the last commit that recorded events. Incremented by each such "
        "commit as its last statement; the row lock held to commit orders the commits.",
    ),
    PrimaryKeyConstraint("singleton"),
    CheckConstraint("singleton", name="singleton"),
    comment="The change feed's commit counter (one row); see docs/queries.md, Change feed.",
)

change_batches = Table(
    "change_batches",
    metadata,
    Column(
        "batch",
        BigInteger,
        nullable=False,
        comment="Commit number from feed_clock: batches become visible in this order.",
    ),
    _tz(
        "committed_at",
        "When the batch took its number (moments before its commit).",
        nullable=False,
    ),
    Column("run_id", BigInteger, nullable=False, comment="The sync run that recorded it."),
    Column("region_id", Text, nullable=False, comment="Partition region."),
    Column("image_source", Text, nullable=False, comment="Partition image source."),
    Column("event_count", Integer, nullable=False, comment="Number of events in the batch."),
    Column(
        "event_ids",
        ARRAY(BigInteger),
        nullable=False,
        comment="image_events.event_id of the batch's events, in event_id order; an "
        "event's position in the feed is its 1-based index here.",
    ),
    Column(
        "account",
        Text,
        comment="Account of the partition whose commit this is (image_events.account); "
        "NULL for a catalogue partition (migration 0007; back-filled from the events).",
    ),
    PrimaryKeyConstraint("batch"),
    comment="One row per committed partition transaction that recorded events: the "
    "commit-ordered batches read by changes_since().",
)

webhook_cursors = Table(
    "webhook_cursors",
    metadata,
    Column(
        "subscriber",
        Text,
        nullable=False,
        comment="Stable subscriber name: the [[webhooks]] name, or url- and a hash of the "
        "URL without credentials.",
    ),
    Column("url", Text, nullable=False, comment="The webhook URL, credentials removed."),
    Column(
        "cursor",
        BigInteger,
        nullable=False,
        comment="Feed cursor of the last event the subscriber acknowledged (2xx).",
    ),
    _tz("created_at", "When the subscriber was first seen.", nullable=False),
    _tz("delivered_at", "When a batch was last acknowledged."),
    _tz("attempted_at", "When a delivery was last attempted."),
    Column(
        "failing",
        Boolean,
        nullable=False,
        server_default=text("false"),
        comment="True after a delivery failed all its attempts, until one succeeds.",
    ),
    _count("failures", "Deliveries that failed all their attempts since the last success."),
    Column("last_error", Text, comment="Why the last failed delivery failed (no secrets)."),
    PrimaryKeyConstraint("subscriber"),
    comment="Per webhook subscriber: how far it has acknowledged the change feed.",
)
