"""A created event records the whole image: the document every later comparison
(updated events, ``images_as_of``) builds from the stored row, for ordinary and odd
items alike; the first version written with it holds the stored row too, also when two
merges meet the same new image at once; and a createTime PostgreSQL cannot hold is an
invalid item.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.normalize import TRACKED_FIELDS, ImageRow, InvalidItem, normalize_image
from service.simulator.catalogue import Catalogue
from service.store.apply import _DISK_DOC, _VERSION_VALUES, MergeCounts, PartitionWriter, _doc
from service.store.runs import release_run, start_run
from tests.fault_helpers import wait_until_blocked

REGION, SOURCE = "cn-north-1", "private"

ODD_ITEMS: list[dict[str, Any]] = [
    {"imageId": "img-bare"},
    {"imageId": "img-fraction", "createTime": "2021-03-04T05:06:07.250000+02:00"},
    {"imageId": "img-micro", "createTime": "2021-03-04 05:06:07.000001"},
    {"imageId": "img-midnight", "createTime": "2020-01-01 00:00:00"},
    {"imageId": "img-year-1", "createTime": "0001-01-01T00:00:01+00:00"},
    {"imageId": "img-year-9999", "createTime": "9999-12-31 23:59:59"},
    {
        "imageId": "img-coerced",
        "progress": "100",
        "sizeMB": "2048",
        "offline": "true",
        "uefiSupport": True,
        "systemDiskSizeGB": 40.0,
    },
    {
        "imageId": "img-disks",
        "systemDisk": {"diskCategory": "local", "localDisk": {"diskType": "nvme", "diskSizeGB": 0}},
        "dataDisks": [
            {"deviceName": "vdb", "autoDelete": "false", "cloudDisk": {"iops": 3000}},
            {"deviceName": "vdc", "cloudDisk": {"encrypted": True, "snapshotId": "snap-1"}},
        ],
    },
    {
        "imageId": "img-unknown-fields",
        "name": 'quote " backslash \\ tab \t 中文 \U0001f600',
        "tags": [{"k": "v"}, None, 1.5, -3, True, {"nested": {"deep": []}}],
        "zeroFloat": 0.0,
        "bigInt": 2**62,
        "emptyObject": {},
    },
]


async def test_created_events_record_the_stored_image(engine: AsyncEngine) -> None:
    """Each created event's document is the one the merge builds from the stored image."""
    catalogue = Catalogue(seed=41, images=200, regions=(REGION,), sources=(SOURCE,))
    items = catalogue.images(REGION, SOURCE) + ODD_ITEMS
    rows = [normalize_image(item, region_id=REGION, image_source=SOURCE) for item in items]
    async with engine.connect() as lock_conn:
        await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        run_id = await start_run(lock_conn, trigger="cli")
        try:
            async with engine.connect() as conn, conn.begin():
                counts = await _merge_partition(conn, SOURCE, rows, run_id)
        finally:
            await release_run(lock_conn, run_id)
        stored_doc = _doc(
            "i",
            f"(SELECT {_DISK_DOC} FROM inventory.image_disks d"
            " WHERE d.region_id = i.region_id AND d.image_id = i.image_id)",
        )
        compared = (
            await lock_conn.execute(
                sa.text(
                    f"SELECT e.image_id, e.after = {stored_doc}, e.after, {stored_doc}"
                    " FROM inventory.image_events e"
                    " JOIN inventory.images i USING (region_id, image_id)"
                    " WHERE e.event_type = 'created' ORDER BY e.event_id"
                )
            )
        ).all()
        unlike, current = await _versions_unlike_rows(lock_conn), await _current_versions(lock_conn)
    assert counts.created == len(items)
    assert [image_id for image_id, *_ in compared] == sorted(row.image_id for row in rows)
    assert [(image_id, after, sql) for image_id, same, after, sql in compared if not same] == []
    assert (unlike, current) == ([], len(items))


async def _versions_unlike_rows(conn: Any) -> list[tuple[Any, ...]]:
    """Current versions whose fields are not those of the stored row, built from the row
    the way a changed image's next version is (``_VERSION_VALUES``)."""
    stored = ", ".join(_VERSION_VALUES.get(f, "i." + f) for f in TRACKED_FIELDS)
    held = ", ".join("v." + f for f in TRACKED_FIELDS)
    result = await conn.execute(
        sa.text(
            f"SELECT v.image_id, ROW({held})::text, ROW({stored})::text"
            " FROM inventory.image_versions v"
            " JOIN inventory.images i USING (region_id, image_id)"
            f" WHERE v.valid_to = 'infinity' AND ROW({held}) IS DISTINCT FROM ROW({stored})"
        )
    )
    return [tuple(r) for r in result.all()]


async def _current_versions(conn: Any) -> int:
    return int(
        await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.image_versions WHERE valid_to = 'infinity'")
        )
    )


async def test_an_image_new_to_two_merges_at_once_has_one_row_of_disks_and_one_version(
    engine: AsyncEngine,
) -> None:
    """The same new image in two partitions of a region (public, community), merged at
    once: the second waits for the first's row, then updates it like a changed image.
    Its disks are the second's, replacing the first's (before, a disk-key violation), and
    the first's version is closed by the second's, one current version."""
    item = {
        "imageId": "img-both",
        "name": "seen twice",
        "dataDisks": [{"deviceName": "vdb", "cloudDisk": {"diskSizeGB": 20}}],
    }
    public = [normalize_image(item, region_id=REGION, image_source="public")]
    community = [
        normalize_image(
            {**item, "name": "seen twice, later"}, region_id=REGION, image_source="community"
        )
    ]
    async with engine.connect() as lock_conn:
        await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        run_id = await start_run(lock_conn, trigger="cli")
        try:
            async with engine.connect() as first, engine.connect() as second:
                pid = await second.scalar(sa.text("SELECT pg_backend_pid()"))
                await second.rollback()
                async with first.begin():
                    await _merge_partition(first, "public", public, run_id)
                    waiting = asyncio.ensure_future(
                        _merge_partition_in_transaction(second, "community", community, run_id)
                    )
                    await wait_until_blocked(lock_conn, pid, "the second merge")
                await waiting
        finally:
            await release_run(lock_conn, run_id)
        disks = (
            await lock_conn.execute(
                sa.text("SELECT image_id, position, device_name FROM inventory.image_disks")
            )
        ).all()
        versions = (
            await lock_conn.execute(
                sa.text(
                    "SELECT image_source, name, valid_to = 'infinity' FROM inventory.image_versions"
                    " ORDER BY valid_from"
                )
            )
        ).all()
        assert await _versions_unlike_rows(lock_conn) == []
    assert [tuple(d) for d in disks] == [("img-both", 1, "vdb")]
    assert [tuple(v) for v in versions] == [
        ("public", "seen twice", False),
        ("community", "seen twice, later", True),
    ]


async def _merge_partition(
    conn: Any, source: str, rows: list[ImageRow], run_id: int
) -> MergeCounts:
    """One complete merge of ``rows`` in REGION's ``source`` partition (in ``conn``'s
    open transaction)."""
    writer = PartitionWriter(conn, region=REGION, source=source)
    await writer.open()
    await writer.stage(rows, 0)
    return await writer.merge(run_id=run_id, remove_missing=True)


async def _merge_partition_in_transaction(
    conn: Any, source: str, rows: list[ImageRow], run_id: int
) -> None:
    async with conn.begin():
        await _merge_partition(conn, source, rows, run_id)


@pytest.mark.parametrize(
    "create_time",
    [
        "0001-01-01 00:00:00",  # Beijing: year 0 in UTC; the COPY raised OverflowError
        "0001-01-01T00:00:00+00:00",  # the driver writes it as -infinity
        "9999-12-31T23:59:59.999999+00:00",  # ... and this as infinity
        "9999-12-31T20:00:00-05:00",  # year 10000 in UTC
    ],
)
def test_create_time_without_a_timestamptz_is_an_invalid_item(create_time: str) -> None:
    with pytest.raises(InvalidItem, match="createTime out of range"):
        normalize_image(
            {"imageId": "img-t", "createTime": create_time}, region_id=REGION, image_source=SOURCE
        )
