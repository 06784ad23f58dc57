"""Health that tells the truth on first contact: refused credentials red at once, health of
the configured partitions only, and the initial load kept apart from the news (issue 12)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.signer import DEMO_ACCESS_KEY
from service.report import print_status
from service.simulator import running_simulator
from service.store import migrate
from service.sync import sync_once
from service.web.data import refresh_gauges
from tests.fault_helpers import mutate
from tests.test_api_faults import run_cli

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 20  # 4 default regions x 5 sources


async def health(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    sa.text("SELECT * FROM inventory.sync_health ORDER BY region_id, image_source")
                )
            ).all()
        )


async def status_text(engine: AsyncEngine, width: int = 200) -> str:
    buffer = io.StringIO()
    await print_status(engine, console=Console(file=buffer, width=width, color_system=None))
    return buffer.getvalue()


async def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """``image-sync ARGS`` in a subprocess (the simulator serves on this event loop)."""
    code, _out, err = await run_cli(env, *args)
    return code, err


# --- (6) refused credentials are red within one tick --------------------------------------


async def test_refused_credentials_turn_every_partition_red_in_the_first_tick(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(seed=41, images=100) as sim:
        settings = make_settings(
            sim.url,
            JDCLOUD_ACCESS_KEY=DEMO_ACCESS_KEY,
            JDCLOUD_SECRET_KEY="not-the-secret-0123456789",
        )
        async with open_runtime(settings) as runtime:
            daemon = runtime.daemon()
            assert await daemon.tick(aligned=False) is None  # logged, not raised
            async with engine.connect() as conn:  # what /metrics does on each scrape
                await refresh_gauges(conn, runtime.metrics, settings.regions, settings.sources)
            failing = [
                runtime.metrics.registry.get_sample_value(
                    "image_sync_partition_failing",
                    {"region": p.region, "source": p.source, "account": p.account},
                )
                for p in daemon.partitions
            ]
            failed = sum(
                runtime.metrics.registry.get_sample_value(
                    "image_sync_partitions_total",
                    {
                        "region": p.region,
                        "source": p.source,
                        "status": "failed",
                        "account": p.account,
                    },
                )
                or 0
                for p in daemon.partitions
            )
    rows = await health(engine)
    assert len(rows) == PARTITIONS
    assert {r.last_status for r in rows} == {"failed"}
    assert {r.last_error_status for r in rows} == {"UNAUTHENTICATED"}
    assert all("refused the credentials" in r.last_error_message for r in rows)
    assert failed == PARTITIONS  # what ImageSyncPartitionFailureRatio reads
    assert failing == [1.0] * PARTITIONS  # what ImageSyncPartitionFailing reads
    async with engine.connect() as conn:
        partitions = await conn.scalar(sa.text("SELECT partitions FROM inventory.sync_runs"))
    assert partitions == PARTITIONS
    text = await status_text(engine)
    assert text.count("UNAUTHENTICATED") >= PARTITIONS
    assert "not-the-secret-0123456789" not in text


# --- (7) health shows the configuration ---------------------------------------------------


async def test_a_one_off_mistyped_region_does_not_stay_red(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    async with running_simulator(seed=42, images=100) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url}
        code, err = await cli(env, "sync", "--once")
        assert code == 0, err
        code, err = await cli(env, "sync", "--once", "--region", "cn-nowhere-9")
        assert code == 1, err
    async with engine.connect() as conn:
        tried = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM inventory.sync_partitions WHERE region_id = 'cn-nowhere-9'"
            )
        )
        registry = (
            await conn.execute(sa.text("SELECT * FROM inventory.partitions WHERE configured"))
        ).all()
    assert tried == 5  # the one-off run is recorded ...
    rows = await health(engine)  # ... but it is not the configuration
    assert len(rows) == PARTITIONS and len(registry) == PARTITIONS
    assert {r.last_status for r in rows} == {"succeeded"}
    assert all(r.configured for r in rows)
    assert "cn-nowhere-9" not in await status_text(engine)


async def test_a_configured_partition_never_synced_is_shown_and_a_dropped_one_is_not(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    async with running_simulator(seed=43, images=60) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url, "IMAGE_SYNC_SOURCES": "private,shared"}
        assert (await cli(env, "sync", "--once"))[0] == 0
        # The configuration changes: shared is dropped, community added but not synced yet.
        env["IMAGE_SYNC_SOURCES"] = "private,community"
        assert (await cli(env, "sync", "--once", "--source", "private"))[0] == 0
        await _register(engine, env)
    rows = await health(engine)
    assert {(r.image_source, r.last_status) for r in rows} == {
        ("private", "succeeded"),
        ("community", None),
    }
    async with engine.connect() as conn:
        dropped = (
            await conn.execute(
                sa.text(
                    "SELECT configured, unconfigured_at IS NOT NULL AS gone "
                    "FROM inventory.partitions WHERE image_source = 'shared'"
                )
            )
        ).all()
    assert {tuple(r) for r in dropped} == {(False, True)}
    assert "never" in await status_text(engine)


async def _register(engine: AsyncEngine, env: dict[str, str]) -> None:
    """What a start of the one-account form registers: its account partitions are the
    account ``default``'s."""
    from service.store.registry import register_partitions

    sources = env["IMAGE_SYNC_SOURCES"].split(",")
    regions = ["cn-north-1", "cn-east-1", "cn-east-2", "cn-south-1"]
    await register_partitions(
        engine,
        [
            ("default" if s in ("private", "shared") else None, r, s)
            for r in regions
            for s in sources
        ],
    )


# --- (8) the initial load is not news -----------------------------------------------------


def new_images_query() -> str:
    text = (ROOT / "docs" / "queries.md").read_text(encoding="utf-8")
    section = text.split("## New images of the last 24 hours", 1)[1]
    match = re.search(r"```sql\n(.*?)```", section, re.S)
    assert match
    return match.group(1)


async def test_new_images_query_returns_only_what_changed_after_the_initial_load(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(seed=44, images=400) as sim:
        settings = make_settings(sim.url)
        async with open_runtime(settings) as rt:
            first = await sync_once(engine, rt.client, rt.partitions())
            mutate(sim.catalogue, 1)
            sim.catalogue.add("cn-north-1", "private", imageId="img-news000002")
            second = await sync_once(engine, rt.client, rt.partitions())
    assert first.ok and second.ok and first.total("created") > 300
    async with engine.connect() as conn:
        news = (await conn.execute(sa.text(new_images_query()))).all()
        by_run = dict(
            (
                await conn.execute(
                    sa.text(
                        "SELECT sync_run_id, array_agg(DISTINCT baseline) "
                        "FROM inventory.image_events GROUP BY 1"
                    )
                )
            ).all()
        )
    assert sorted(r.image_id for r in news) == ["img-added00001", "img-news000002"]
    assert by_run == {first.run_id: [True], second.run_id: [False]}


async def test_migration_backfills_baseline_from_the_first_succeeded_sync(
    scratch_engine: AsyncEngine,
) -> None:
    await migrate.upgrade(scratch_engine, "0002")
    async with scratch_engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.sync_runs (run_id, started_at, status, trigger, host, pid) "
                "OVERRIDING SYSTEM VALUE VALUES (1, now(), 'partial', 'cli', 'h', 1), "
                "(2, now(), 'succeeded', 'cli', 'h', 1), (3, now(), 'succeeded', 'cli', 'h', 1)"
            )
        )
        # run 1: incomplete (not a success); run 2: the first success; run 3: news.
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.sync_partitions "
                "(run_id, region_id, image_source, status, started_at, finished_at) VALUES "
                "(1, 'cn-north-1', 'private', 'incomplete', now(), now() - interval '3 min'), "
                "(2, 'cn-north-1', 'private', 'succeeded', now(), now() - interval '2 min'), "
                "(3, 'cn-north-1', 'private', 'succeeded', now(), now() - interval '1 min')"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.image_events "
                "(occurred_at, sync_run_id, region_id, image_id, image_source, event_type) "
                "SELECT now(), r, 'cn-north-1', 'img-' || r, 'private', 'created' "
                "FROM generate_series(1, 3) r"
            )
        )
    await migrate.upgrade(scratch_engine)
    async with scratch_engine.connect() as conn:
        rows = dict(
            (
                await conn.execute(
                    sa.text("SELECT sync_run_id, baseline FROM inventory.image_events")
                )
            ).all()
        )
        # Their documents are empty: migration 0009 gives the versions the events' source.
        sources = (
            await conn.execute(
                sa.text("SELECT DISTINCT image_source FROM inventory.image_versions")
            )
        ).scalars()
        assert list(sources) == ["private"]
    assert rows == {1: False, 2: True, 3: False}


async def test_images_as_of_null_is_an_error(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert (
            await conn.scalar(sa.text("SELECT count(*) FROM inventory.images_as_of(now())"))
        ) == 0
        with pytest.raises(sa.exc.DBAPIError, match="ts is NULL"):
            await conn.execute(sa.text("SELECT * FROM inventory.images_as_of(NULL)"))


# --- bookkeeping retention ---------------------------------------------------------------


async def test_the_daemon_prunes_old_runs_that_no_event_references(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.sync_runs (run_id, started_at, status, trigger, host, pid) "
                "OVERRIDING SYSTEM VALUE SELECT r, now() - make_interval(days => d), "
                "'failed', 'schedule', 'h', 1 FROM (VALUES (101, 100), (102, 100), (103, 100), "
                "(104, 100), (105, 30)) v(r, d)"
            )
        )
        # 101: old, unreferenced -> pruned. 102: an event names it. 103: the latest success
        # of cn-west-9/shared. 104: old, an older success -> pruned. 105: only 30 days old.
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.sync_partitions "
                "(run_id, region_id, image_source, status, started_at, finished_at) VALUES "
                "(101, 'cn-north-1', 'private', 'failed', now(), now() - interval '100 days'), "
                "(103, 'cn-west-9', 'shared', 'succeeded', now(), now() - interval '99 days'), "
                "(104, 'cn-west-9', 'shared', 'succeeded', now(), now() - interval '100 days'), "
                "(105, 'cn-north-1', 'private', 'failed', now(), now() - interval '30 days')"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.image_events "
                "(occurred_at, sync_run_id, region_id, image_id, image_source, event_type) "
                "VALUES (now() - interval '100 days', 102, 'cn-north-1', 'img-x', 'private', "
                "'created')"
            )
        )
    settings = make_settings(
        IMAGE_SYNC_REGIONS="cn-north-1",
        IMAGE_SYNC_SOURCES="private",
        IMAGE_SYNC_MAX_ATTEMPTS="1",
        IMAGE_SYNC_KEEP_RUNS_DAYS="90",
    )
    async with open_runtime(settings) as runtime:
        await runtime.daemon().tick(aligned=False)  # nothing listens: the sync fails fast
    async with engine.connect() as conn:
        runs = set((await conn.scalars(sa.text("SELECT run_id FROM inventory.sync_runs"))).all())
        orphans = await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.sync_partitions WHERE run_id IN (101, 104)")
        )
    assert {102, 103, 105} <= runs and not runs & {101, 104}
    assert len(runs) == 4 and orphans == 0  # and the tick's own run


def test_ages_are_never_negative() -> None:
    from service.report import _age

    # A success recorded while the page read the clock: -0.4 s is "0s", not "-0s".
    assert [_age(-0.4), _age(-3.0), _age(0.6), _age(None)] == ["0s", "0s", "1s", "never"]


async def test_inventory_reader_reads_the_registry(engine: AsyncEngine) -> None:
    from service.store.registry import register_partitions

    await register_partitions(engine, [("default", "cn-north-1", "private")])
    async with engine.connect() as conn:
        await conn.execute(sa.text("SET ROLE inventory_reader"))
        rows = (await conn.execute(sa.text("SELECT * FROM inventory.partitions"))).all()
        health = (await conn.execute(sa.text("SELECT * FROM inventory.sync_health"))).all()
        await conn.execute(sa.text("RESET ROLE"))
    assert [(r.region_id, r.image_source, r.configured) for r in rows] == [
        ("cn-north-1", "private", True)
    ]
    assert [(r.region_id, r.last_status, r.configured) for r in health] == [
        ("cn-north-1", None, True)
    ]
