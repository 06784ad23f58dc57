"""A partition whose transaction meets a real deadlock runs again and records its
changes once (DESIGN.md, Accounts: "concurrent merges ... never fail on a deadlock and
never record an event twice").

The deadlock is made, not simulated: another transaction holds the row of an image the
sync is about to update, waits until the partition's merge blocks on that row (holding
the region's account-merge lock), then asks for that lock itself. PostgreSQL's deadlock
detector aborts the partition's transaction (it waited first; the other side's
``deadlock_timeout`` is set long), and the sync must run the partition again."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.simulator import running_simulator
from service.store.apply import ACCOUNT_MERGE_LOCK_SPACE, account_merge_lock_key
from service.sync import sync_once

pytestmark = pytest.mark.db

REGION = "cn-east-1"

# pg_locks, not pg_stat_activity: that view is a snapshot per transaction.
_BLOCKED_BACKENDS = """
SELECT count(*) FROM pg_locks
 WHERE NOT granted AND pid <> :me AND CAST(:me AS int) = ANY(pg_blocking_pids(pid))
"""


async def _deadlock(engine: AsyncEngine, image_id: str, blocked: asyncio.Event) -> None:
    """Hold ``image_id``'s row; once a backend waits for it, wait for the account-merge
    lock of its region (which that backend holds); then let go."""
    async with engine.connect() as conn, conn.begin():
        await conn.execute(sa.text("SET LOCAL deadlock_timeout = '60s'"))  # the other detects
        me = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
        await conn.execute(
            sa.text(
                "SELECT 1 FROM inventory.images WHERE region_id = :r AND image_id = :i FOR UPDATE"
            ),
            {"r": REGION, "i": image_id},
        )
        blocked.set()
        async with engine.connect() as probe:
            for _ in range(600):
                if await probe.scalar(sa.text(_BLOCKED_BACKENDS), {"me": me}):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the partition's merge never waited for the row")
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": ACCOUNT_MERGE_LOCK_SPACE, "key": account_merge_lock_key(REGION)},
        )
        await conn.rollback()


async def test_a_deadlocked_partition_runs_again_and_records_its_change_once(
    engine: AsyncEngine, make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_simulator(images=60, seed=8, regions=[REGION]) as sim:
        settings = make_settings(sim.url, IMAGE_SYNC_REGIONS=REGION, IMAGE_SYNC_SOURCES="private")
        async with open_runtime(settings) as rt:
            assert (await sync_once(engine, rt.client, rt.partitions())).ok
            image_id = sim.catalogue.images(REGION, "private")[0]["imageId"]
            sim.catalogue.modify(REGION, image_id, name="renamed-under-a-deadlock")
            blocked = asyncio.Event()
            holder = asyncio.create_task(_deadlock(engine, image_id, blocked))
            await asyncio.wait(
                {holder, asyncio.create_task(blocked.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if holder.done():
                holder.result()  # it failed before holding the row: say why
            with caplog.at_level(logging.INFO, logger="service.sync"):
                report = await sync_once(engine, rt.client, rt.partitions())
            await holder
    (partition,) = report.partitions
    assert partition.status == "succeeded", partition
    reruns = [r.getMessage() for r in caplog.records if "running it again" in r.getMessage()]
    assert len(reruns) == 1 and "deadlock" in reruns[0], reruns
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                sa.text(
                    "SELECT event_type, after ->> 'name' FROM inventory.image_events"
                    " WHERE image_id = :i ORDER BY event_id"
                ),
                {"i": image_id},
            )
        ).all()
        assert events[1:] == [("updated", "renamed-under-a-deadlock")], events
        name = await conn.scalar(
            sa.text("SELECT name FROM inventory.images WHERE image_id = :i"), {"i": image_id}
        )
        assert name == "renamed-under-a-deadlock"
        versions = await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.image_versions WHERE image_id = :i"),
            {"i": image_id},
        )
        assert versions == 2
