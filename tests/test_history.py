"""History other teams can trust: a scripted sequence of catalogue changes, with the exact
events, removals and run records after each sync, and images_as_of() at each moment."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.simulator import Catalogue, running_simulator
from service.store.engine import create_engine
from service.sync import SyncReport, sync_once
from tests.test_sync import assert_matches_catalogue, expected_disks, expected_image

REGION = "cn-north-1"
SOURCES = ("public", "private")


async def events_of(engine: AsyncEngine, run_id: int) -> list[tuple[str, str, list[str]]]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT event_type, image_id, changed_fields FROM inventory.image_events "
                    "WHERE sync_run_id = :r ORDER BY event_id"
                ),
                {"r": run_id},
            )
        ).all()
    return [(t, i, list(f)) for t, i, f in rows]


async def removed_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(
            (
                await conn.execute(
                    sa.text("SELECT image_id FROM inventory.images WHERE removed_at IS NOT NULL")
                )
            ).scalars()
        )


async def partition_rows(engine: AsyncEngine, run_id: int) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text("SELECT * FROM inventory.sync_partitions WHERE run_id = :r"), {"r": run_id}
            )
        ).mappings()
        return {r["image_source"]: dict(r) for r in rows}


async def run_row(engine: AsyncEngine, run_id: int) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    sa.text("SELECT * FROM inventory.sync_runs WHERE run_id = :r"), {"r": run_id}
                )
            )
            .mappings()
            .one()
        )
        return dict(row)


async def db_now(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        value: datetime = await conn.scalar(sa.text("SELECT clock_timestamp()"))
        return value


async def as_of(engine: AsyncEngine, ts: datetime) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(sa.text("SELECT * FROM inventory.images_as_of(:ts)"), {"ts": ts})
        ).mappings()
        return {r["image_id"]: dict(r) for r in rows}


def assert_as_of_equals(
    state: dict[str, dict[str, Any]], snapshot: dict[tuple[str, str], dict[str, dict[str, Any]]]
) -> None:
    expected_ids = {
        i
        for (region, source), images in snapshot.items()
        if region == REGION and source in SOURCES
        for i in images
    }
    assert set(state) == expected_ids
    for (region, source), images in snapshot.items():
        if region != REGION or source not in SOURCES:
            continue
        for image_id, api in images.items():
            row = state[image_id]
            want = expected_image(region, source, api)
            for column in (
                "image_source",
                "name",
                "platform",
                "os_version",
                "status",
                "offline",
                "size_mb",
                "progress",
                "created_at",
                "boot_mode",
                "snapshot_id",
            ):
                assert row[column] == want[column], (
                    f"{image_id} {column}: {row[column]!r} != {want[column]!r}"
                )
            disks = [{k: v for k, v in d.items()} for d in row["disks"]]
            assert disks == expected_disks(api), f"{image_id} disks"
            extra = {k: v for k, v in api.items() if k == "uefiSupport"}
            assert {k: row["extra"][k] for k in extra} == extra


@pytest.fixture
def catalogue() -> Catalogue:
    return Catalogue(seed=5, images=120, regions=(REGION,), sources=SOURCES)


async def test_scripted_history(
    engine: AsyncEngine, make_settings: Any, catalogue: Catalogue
) -> None:
    async with running_simulator(catalogue) as sim:
        settings = make_settings(
            sim.url,
            IMAGE_SYNC_REGIONS=REGION,
            IMAGE_SYNC_SOURCES=",".join(SOURCES),
            IMAGE_SYNC_MAX_ATTEMPTS="2",
        )
        async with open_runtime(settings) as rt:

            async def sync(page_size: int = 100) -> SyncReport:
                return await sync_once(engine, rt.client, rt.partitions(), page_size=page_size)

            moments: list[tuple[datetime, Any]] = []

            # 1. First sync: every image created.
            r1 = await sync()
            assert r1.ok and r1.total("created") == 120
            events = await events_of(engine, r1.run_id)
            assert len(events) == 120 and {e[0] for e in events} == {"created"}
            assert (await run_row(engine, r1.run_id))["created"] == 120
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 2. A rename is one `updated` event with the before/after of just that field.
            private_id = catalogue.images(REGION, "private")[0]["imageId"]
            old_name = catalogue.get(REGION, private_id)["name"]
            catalogue.modify(REGION, private_id, name="renamed image")
            r2 = await sync()
            assert await events_of(engine, r2.run_id) == [("updated", private_id, ["name"])]
            async with engine.connect() as conn:
                before, after = (
                    await conn.execute(
                        sa.text(
                            "SELECT before, after FROM inventory.image_events WHERE sync_run_id = :r"
                        ),
                        {"r": r2.run_id},
                    )
                ).one()
            assert before == {"name": old_name} and after == {"name": "renamed image"}
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 3. Offline and renamed in the same sync: both facts; moving listing is no removal.
            public_id = next(
                i["imageId"] for i in catalogue.images(REGION, "public") if not i.get("offline")
            )
            catalogue.take_offline(REGION, public_id)
            catalogue.modify(REGION, public_id, name="old image")
            r3 = await sync()
            assert await events_of(engine, r3.run_id) == [
                ("went_offline", public_id, ["offline"]),
                ("updated", public_id, ["name"]),
            ]
            assert await removed_ids(engine) == set()
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 4. Back online.
            catalogue.bring_online(REGION, public_id)
            r4 = await sync()
            assert await events_of(engine, r4.run_id) == [("came_online", public_id, ["offline"])]

            # 5. Deleted upstream: removed, with removed_at set, nothing else touched.
            gone = catalogue.delete(REGION, private_id)
            r5 = await sync()
            assert await events_of(engine, r5.run_id) == [("removed", private_id, [])]
            assert await removed_ids(engine) == {private_id}
            assert (await partition_rows(engine, r5.run_id))["private"]["removed"] == 1
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 6. It comes back with the same id: reappeared, removed_at cleared.
            catalogue.add(REGION, "private", **{k: v for k, v in gone.items() if k != "createTime"})
            r6 = await sync()
            six = await events_of(engine, r6.run_id)
            assert [(t, i) for t, i, _ in six] == [("reappeared", private_id)]
            assert "created_at" in six[0][2]  # add() stamps a new createTime
            assert await removed_ids(engine) == set()
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 7. A failing partition removes nothing; the other partition still syncs.
            victim = catalogue.images(REGION, "private")[1]["imageId"]
            catalogue.delete(REGION, victim)
            sim.faults.update({"fail_partitions": {f"{REGION}/private": "INTERNAL"}})
            r7 = await sync()
            assert r7.status == "partial"
            parts = await partition_rows(engine, r7.run_id)
            assert (
                parts["private"]["status"] == "failed"
                and parts["private"]["error_status"] == "INTERNAL"
            )
            assert parts["public"]["status"] == "succeeded"
            assert await events_of(engine, r7.run_id) == []
            assert await removed_ids(engine) == set()
            run7 = await run_row(engine, r7.run_id)
            assert run7["status"] == "partial" and run7["partitions_failed"] == 1

            # 8. A listing that never settles is incomplete and removes nothing
            #    (small pages, and an image added or deleted at every request).
            sim.faults.update({"reset": True})
            sim.faults.update({"drift": 1.0, "seed": 3})
            r8 = await sync(page_size=10)
            parts = await partition_rows(engine, r8.run_id)
            assert {p["status"] for p in parts.values()} == {"incomplete"}
            assert all(p["error_status"] == "DRIFT" for p in parts.values())
            assert not [e for e in await events_of(engine, r8.run_id) if e[0] == "removed"]

            # 9. Healthy again: the deletion (and the drift's own changes) are recorded.
            sim.faults.update({"reset": True})
            r9 = await sync()
            assert r9.ok
            assert victim in await removed_ids(engine)
            await assert_matches_catalogue(engine, catalogue)
            moments.append((await db_now(engine), catalogue.snapshot()))

            # 10. Nothing changed upstream: no event at all.
            r10 = await sync()
            assert r10.ok and await events_of(engine, r10.run_id) == []

        # images_as_of(t) equals what the simulator served at each moment.
        for moment, snapshot in moments:
            assert_as_of_equals(await as_of(engine, moment), snapshot)


def table_writes_sql() -> str:
    return (
        "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
        "WHERE schemaname = 'inventory' AND relname IN ('images', 'image_disks', 'image_events')"
    )


async def table_writes(url: str) -> dict[str, int]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return dict((await conn.execute(sa.text(table_writes_sql()))).all())  # type: ignore[arg-type]
    finally:
        await engine.dispose()


async def test_no_change_resync_writes_zero_rows(
    engine: AsyncEngine, make_settings: Any, database_url: str
) -> None:
    async with running_simulator(images=300, seed=9) as sim:
        settings = make_settings(sim.url)
        # Each sync on its own engine, disposed afterwards: a backend flushes its
        # statistics when it exits, so pg_stat_user_tables is exact afterwards.
        async with open_runtime(settings) as rt:
            first = await sync_once(rt.database.engine, rt.client, rt.partitions())
        assert first.ok and first.total("created") == 300
        before = await table_writes(database_url)
        async with open_runtime(settings) as rt:
            second = await sync_once(rt.database.engine, rt.client, rt.partitions())
        assert second.ok and second.total("images_seen") == 300
        assert second.total("unchanged") == 300  # recognised by hash, never staged in full
        after = await table_writes(database_url)
    assert before["images"] >= 300 and before["image_events"] >= 300  # the counters do count
    assert after == before, (
        f"rows written by a no-change resync: { {k: after[k] - before[k] for k in after} }"
    )


async def test_a_crashed_run_is_marked_abandoned_and_a_live_one_is_not(engine: AsyncEngine) -> None:
    from service.store.runs import mark_abandoned, release_run, start_run

    # A live run: its process holds the liveness lock on its connection.
    live_conn = await engine.connect()
    await live_conn.execution_options(isolation_level="AUTOCOMMIT")
    live = await start_run(live_conn, trigger="cli")
    # A crashed run: the row says running, but no session holds its lock.
    async with engine.begin() as conn:
        crashed = await conn.scalar(
            sa.text(
                "INSERT INTO inventory.sync_runs (started_at, status, trigger, host, pid) "
                "VALUES (now(), 'running', 'schedule', 'gone-host', 1) RETURNING run_id"
            )
        )
    try:
        assert await mark_abandoned(engine) == 1
        async with engine.connect() as conn:
            statuses = dict(
                (
                    await conn.execute(sa.text("SELECT run_id, status FROM inventory.sync_runs"))
                ).all()
            )
        assert statuses == {live: "running", crashed: "abandoned"}
    finally:
        await release_run(live_conn, live)
        await live_conn.close()
    # Once its process lets go (here: releases the lock), the live one would be swept too.
    assert await mark_abandoned(engine) == 1
