"""Sync under API faults, each switched on in the simulator: what is retried and counted,
what fails only its partition, what stops the run, and what never removes an image.

Retry counts are compared with the simulator's own counters. One caveat, measured
here: aiohttp resends an idempotent request once, silently, when the server drops the
connection before answering; such a resend is one request at the simulator and none
in our counters. So for ``reset`` the counters are bounds, for every other kind exact.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.listing import Partition
from service.jdcloud.signer import DEMO_ACCESS_KEY
from service.simulator import Catalogue, Simulator, running_simulator
from service.sync import SyncReport, sync_once
from tests.fault_helpers import MEMBERS_ROUTE, shared_with_no_one
from tests.local_api import local_api
from tests.test_sync import assert_matches_catalogue

TRANSIENT_KINDS = (
    "rate_limit",
    "internal",
    "bad_gateway",
    "unavailable",
    "reset",
    "truncated",
    "malformed",
    "html",
    "error_200",
)


async def run_sync(
    engine: AsyncEngine, settings: Any, partitions: list[Partition] | None = None
) -> SyncReport:
    async with open_runtime(settings) as rt:
        return await sync_once(
            engine, rt.client, partitions or rt.partitions(), page_size=settings.page_size
        )


async def partition_rows(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT region_id || '/' || image_source AS p, * FROM inventory.sync_partitions"
                )
            )
        ).mappings()
        return {r["p"]: dict(r) for r in rows}


async def run_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT * FROM inventory.sync_runs ORDER BY run_id"))
        return [dict(r) for r in rows.mappings()]


def faulted(sim: Simulator) -> Counter[str]:
    return Counter(
        key.removeprefix("fault:")
        for key, n in sim.state.counters.items()
        if key.startswith("fault:")
        for _ in range(n)
    )


# --- transient faults are retried, counted, and the result is exact ----------------------------


@pytest.mark.parametrize("kind", TRANSIENT_KINDS)
async def test_transient_fault_is_retried_and_the_database_matches(
    engine: AsyncEngine, make_settings: Any, kind: str
) -> None:
    faults = {"fail_first_n": [{"kind": kind, "n": 4}], "retry_after_s": 0}
    env = {}
    if kind == "reset":
        # One request at a time, so aiohttp's silent resend of a reset request meets the
        # next reset: 4 resets are then 2 requests of ours, each retried once.
        env["IMAGE_SYNC_CONCURRENCY"] = "1"
    async with running_simulator(seed=31, images=300, faults=faults) as sim:
        report = await run_sync(engine, make_settings(sim.url, **env))
        assert report.ok, report
        await assert_matches_catalogue(engine, sim.catalogue)
        assert faulted(sim) == {kind: 4}
        served = len(sim.requests)
    partitions = await partition_rows(engine)
    (run,) = await run_rows(engine)
    retries = sum(p["retries"] for p in partitions.values())
    requests = sum(p["api_requests"] for p in partitions.values())
    assert run["status"] == "succeeded"
    assert run["retries"] == retries == sum(p.retries for p in report.partitions)
    if kind == "reset":
        assert retries == 2
        assert requests + 2 == served  # the two silent resends
    else:
        assert retries == 4
        assert requests == served


async def test_random_mix_of_every_transient_fault_is_survived(
    engine: AsyncEngine, make_settings: Any
) -> None:
    rates = {kind: 0.035 for kind in TRANSIENT_KINDS}  # about 30% of requests fail
    faults = {"error_rates": rates, "retry_after_s": 0, "seed": 5}
    async with running_simulator(seed=32, images=1500, faults=faults) as sim:
        settings = make_settings(sim.url, IMAGE_SYNC_MAX_ATTEMPTS="10", IMAGE_SYNC_PAGE_SIZE="10")
        report = await run_sync(engine, settings)
        assert report.ok, report
        await assert_matches_catalogue(engine, sim.catalogue)
        injected = faulted(sim)
        served = len(sim.requests)
    (run,) = await run_rows(engine)
    partitions = await partition_rows(engine)
    requests = sum(p["api_requests"] for p in partitions.values())
    assert set(injected) == set(TRANSIENT_KINDS), injected
    total = sum(injected.values())
    assert total >= 30
    silent = served - requests  # resets that aiohttp resent on its own
    assert 0 <= silent <= injected["reset"]
    assert run["retries"] == total - silent == sum(p["retries"] for p in partitions.values())


async def test_retry_after_is_honoured(engine: AsyncEngine, make_settings: Any) -> None:
    faults = {"fail_first_n": [{"kind": "rate_limit", "n": 1}], "retry_after_s": 1}
    async with running_simulator(seed=33, images=100, faults=faults) as sim:
        report = await run_sync(
            engine, make_settings(sim.url), [Partition("cn-north-1", "private")]
        )
        log = list(sim.requests)
    assert report.ok and report.partitions[0].retries == 1
    assert [e["status"] for e in log[:2]] == [429, 200]
    assert log[1]["time"] - log[0]["time"] >= 1.0


# --- failures that are not retried, or not for ever ------------------------------------------


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def plain_lines(stderr: str) -> list[str]:
    """stderr without the JSON log records: what a person reads."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


async def test_a_persistent_failure_fails_only_its_partition_cli(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    faults = {"fail_partitions": {"cn-east-1/private": "INTERNAL"}}
    async with running_simulator(seed=34, images=300, faults=faults) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url, "IMAGE_SYNC_MAX_ATTEMPTS": "3"}
        code, out, err = await run_cli(env, "sync", "--once")
        failing = [e for e in sim.requests if e["status"] == 500]
    assert code == 1, (out, err)
    assert "Traceback" not in err
    assert plain_lines(err) == [
        "  cn-east-1/private: failed: INTERNAL: cn-east-1: 500 INTERNAL: Internal server error"
        f" (requestId {plain_lines(err)[0].rsplit('requestId ', 1)[-1]}"
    ]
    assert len(failing) == 3 and all("imageSource=private" in e["query"] for e in failing)
    partitions = await partition_rows(engine)
    bad = partitions.pop("cn-east-1/private")
    assert (bad["status"], bad["error_status"], bad["api_requests"], bad["retries"]) == (
        "failed",
        "INTERNAL",
        3,
        2,
    )
    assert "500 INTERNAL: Internal server error" in bad["error_message"]
    assert len(partitions) == 19 and {p["status"] for p in partitions.values()} == {"succeeded"}
    (run,) = await run_rows(engine)
    assert run["status"] == "partial" and run["retries"] == 2
    # Every other partition landed exactly; the failed one has nothing (first sync).
    async with engine.connect() as conn:
        stored = set(
            (await conn.execute(sa.text("SELECT region_id, image_id FROM inventory.images"))).all()
        )
    expected = {
        (region, image["imageId"])
        for region, source in sim.catalogue.partitions()
        if (region, source) != ("cn-east-1", "private")
        for image in sim.catalogue.images(region, source)
    }
    assert stored == expected


async def test_quota_exceeded_is_not_retried(engine: AsyncEngine, make_settings: Any) -> None:
    faults = {"fail_partitions": {"cn-north-1/private": "QUOTA_EXCEEDED"}}
    async with running_simulator(seed=35, images=300, faults=faults) as sim:
        report = await run_sync(engine, make_settings(sim.url))
        to_partition = [
            e
            for e in sim.requests
            if e["region"] == "cn-north-1" and "imageSource=private" in e["query"]
        ]
    assert len(to_partition) == 1 and to_partition[0]["status"] == 429
    (bad,) = [p for p in report.partitions if p.status != "succeeded"]
    assert bad.partition == Partition("cn-north-1", "private", "default")
    assert (bad.error_status, bad.api_requests, bad.retries) == ("QUOTA_EXCEEDED", 1, 0)
    assert "Quota exceeded" in (bad.error_message or "")
    row = (await partition_rows(engine))["cn-north-1/private"]
    assert (row["status"], row["error_status"], row["retries"]) == ("failed", "QUOTA_EXCEEDED", 0)
    assert report.status == "partial"


async def test_a_failed_listing_stops_its_sibling(engine: AsyncEngine, make_settings: Any) -> None:
    """public is two listings read together; when one fails for good, the other must stop
    too, before the partition's transaction ends: nothing may keep requesting (or writing
    through a connection handed back to the pool) after the run returned."""
    faults = {
        "latency_ms": 20,
        "fail_first_n": [{"kind": "QUOTA_EXCEEDED", "n": 1, "region": "cn-north-1"}],
    }
    catalogue = Catalogue(seed=36, images=600, regions=("cn-north-1",), sources=("public",))
    async with running_simulator(catalogue, faults=faults) as sim:
        settings = make_settings(
            sim.url,
            IMAGE_SYNC_REGIONS="cn-north-1",
            IMAGE_SYNC_SOURCES="public",
            IMAGE_SYNC_PAGE_SIZE="10",
            IMAGE_SYNC_CONCURRENCY="2",
        )
        report = await run_sync(engine, settings)
        served = len(sim.requests)
        await asyncio.sleep(0.3)
        assert len(sim.requests) == served, "requests after the run returned"
    (bad,) = report.partitions
    assert (bad.status, bad.error_status) == ("failed", "QUOTA_EXCEEDED")
    assert bad.api_requests == served


async def test_a_wrong_secret_ends_the_run_with_one_line_cli(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    secret = "not-the-secret-0123456789"
    async with running_simulator(seed=37, images=100) as sim:
        env = {
            **cli_env,
            "JDCLOUD_ENDPOINT": sim.url,
            "JDCLOUD_ACCESS_KEY": DEMO_ACCESS_KEY,
            "JDCLOUD_SECRET_KEY": secret,
        }
        code, out, err = await run_cli(env, "sync", "--once")
        statuses = Counter(e["status"] for e in sim.requests)
    assert code not in (0, 2) and code == 1
    assert "Traceback" not in err and "Traceback" not in out
    (line,) = plain_lines(err)
    assert line.startswith("image-sync: the API refused the credentials")
    assert "UNAUTHENTICATED" in line and "JDCLOUD_SECRET_KEY" in line
    assert secret not in err + out
    assert set(statuses) == {401}
    # The run stops: partitions already in flight (8 at a time, public/thirdparty with
    # two listings) are refused too, but none is started after the refusal (28 listings).
    assert statuses[401] <= 16
    (run,) = await run_rows(engine)
    assert run["status"] == "failed"


# --- drift -----------------------------------------------------------------------------------


async def listed_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(
            (
                await conn.execute(
                    sa.text("SELECT image_id FROM inventory.images WHERE removed_at IS NULL")
                )
            ).scalars()
        )


def drift_settings(make_settings: Any, url: str) -> Any:
    # One listing and one request at a time: the simulator's seeded drift draws then
    # fall on the same requests every run.
    return make_settings(
        url,
        IMAGE_SYNC_REGIONS="cn-north-1",
        IMAGE_SYNC_SOURCES="private",
        IMAGE_SYNC_CONCURRENCY="1",
        IMAGE_SYNC_PAGE_SIZE="50",
    )


async def test_drift_converges_by_listing_again(engine: AsyncEngine, make_settings: Any) -> None:
    catalogue = Catalogue(seed=38, images=240, regions=("cn-north-1",), sources=("private",))
    async with running_simulator(catalogue) as sim:
        settings = drift_settings(make_settings, sim.url)
        first = await run_sync(engine, settings)
        assert first.ok
        before = await listed_ids(engine)
        sim.faults.update({"drift": 0.3, "seed": 1})
        report = await run_sync(engine, settings)
        drifted = sim.state.counters["drift:add"] + sim.state.counters["drift:delete"]
        await assert_matches_catalogue(engine, sim.catalogue)
    (p,) = report.partitions
    assert p.status == "succeeded", p
    assert drifted >= 1
    assert p.pages > 5, "the listing (5 pages) was read more than once"
    after = await listed_ids(engine)
    current = {i["imageId"] for i in sim.catalogue.images("cn-north-1", "private")}
    assert after == current
    assert before - after == before - current  # removed: exactly those deleted upstream


async def test_drift_that_never_settles_ends_incomplete_and_removes_nothing(
    engine: AsyncEngine, make_settings: Any
) -> None:
    catalogue = Catalogue(seed=39, images=240, regions=("cn-north-1",), sources=("private",))
    async with running_simulator(catalogue) as sim:
        settings = drift_settings(make_settings, sim.url)
        assert (await run_sync(engine, settings)).ok
        before = await listed_ids(engine)
        sim.faults.update({"drift": 1.0, "seed": 4})
        report = await run_sync(engine, settings)
        deleted_upstream = before - {
            i["imageId"] for i in sim.catalogue.images("cn-north-1", "private")
        }
    (p,) = report.partitions
    assert (p.status, p.error_status) == ("incomplete", "DRIFT")
    assert deleted_upstream, "the drift did delete images upstream"
    assert p.counts.removed == 0
    assert before <= await listed_ids(engine), "an incomplete listing removed an image"
    row = (await partition_rows(engine))["cn-north-1/private"]
    assert (row["status"], row["removed"], row["error_status"]) == ("incomplete", 0, "DRIFT")
    assert report.status == "failed"


# --- invalid items ---------------------------------------------------------------------------


@asynccontextmanager
async def serving(items: list[Any]) -> AsyncIterator[str]:
    """describeImages that answers every listing with ``items`` (one page), and
    describeImageMembers (shared with no one) for the shared private ones among them."""

    async def handler(request: web.Request) -> web.Response:
        body = {"requestId": "r", "result": {"images": items, "totalCount": len(items)}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async with local_api(handler, {MEMBERS_ROUTE: shared_with_no_one}) as url:
        yield url


async def test_invalid_items_are_counted_logged_and_do_not_poison_the_page(
    engine: AsyncEngine, make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = Catalogue(seed=40, images=60, regions=("cn-north-1",), sources=("private",)).images(
        "cn-north-1", "private"
    )[:3]
    wrong_type = {**good[0], "imageId": "img-wrongtype01", "systemDiskSizeGB": "forty"}
    no_id = {k: v for k, v in good[1].items() if k != "imageId"}
    items = [good[0], wrong_type, good[1], no_id, good[2], "not an object"]
    caplog.set_level(logging.WARNING, logger="service.sync")
    async with serving(items) as url:
        report = await run_sync(engine, make_settings(url), [Partition("cn-north-1", "private")])
    (p,) = report.partitions
    assert p.invalid_items == 3
    # Items without a usable id make the listing unverifiable: stored, but nothing removed.
    assert p.status == "incomplete" and p.error_status == "INVALID_ITEMS"
    assert await listed_ids(engine) == {i["imageId"] for i in good}
    row = (await partition_rows(engine))["cn-north-1/private"]
    assert (row["invalid_items"], row["created"]) == (3, 3)
    warnings = [r.getMessage() for r in caplog.records if "invalid item" in r.getMessage()]
    assert len(warnings) == 3
    assert all("cn-north-1/private" in w for w in warnings)
    assert any("img-wrongtype01" in w and "systemDiskSizeGB" in w for w in warnings)


async def test_an_item_of_the_wrong_type_is_reported_and_the_partition_still_succeeds(
    engine: AsyncEngine, make_settings: Any
) -> None:
    catalogue = Catalogue(seed=41, images=200, regions=("cn-north-1",), sources=("private",))
    async with running_simulator(catalogue) as sim:
        settings = make_settings(
            sim.url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="private"
        )
        assert (await run_sync(engine, settings)).ok
        victim = sim.catalogue.images("cn-north-1", "private")[7]["imageId"]
        sim.catalogue.modify("cn-north-1", victim, sizeMB=[1, 2])
        report = await run_sync(engine, settings)
    (p,) = report.partitions
    assert (p.status, p.invalid_items, p.counts.removed) == ("succeeded", 1, 0)
    assert victim in await listed_ids(engine), "an invalid item is not a removed image"


async def test_total_count_understated_by_whole_pages_removes_nothing(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """An API whose totalCount hides whole pages must not make real images look removed."""
    images = [
        {
            "imageId": f"img-{i:010d}",
            "name": f"image {i}",
            "imageSource": "private",
            "createTime": "2024-01-01 00:00:00",
        }
        for i in range(30)
    ]
    state = {"lie": False}

    async def describe(request: web.Request) -> web.Response:
        if request.query.get("imageSource") != "private":
            return web.json_response({"requestId": "r", "result": {"images": [], "totalCount": 0}})
        size, number = int(request.query["pageSize"]), int(request.query["pageNumber"])
        page = images[(number - 1) * size : number * size]
        total = 20 if state["lie"] else len(images)
        return web.json_response(
            {"requestId": "r", "result": {"images": page, "totalCount": total}}
        )

    async with local_api(describe) as url:
        settings = make_settings(url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="private")
        async with open_runtime(settings) as rt:
            first = await sync_once(engine, rt.client, rt.partitions(), page_size=10)
            assert first.ok and first.total("created") == 30
            state["lie"] = True  # totalCount now claims 2 pages of 10; 3 pages exist
            second = await sync_once(engine, rt.client, rt.partitions(), page_size=10)
    assert second.partitions[0].status == "incomplete"
    assert second.total("removed") == 0
    async with engine.connect() as conn:
        removed = await conn.scalar(
            sa.text("SELECT count(*) FROM inventory.images WHERE removed_at IS NOT NULL")
        )
    assert removed == 0
