"""``image-sync check``: holds after real syncs, and each invariant catches its corruption."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.check import CHECK_NAMES, check_invariants
from service.simulator import running_simulator
from service.sync import sync_once
from tests.fault_helpers import assert_invariants, mutate


async def _sync_history(engine: AsyncEngine, make_settings: Any) -> None:
    """Three runs over a changing catalogue: created, updated, offline/online, removed,
    and a removed image that comes back (reappeared)."""
    async with (
        running_simulator(images=300, seed=5) as sim,
        open_runtime(make_settings(sim.url)) as rt,
    ):
        assert (await sync_once(engine, rt.client, rt.partitions())).ok
        gone = sim.catalogue.images("cn-east-1", "private")[1]
        mutate(sim.catalogue)
        assert (await sync_once(engine, rt.client, rt.partitions())).ok
        sim.catalogue.add("cn-east-1", "private", **gone)
        assert (await sync_once(engine, rt.client, rt.partitions())).ok


async def test_invariants_hold_after_a_history_of_every_event_type(
    engine: AsyncEngine, make_settings: Any
) -> None:
    await _sync_history(engine, make_settings)
    async with engine.connect() as conn:
        kinds = set(
            (await conn.execute(sa.text("SELECT DISTINCT event_type FROM inventory.image_events")))
            .scalars()
            .all()
        )
    assert kinds == {"created", "updated", "went_offline", "came_online", "removed", "reappeared"}
    await assert_invariants(engine)


async def _one(conn: Any, sql: str) -> Any:
    return (await conn.execute(sa.text(sql))).first()


TAMPER = "SET LOCAL image_sync.writes_versions = 'on'"
"""Lets a test write inventory.images directly (migration 0007's writer guard)."""

CORRUPTIONS: dict[str, list[str]] = {
    # check name -> statements that break exactly that promise
    "system_disk": [
        """DELETE FROM inventory.image_disks WHERE (region_id, image_id) = (
             SELECT region_id, image_id FROM inventory.images
              WHERE removed_at IS NULL AND raw ? 'systemDisk' ORDER BY image_id LIMIT 1)
             AND position = 0"""
    ],
    "removed_at": [
        """UPDATE inventory.images SET removed_at = now() WHERE (region_id, image_id) = (
             SELECT region_id, image_id FROM inventory.images
              WHERE removed_at IS NULL ORDER BY image_id LIMIT 1)"""
    ],
    "replay": [
        """UPDATE inventory.images SET name = 'tampered', size_mb = 1 WHERE (region_id, image_id) = (
             SELECT region_id, image_id FROM inventory.images
              WHERE removed_at IS NULL ORDER BY image_id LIMIT 1)"""
    ],
    "versions": [
        """UPDATE inventory.image_versions SET name = 'tampered'
            WHERE valid_to = 'infinity' AND (region_id, image_id) = (
             SELECT region_id, image_id FROM inventory.images
              WHERE removed_at IS NULL ORDER BY image_id LIMIT 1)"""
    ],
    "event_order": [
        """INSERT INTO inventory.image_events
               (occurred_at, sync_run_id, region_id, image_id, image_source, event_type, after)
           SELECT occurred_at, sync_run_id, region_id, image_id, image_source, 'created', after
             FROM inventory.image_events WHERE event_type = 'created'
            ORDER BY event_id LIMIT 1"""
    ],
    "run_liveness": [
        """INSERT INTO inventory.sync_runs (started_at, status, trigger, host, pid)
           VALUES (now() - interval '1 hour', 'running', 'cli', 'crashed-host', 4242)"""
    ],
    "partition_counts": [
        """UPDATE inventory.sync_partitions SET created = created + 1
            WHERE (run_id, region_id, image_source) = (
              SELECT run_id, region_id, image_source FROM inventory.sync_partitions
               WHERE status = 'succeeded' ORDER BY 1, 2, 3 LIMIT 1)"""
    ],
}


def test_every_check_has_a_corruption() -> None:
    assert set(CORRUPTIONS) == set(CHECK_NAMES)


@pytest.mark.parametrize("check", sorted(CORRUPTIONS))
async def test_each_corruption_is_caught(
    engine: AsyncEngine, make_settings: Any, check: str
) -> None:
    await _sync_history(engine, make_settings)
    await assert_invariants(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text(TAMPER))
        for statement in CORRUPTIONS[check]:
            assert (await conn.execute(sa.text(statement))).rowcount == 1
    problems = await check_invariants(engine)
    assert [p.split(":")[0] for p in problems if p.startswith(check + ":")] == [check], problems
    # The report names the offender, readably.
    line = next(p for p in problems if p.startswith(check + ":"))
    assert "1 offender, e.g. " in line, line


async def test_extra_disk_event_after_removed_and_image_without_events_are_caught(
    engine: AsyncEngine, make_settings: Any
) -> None:
    await _sync_history(engine, make_settings)
    async with engine.begin() as conn:
        await conn.execute(sa.text(TAMPER))
        image = await _one(
            conn,
            "SELECT region_id, image_id FROM inventory.images WHERE removed_at IS NULL"
            " AND jsonb_array_length(raw -> 'dataDisks') = 0 ORDER BY image_id LIMIT 1",
        )
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.image_disks (region_id, image_id, position, role)"
                " VALUES (:r, :i, 7, 'data')"
            ),
            {"r": image[0], "i": image[1]},
        )
        # An update recorded after the image's 'removed' event, and an image with no
        # event at all.
        for event_type in ("removed", "updated"):
            await conn.execute(
                sa.text(
                    """INSERT INTO inventory.image_events
                           (occurred_at, sync_run_id, region_id, image_id, image_source,
                            event_type, after)
                       SELECT now(), sync_run_id, region_id, image_id, image_source, :t,
                              CASE WHEN :t = 'updated' THEN '{"name": "ghost"}'::jsonb END
                         FROM inventory.image_events WHERE (region_id, image_id) = (:r, :i)
                        ORDER BY event_id DESC LIMIT 1"""
                ),
                {"t": event_type, "r": image[0], "i": image[1]},
            )
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.images (region_id, image_id, image_source, raw,"
                " content_hash, first_seen_at, last_changed_at)"
                " VALUES ('cn-north-1', 'img-noevents', 'public', '{}', '\\x00', now(), now())"
            )
        )
    problems = await check_invariants(engine)
    names = {p.split(":")[0] for p in problems}
    assert {"system_disk", "event_order", "removed_at", "replay"} <= names
    assert any("img-noevents (removed_at null, last event none)" in p for p in problems)
    assert any("updated after removed" in p for p in problems)


async def test_only_limits_the_checks(engine: AsyncEngine) -> None:
    assert await check_invariants(engine, only=["run_liveness"]) == []
    with pytest.raises(ValueError, match="unknown checks"):
        await check_invariants(engine, only=["nope"])


async def test_a_live_run_is_not_reported(engine: AsyncEngine) -> None:
    """A run whose process holds the liveness lock is in progress, not abandoned."""
    from service.store.runs import release_run, start_run

    async with engine.connect() as lock_conn:
        await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        run_id = await start_run(lock_conn, trigger="cli")
        try:
            assert await check_invariants(engine, only=["run_liveness"]) == []
        finally:
            await release_run(lock_conn, run_id)
    problems = await check_invariants(engine, only=["run_liveness"])
    assert len(problems) == 1 and f"run {run_id}" in problems[0]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**env, "JDCLOUD_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_check_exit_codes_and_report(
    engine: AsyncEngine, make_settings: Any, cli_env: dict[str, str]
) -> None:
    await _sync_history(engine, make_settings)
    ok = _cli(cli_env, "check")
    assert ok.returncode == 0, ok.stderr
    assert "all invariants hold" in ok.stdout
    async with engine.begin() as conn:
        await conn.execute(sa.text(TAMPER))
        for check in ("replay", "run_liveness"):
            for statement in CORRUPTIONS[check]:
                await conn.execute(sa.text(statement))
    bad = _cli(cli_env, "check")
    assert bad.returncode == 1, bad
    assert "Traceback" not in bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[0] == "3 invariant(s) broken:" or lines[0].endswith("invariant(s) broken:")
    assert any(line.startswith("  - replay: ") for line in lines)
    assert any(line.startswith("  - run_liveness: ") and "crashed-host" in line for line in lines)
