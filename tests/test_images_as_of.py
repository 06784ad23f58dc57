"""``images_as_of(ts)`` over ``image_versions`` equals the fold of the events
(``images_as_of_events``) at every moment of a history with every event type, whole and
in the forms readers write (one partition, one image), and those forms reach an index.
Migration 0007's back-fill of an existing history gives the same answers."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.simulator import running_simulator
from service.store import migrate
from service.store.tables import VERSION_BUCKETS
from service.sync import sync_once
from tests.fault_helpers import mutate

pytestmark = pytest.mark.db

WHOLE_DIFF = """
SELECT count(*) FROM (
    (SELECT * FROM inventory.images_as_of(:ts) EXCEPT ALL
     SELECT * FROM inventory.images_as_of_events(:ts))
    UNION ALL
    (SELECT * FROM inventory.images_as_of_events(:ts) EXCEPT ALL
     SELECT * FROM inventory.images_as_of(:ts))
) d
"""


async def _history(engine: AsyncEngine, make_settings: Any) -> list[datetime]:
    """Five syncs of a changing catalogue (created, updated, offline and online, removed,
    reappeared); returns six moments: before the first and after each."""
    moments: list[datetime] = []

    async def now() -> None:
        async with engine.connect() as conn:
            moments.append(await conn.scalar(sa.text("SELECT clock_timestamp()")))

    async with (
        running_simulator(images=300, seed=5) as sim,
        open_runtime(make_settings(sim.url)) as rt,
    ):
        await now()
        assert (await sync_once(engine, rt.client, rt.partitions())).ok
        await now()
        gone = sim.catalogue.images("cn-east-1", "private")[1]
        for step in range(1, 4):
            mutate(sim.catalogue, step)
            assert (await sync_once(engine, rt.client, rt.partitions())).ok
            await now()
        sim.catalogue.add("cn-east-1", "private", **gone)
        assert (await sync_once(engine, rt.client, rt.partitions())).ok
        await now()
    return moments


async def _rows(conn: Any, function: str, where: str, params: dict[str, Any]) -> list[Any]:
    sql = f"SELECT * FROM inventory.{function}(:ts) WHERE {where}"
    return list((await conn.execute(sa.text(sql), params)).all())


async def _plan(conn: Any, sql: str) -> str:
    """``EXPLAIN`` of ``sql``, its lines joined."""
    return "\n".join((await conn.execute(sa.text(f"EXPLAIN {sql}"))).scalars().all())


async def _assert_forms_equal(engine: AsyncEngine, moments: list[datetime]) -> None:
    async with engine.connect() as conn:
        kinds = set(
            (await conn.execute(sa.text("SELECT DISTINCT event_type FROM inventory.image_events")))
            .scalars()
            .all()
        )
        assert kinds == {
            "created", "updated", "went_offline", "came_online", "removed", "reappeared",
        }  # fmt: skip
        partitions = (
            await conn.execute(
                sa.text("SELECT DISTINCT region_id, image_source FROM inventory.images")
            )
        ).all()
        images = (
            await conn.execute(
                sa.text(
                    "SELECT DISTINCT region_id, image_id FROM inventory.image_events"
                    " WHERE event_type <> 'created'"
                )
            )
        ).all()
        assert len(moments) == 6 and images
        sizes = []
        for ts in moments:
            sizes.append(
                await conn.scalar(
                    sa.text("SELECT count(*) FROM inventory.images_as_of(:ts)"), {"ts": ts}
                )
            )
            assert await conn.scalar(sa.text(WHOLE_DIFF), {"ts": ts}) == 0, ts
            for region, source in partitions:
                where = "region_id = :r AND image_source = :s ORDER BY image_id"
                params = {"ts": ts, "r": region, "s": source}
                assert await _rows(conn, "images_as_of", where, params) == await _rows(
                    conn, "images_as_of_events", where, params
                ), (ts, region, source)
            for region, image_id in images:
                where = "region_id = :r AND image_id = :i"
                params = {"ts": ts, "r": region, "i": image_id}
                assert await _rows(conn, "images_as_of", where, params) == await _rows(
                    conn, "images_as_of_events", where, params
                ), (ts, region, image_id)
        assert sizes[0] == 0 and len(set(sizes[1:])) > 1, sizes  # the moments differ


async def test_the_versions_answer_as_the_events_do_at_six_moments(
    engine: AsyncEngine, make_settings: Any
) -> None:
    moments = await _history(engine, make_settings)
    await _assert_forms_equal(engine, moments)


async def test_the_filters_readers_write_reach_an_index(
    engine: AsyncEngine, make_settings: Any
) -> None:
    await _history(engine, make_settings)
    async with engine.connect() as conn:
        # The tables are tiny here (a sequential scan would be cheaper): forbid it, so
        # the plan shows whether the filter reaches an index at all.
        await conn.execute(sa.text("SET enable_seqscan = off"))
        for where in ("region_id = 'cn-east-1' AND image_id = 'x'",
                      "region_id = 'cn-east-1' AND image_source = 'private'"):  # fmt: skip
            plan = await _plan(
                conn,
                f"SELECT * FROM inventory.images_as_of(now() - interval '1 h') WHERE {where}",
            )
            assert "Function Scan" not in plan, plan  # inlined
            assert "image_versions_current" in plan and "image_versions_closed" in plan, plan
            assert "Seq Scan" not in plan, plan
            assert "Index" in plan, plan


async def test_a_partition_form_reads_one_table_of_versions_of_each_kind(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """Migrations 0009 and 0010: a partition's versions are stored together, in the one
    hash partition of image_versions_current and of image_versions_closed its
    (region_id, image_source) names, and the partition form prunes to those two; one
    image (no source given) probes all 16 of each."""
    moments = await _history(engine, make_settings)
    async with engine.connect() as conn:
        for ts in (moments[2], moments[-1]):
            sql = f"SELECT * FROM inventory.images_as_of('{ts}') WHERE region_id = 'cn-east-1'"
            for where, tables in (("image_source = 'private'", 1),
                                  ("image_id = 'x'", VERSION_BUCKETS)):  # fmt: skip
                plan = await _plan(conn, f"{sql} AND {where}")
                for half in ("current", "closed"):
                    read = set(re.findall(rf"image_versions_{half}_\d+", plan))
                    assert len(read) == tables, (ts, where, half, plan)
        stored = await conn.scalar(
            sa.text(
                "SELECT count(DISTINCT tableoid) FROM inventory.image_versions"
                " WHERE region_id = 'cn-east-1' AND image_source = 'private'"
            )
        )
        assert stored == 2  # one table of current versions, one of closed ones


async def test_0009_and_0010_keep_every_version_both_ways(
    scratch_engine: AsyncEngine, make_settings: Any
) -> None:
    """Rebuilding image_versions_current (0009) and image_versions_closed (0010), and
    rebuilding them back (their downgrades), keep every row and the tables' names and
    columns."""
    await migrate.upgrade(scratch_engine)
    await _history(scratch_engine, make_settings)

    async def versions() -> list[Any]:
        found = []
        async with scratch_engine.connect() as conn:
            for half in ("current", "closed"):
                table = f"inventory.image_versions_{half}"
                rows = await conn.execute(
                    sa.text(
                        f"SELECT to_jsonb(v) FROM {table} v ORDER BY region_id, image_id, valid_to"
                    )
                )
                columns = await conn.scalar(
                    sa.text(
                        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
                        " WHERE attrelid = CAST(:t AS regclass) AND attnum > 0"
                        " AND NOT attisdropped"
                    ),
                    {"t": table},
                )
                found.append((list(rows.scalars()), columns))
        return found

    at_head = await versions()
    assert len(at_head[0][0]) > 100 and len(at_head[1][0]) > 10, [len(h[0]) for h in at_head]
    await migrate.downgrade(scratch_engine, "0008")
    assert await versions() == at_head
    await migrate.upgrade(scratch_engine)
    assert await versions() == at_head


async def test_point_in_time_reads_may_run_in_parallel(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """An unsafe function anywhere in a query forbids a parallel plan (migration 0008):
    with parallelism made free, the whole and the partition forms get workers, for a
    constant moment and for one computed from now()."""
    await _history(engine, make_settings)
    async with engine.connect() as conn:
        for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0",
                        "min_parallel_table_scan_size = 0", "enable_indexscan = off",
                        "enable_bitmapscan = off"):  # fmt: skip
            await conn.execute(sa.text(f"SET {setting}"))
        for moment in ("now() - interval '1 h'", "'2026-12-01 00:00+00'"):
            for where in ("true", "region_id = 'cn-east-1' AND image_source = 'private'"):
                sql = f"SELECT * FROM inventory.images_as_of({moment}) WHERE {where}"
                plan = await _plan(conn, sql)
                assert "Gather" in plan and "Parallel Seq Scan" in plan, plan


async def test_migration_back_fills_versions_from_an_existing_history(
    scratch_engine: AsyncEngine, make_settings: Any
) -> None:
    """The history is written by today's merge, then the versions are taken away
    (downgrade to 0006: the events stay) and rebuilt by 0007's back-fill."""
    await migrate.upgrade(scratch_engine)
    moments = await _history(scratch_engine, make_settings)
    await migrate.downgrade(scratch_engine, "0006")
    async with scratch_engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT to_regclass('inventory.image_versions')")) is None
    await migrate.upgrade(scratch_engine)
    await _assert_forms_equal(scratch_engine, moments)
