"""The baseline: the script a user would otherwise write.

The official SDK (``VmClient`` + ``DescribeImagesRequest``), one listing after the
other, page after page, and one ``INSERT ... ON CONFLICT DO UPDATE`` per image and per
disk with plain psycopg, one transaction per page. Its tables live in a schema of
their own (``baseline``) in the benchmark's database.

With ``baseline_stride`` N > 1 it fetches and writes page 1 and every N-th page of each
listing only, and the wall time is scaled by (pages of the whole catalogue / pages
fetched); the result says so (``sampled_pages``, ``total_pages``, ``scale``).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.types.json import Jsonb

from service.config import OFFLINE_SOURCES, load_settings
from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY

_SCHEMA = """
DROP SCHEMA IF EXISTS baseline CASCADE;
CREATE SCHEMA baseline;
CREATE TABLE baseline.images (
    region_id text, image_id text, image_source text, name text, platform text,
    os_version text, architecture text, os_type text, status text, description text,
    owner_pin text, launch_permission text, root_device_type text, snapshot_id text,
    boot_mode text, system_disk_size_gb integer, size_mb integer, progress integer,
    created_at timestamptz, "offline" boolean, raw jsonb, synced_at timestamptz,
    PRIMARY KEY (region_id, image_id)
);
CREATE TABLE baseline.image_disks (
    region_id text, image_id text, position integer, device_name text, disk_category text,
    auto_delete boolean, disk_type text, disk_size_gb integer, snapshot_id text,
    PRIMARY KEY (region_id, image_id, position)
);
"""

_UPSERT_IMAGE = """
INSERT INTO baseline.images VALUES
    (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
     %s::timestamp AT TIME ZONE 'Asia/Shanghai', %s, %s, now())
ON CONFLICT (region_id, image_id) DO UPDATE SET
    image_source = EXCLUDED.image_source, name = EXCLUDED.name, platform = EXCLUDED.platform,
    os_version = EXCLUDED.os_version, architecture = EXCLUDED.architecture,
    os_type = EXCLUDED.os_type, status = EXCLUDED.status, description = EXCLUDED.description,
    owner_pin = EXCLUDED.owner_pin, launch_permission = EXCLUDED.launch_permission,
    root_device_type = EXCLUDED.root_device_type, snapshot_id = EXCLUDED.snapshot_id,
    boot_mode = EXCLUDED.boot_mode, system_disk_size_gb = EXCLUDED.system_disk_size_gb,
    size_mb = EXCLUDED.size_mb, progress = EXCLUDED.progress, created_at = EXCLUDED.created_at,
    "offline" = EXCLUDED."offline", raw = EXCLUDED.raw, synced_at = now()
"""

_UPSERT_DISK = """
INSERT INTO baseline.image_disks VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (region_id, image_id, position) DO UPDATE SET
    device_name = EXCLUDED.device_name, disk_category = EXCLUDED.disk_category,
    auto_delete = EXCLUDED.auto_delete, disk_type = EXCLUDED.disk_type,
    disk_size_gb = EXCLUDED.disk_size_gb, snapshot_id = EXCLUDED.snapshot_id
"""


def _disk_values(
    region: str, image_id: str, position: int, disk: dict[str, Any]
) -> tuple[Any, ...]:
    cloud = disk.get("cloudDisk") or {}
    local = disk.get("localDisk") or {}
    return (
        region,
        image_id,
        position,
        disk.get("deviceName"),
        disk.get("diskCategory"),
        disk.get("autoDelete"),
        cloud.get("diskType") or local.get("diskType"),
        cloud.get("diskSizeGB") or local.get("diskSizeGB"),
        cloud.get("snapshotId"),
    )


def _write_page(conn: psycopg.Connection, region: str, images: list[dict[str, Any]]) -> int:
    statements = 0
    with conn.transaction():
        for image in images:
            conn.execute(
                _UPSERT_IMAGE,
                (
                    region,
                    image["imageId"],
                    image.get("imageSource"),
                    image.get("name"),
                    image.get("platform"),
                    image.get("osVersion"),
                    image.get("architecture"),
                    image.get("osType"),
                    image.get("status"),
                    image.get("desc"),
                    image.get("ownerPin"),
                    image.get("launchPermission"),
                    image.get("rootDeviceType"),
                    image.get("snapshotId"),
                    image.get("bootMode"),
                    image.get("systemDiskSizeGB"),
                    image.get("sizeMB"),
                    image.get("progress"),
                    image.get("createTime") or None,
                    image.get("offline"),
                    Jsonb(image),
                ),
            )
            statements += 1
            disks = [image["systemDisk"]] if image.get("systemDisk") else []
            disks += image.get("dataDisks") or []
            for position, disk in enumerate(disks):
                conn.execute(_UPSERT_DISK, _disk_values(region, image["imageId"], position, disk))
                statements += 1
    return statements


def run_baseline(config: dict[str, Any]) -> dict[str, Any]:
    # The SDK calls datetime.utcnow() on every request (deprecated on 3.12+).
    warnings.simplefilter("ignore", DeprecationWarning)
    from jdcloud_sdk.core.config import Config  # type: ignore[import-untyped]
    from jdcloud_sdk.core.credential import Credential  # type: ignore[import-untyped]
    from jdcloud_sdk.core.logger import Logger  # type: ignore[import-untyped]
    from jdcloud_sdk.services.vm.apis.DescribeImagesRequest import (  # type: ignore[import-untyped]
        DescribeImagesParameters,
        DescribeImagesRequest,
    )
    from jdcloud_sdk.services.vm.client.VmClient import VmClient  # type: ignore[import-untyped]

    scenario = config["scenario"]
    stride = int(scenario["baseline_stride"])
    page_size = int(scenario["page_size"])
    settings = load_settings(
        {"DATABASE_URL": config["database_url"], "JDCLOUD_ENDPOINT": config["endpoint"]}
    )
    client = VmClient(
        Credential(DEMO_ACCESS_KEY, DEMO_SECRET_KEY),
        Config(urlsplit(config["endpoint"]).netloc, scheme="http", timeout=30),
        Logger(0),  # the SDK prints every request at its default level
    )
    sampled_pages = total_pages = rows = statements = 0
    with psycopg.connect(config["database_url"]) as conn:
        conn.execute(_SCHEMA)
        conn.commit()
        started = time.perf_counter()
        for region in settings.regions:
            for source in settings.sources:
                for offline in (False, True) if source in OFFLINE_SOURCES else (None,):
                    page = 1
                    while True:
                        parameters = DescribeImagesParameters(region)
                        parameters.setImageSource(source)
                        if offline is not None:
                            parameters.setOffline(offline)
                        parameters.setPageNumber(page)
                        parameters.setPageSize(page_size)
                        response = client.send(DescribeImagesRequest(parameters))
                        if response.error is not None:
                            raise RuntimeError(f"{region}/{source}: {response.error.message}")
                        images = response.result["images"]
                        statements += _write_page(conn, region, images)
                        rows += len(images)
                        sampled_pages += 1
                        pages = max(1, math.ceil(response.result["totalCount"] / page_size))
                        if page == 1:
                            total_pages += pages
                        page += stride
                        if page > pages:
                            break
        seconds = time.perf_counter() - started
    scale = total_pages / sampled_pages
    return {
        "seconds": seconds * scale,
        "measured_seconds": seconds,
        "sampled_pages": sampled_pages,
        "total_pages": total_pages,
        "scale": scale,
        "rows_fetched": rows,
        "statements": statements,
        "requests": sampled_pages,
    }
