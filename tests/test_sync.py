"""End to end: the simulator's catalogue lands in PostgreSQL exactly, column by column."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.listing import Partition
from service.simulator import running_simulator
from service.sync import SyncReport, sync_once

BEIJING = timezone(timedelta(hours=8))


async def sync(engine: AsyncEngine, settings: Any, **kwargs: Any) -> SyncReport:
    async with open_runtime(settings) as rt:
        return await sync_once(engine, rt.client, rt.partitions(), **kwargs)


def expected_image(region: str, source: str, api: dict[str, Any]) -> dict[str, Any]:
    """What inventory.images should hold for one API object (written from the API doc)."""
    uefi = api.get("uefiSupport")
    return {
        "region_id": region,
        "image_id": api["imageId"],
        "image_source": source,
        "name": api.get("name"),
        "platform": api.get("platform"),
        "os_version": api.get("osVersion"),
        "architecture": api.get("architecture"),
        "os_type": api.get("osType"),
        "status": api.get("status"),
        "description": api.get("desc"),
        "owner_pin": api.get("ownerPin"),
        "launch_permission": api.get("launchPermission"),
        "root_device_type": api.get("rootDeviceType"),
        "snapshot_id": api.get("snapshotId"),
        "boot_mode": api.get("bootMode")
        or (None if uefi is None else ("uefi" if uefi else "bios")),
        "system_disk_size_gb": api.get("systemDiskSizeGB"),
        "size_mb": api.get("sizeMB"),
        "progress": int(api["progress"]) if api.get("progress") not in (None, "") else None,
        "created_at": datetime.strptime(api["createTime"], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=BEIJING
        ),
        "offline": api.get("offline"),
        "raw": api,
        "removed_at": None,
    }


def expected_disks(api: dict[str, Any]) -> list[dict[str, Any]]:
    attachments = ([api["systemDisk"]] if api.get("systemDisk") else []) + list(
        api.get("dataDisks") or []
    )
    rows = []
    for position, a in enumerate(attachments if api.get("systemDisk") else [None, *attachments]):
        if a is None:
            continue
        cloud, local = a.get("cloudDisk") or {}, a.get("localDisk") or {}
        rows.append(
            {
                "position": position,
                "role": "system" if position == 0 else "data",
                "device_name": a.get("deviceName"),
                "disk_category": a.get("diskCategory"),
                "auto_delete": a.get("autoDelete"),
                "cloud_disk_type": cloud.get("diskType"),
                "cloud_disk_size_gb": cloud.get("diskSizeGB"),
                "cloud_iops": cloud.get("iops"),
                "cloud_snapshot_id": cloud.get("snapshotId"),
                "cloud_encrypted": cloud.get("encrypted"),
                "local_disk_type": local.get("diskType"),
                "local_disk_size_gb": local.get("diskSizeGB"),
            }
        )
    return rows


async def database_state(
    engine: AsyncEngine,
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], list[dict[str, Any]]]]:
    async with engine.connect() as conn:
        images = {
            (r["region_id"], r["image_id"]): dict(r)
            for r in (await conn.execute(sa.text("SELECT * FROM inventory.images"))).mappings()
        }
        disks: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in (
            await conn.execute(
                sa.text(
                    "SELECT * FROM inventory.image_disks ORDER BY region_id, image_id, position"
                )
            )
        ).mappings():
            row = dict(r)
            key = (row.pop("region_id"), row.pop("image_id"))
            disks.setdefault(key, []).append(row)
    return images, disks


async def assert_matches_catalogue(engine: AsyncEngine, catalogue: Any) -> None:
    images, disks = await database_state(engine)
    listed = {k: v for k, v in images.items() if v["removed_at"] is None}
    expected_keys = set()
    for region, source in catalogue.partitions():
        for api in catalogue.images(region, source):
            key = (region, api["imageId"])
            expected_keys.add(key)
            row = listed.get(key)
            assert row is not None, f"{key} missing from inventory.images"
            for column, value in expected_image(region, source, api).items():
                assert row[column] == value, f"{key} {column}: {row[column]!r} != {value!r}"
            assert disks.get(key, []) == expected_disks(api), f"{key} disks differ"
    assert set(listed) == expected_keys


async def test_sync_matches_catalogue_column_by_column(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(images=600, seed=11) as sim:
        report = await sync(engine, make_settings(sim.url))
        assert report.ok, report
        assert report.total("created") == len(sim.catalogue) == 600
        await assert_matches_catalogue(engine, sim.catalogue)
        # Every (region, source) partition was recorded as a success.
        async with engine.connect() as conn:
            statuses = (
                await conn.execute(
                    sa.text("SELECT status, count(*) FROM inventory.sync_partitions GROUP BY 1")
                )
            ).all()
        assert statuses == [("succeeded", 20)]


async def test_catalogue_has_both_disk_kinds_and_offline_images(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """The comparison above is only meaningful if the catalogue exercises every shape."""
    async with running_simulator(images=600, seed=11) as sim:
        await sync(engine, make_settings(sim.url))
    async with engine.connect() as conn:
        kinds = set(
            (
                await conn.execute(
                    sa.text("SELECT DISTINCT disk_category FROM inventory.image_disks")
                )
            ).scalars()
        )
        data_disks = await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.image_disks WHERE role = 'data'")
        )
        offline = await conn.scalar(sa.text("SELECT count(*) FROM inventory.images WHERE offline"))
        null_offline = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM inventory.images WHERE offline IS NULL AND image_source IN ('private', 'shared', 'community')"
            )
        )
        extra = await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.images WHERE raw ? 'uefiSupport'")
        )
    assert kinds == {"local", "cloud"}
    assert data_disks and offline and null_offline and extra


async def test_one_region_and_source_only(engine: AsyncEngine, make_settings: Any) -> None:
    async with running_simulator(images=400, seed=3) as sim:
        async with open_runtime(make_settings(sim.url)) as rt:
            report = await sync_once(engine, rt.client, [Partition("cn-east-2", "public")])
        assert report.ok
        expected = len(sim.catalogue.images("cn-east-2", "public"))
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT region_id, image_source, count(*) FROM inventory.images GROUP BY 1, 2"
                )
            )
        ).all()
    assert rows == [("cn-east-2", "public", expected)]
