"""Migration 0004 on a database populated under the old schema (0002): back-filled from
``raw``, the next sync of the unchanged catalogue rewrites no row and records no event,
and the old history still replays to the current state."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.check import check_invariants
from service.normalize import normalize_image
from service.simulator import running_simulator
from service.simulator.catalogue import Catalogue
from service.store import migrate
from service.sync import sync_once
from tests.fault_helpers import row_versions

BEIJING = timezone(timedelta(hours=8))
# The columns of inventory.images and the fields of KNOWN_FIELDS as revision 0002 had them.
OLD_COLUMNS = (
    "region_id", "image_id", "image_source", "name", "platform", "os_version", "architecture",
    "os_type", "status", "description", "owner_pin", "launch_permission", "root_device_type",
    "snapshot_id", "boot_mode", "system_disk_size_gb", "size_mb", "progress", "created_at",
    "offline",
)  # fmt: skip
OLD_KNOWN = (
    "imageId", "name", "platform", "osVersion", "architecture", "systemDiskSizeGB",
    "imageSource", "osType", "status", "createTime", "sizeMB", "desc", "ownerPin",
    "launchPermission", "systemDisk", "dataDisks", "snapshotId", "rootDeviceType",
    "progress", "offline", "bootMode",
)  # fmt: skip
DISK_COLUMNS = (
    "position", "role", "device_name", "disk_category", "auto_delete", "cloud_disk_type",
    "cloud_disk_size_gb", "cloud_iops", "cloud_snapshot_id", "cloud_encrypted",
    "local_disk_type", "local_disk_size_gb",
)  # fmt: skip
SOURCES = ("shared", "community")
"""Sources without shares or constraints: nothing but describeImages to compare."""


def catalogue_with_full_records() -> Catalogue:
    """A catalogue whose images carry the fields 0002 kept only in raw, in every shape."""
    catalogue = Catalogue(seed=11, images=60, regions=("cn-north-1",), sources=SOURCES)
    for index, image in enumerate(catalogue.images("cn-north-1", "shared")):
        fields: dict[str, Any] = {"loginName": f"account-{index}", "instanceId": f"i-{index:08d}"}
        if index % 2:
            fields["imported"] = index % 4 == 1
            fields["expiredTime"] = "" if index % 3 else "2027-06-30 23:59:59"
        if index % 3 == 0:
            formula = [{"item": "image", "price": index}] if index % 2 else "per-hour"
            fields["chargeInfo"] = {"serviceCode": "vm", "formula": formula}
        catalogue.modify("cn-north-1", image["imageId"], **fields)
    return catalogue


async def write_as_revision_0002(engine: AsyncEngine, catalogue: Catalogue) -> None:
    """What the service of revision 0002 wrote for a first sync of ``catalogue``: rows
    with the old columns, the content hash, disks, and created events whose documents
    keep the then-unknown fields in ``extra``."""
    async with engine.begin() as conn:
        run_id = await conn.scalar(
            sa.text(
                "INSERT INTO inventory.sync_runs (started_at, finished_at, status, trigger,"
                " host, pid) VALUES (now(), now(), 'succeeded', 'cli', 'old', 1) RETURNING run_id"
            )
        )
        for (region, source), images in catalogue.snapshot().items():
            await conn.execute(
                sa.text(
                    "INSERT INTO inventory.sync_partitions (run_id, region_id, image_source,"
                    " status, started_at, finished_at, images_seen, created)"
                    " VALUES (:run, :r, :s, 'succeeded', now(), now(), :n, :n)"
                ),
                {"run": run_id, "r": region, "s": source, "n": len(images)},
            )
            for item in images.values():
                row = normalize_image(item, region_id=region, image_source=source)
                values = {c: getattr(row, c) for c in OLD_COLUMNS}
                await conn.execute(
                    sa.text(
                        f"INSERT INTO inventory.images ({', '.join(OLD_COLUMNS)}, raw,"
                        " content_hash, first_seen_at, last_changed_at) VALUES ("
                        + ", ".join(f":{c}" for c in OLD_COLUMNS)
                        + ", CAST(:raw AS jsonb), :hash, now(), now())"
                    ),
                    {**values, "raw": row.raw_json, "hash": row.content_hash},
                )
                disks = [{c: getattr(d, c) for c in DISK_COLUMNS} for d in row.disks]
                for disk in disks:
                    await conn.execute(
                        sa.text(
                            f"INSERT INTO inventory.image_disks (region_id, image_id,"
                            f" {', '.join(DISK_COLUMNS)}) VALUES (:r, :i, "
                            + ", ".join(f":{c}" for c in DISK_COLUMNS)
                            + ")"
                        ),
                        {"r": region, "i": row.image_id, **disk},
                    )
                doc = {c: values[c] for c in OLD_COLUMNS[2:]}
                doc["created_at"] = row.created_at.isoformat() if row.created_at else None
                doc["disks"] = disks
                doc["extra"] = {k: v for k, v in item.items() if k not in OLD_KNOWN}
                await conn.execute(
                    sa.text(
                        "INSERT INTO inventory.image_events (occurred_at, sync_run_id,"
                        " region_id, image_id, image_source, event_type, after)"
                        " VALUES (now(), :run, :r, :i, :s, 'created', CAST(:doc AS jsonb))"
                    ),
                    {
                        "run": run_id,
                        "r": region,
                        "i": row.image_id,
                        "s": source,
                        "doc": orjson.dumps(doc).decode(),
                    },
                )


async def sync_catalogue(url: str, catalogue: Catalogue, make_settings: Any) -> Any:
    """One sync of ``catalogue`` (served by a simulator) into the database at ``url``."""
    async with (
        running_simulator(catalogue) as sim,
        open_runtime(
            make_settings(
                sim.url,
                DATABASE_URL=url,
                IMAGE_SYNC_REGIONS="cn-north-1",
                IMAGE_SYNC_SOURCES=",".join(SOURCES),
            )
        ) as rt,
    ):
        return await sync_once(rt.database.engine, rt.client, rt.partitions())


async def test_back_filled_rows_are_not_rewritten_by_the_next_sync(
    scratch_engine: AsyncEngine, scratch_url: str, make_settings: Any
) -> None:
    engine = scratch_engine
    catalogue = catalogue_with_full_records()
    await migrate.upgrade(engine, "0002")
    await write_as_revision_0002(engine, catalogue)
    await migrate.upgrade(engine)
    assert await migrate.current_revision(engine) == migrate.head_revision()

    async with engine.connect() as conn:
        stored = {
            r["image_id"]: r
            for r in (
                await conn.execute(
                    sa.text(
                        "SELECT image_id, login_name, imported, expired_at, instance_id,"
                        " charge_service_code, charge_formula, shared_with,"
                        " instance_types_constraint, instance_types FROM inventory.images"
                    )
                )
            ).mappings()
        }
    shared = catalogue.images("cn-north-1", "shared")
    assert len(stored) == len(catalogue) and shared
    for item in shared:
        row = stored[item["imageId"]]
        charge = item.get("chargeInfo")
        assert row["login_name"] == item["loginName"]
        assert row["instance_id"] == item["instanceId"]
        assert row["imported"] == item.get("imported")
        expired = item.get("expiredTime")
        assert row["expired_at"] == (
            datetime(2027, 6, 30, 23, 59, 59, tzinfo=BEIJING) if expired else None
        )
        assert row["charge_service_code"] == (charge["serviceCode"] if charge else None)
        assert row["charge_formula"] == (charge["formula"] if charge else None)
        assert (row["shared_with"], row["instance_types"]) == (None, None)
    assert any(r["charge_formula"] == "per-hour" for r in stored.values())
    assert any(isinstance(r["charge_formula"], list) for r in stored.values())
    # The old history replays to the back-filled state (images_as_of reads old extras).
    assert await check_invariants(engine) == []

    before = await row_versions(engine)
    report = await sync_catalogue(scratch_url, catalogue, make_settings)
    assert report.ok
    assert report.total("unchanged") == len(catalogue)
    assert sum(report.total(t) for t in ("created", "updated", "removed")) == 0
    assert await row_versions(engine) == before  # not one row written

    # A real change after the migration: only the changed field is an event.
    first = shared[0]
    catalogue.modify("cn-north-1", first["imageId"], loginName="renamed", name="new")
    report = await sync_catalogue(scratch_url, catalogue, make_settings)
    assert report.total("updated") == 1
    async with engine.connect() as conn:
        event = (
            await conn.execute(
                sa.text(
                    "SELECT changed_fields, before, after FROM inventory.image_events"
                    " WHERE event_type = 'updated'"
                )
            )
        ).one()
    assert event.changed_fields == ["login_name", "name"]
    assert event.before == {"login_name": first["loginName"], "name": first["name"]}
    assert event.after == {"login_name": "renamed", "name": "new"}
    assert await check_invariants(engine) == []
