"""Run records tell the truth however a run ends: cancelled with partitions left for
later, broken by a bug in one partition, refused by the API; and their times come from
the database's clock, whatever the replica's clock says."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.errors import AuthError
from service.ingest import Progress
from service.jdcloud.listing import Partition
from service.store.runs import PartitionReport
from service.sync import sync_once
from tests.local_api import EMPTY_PAGE, local_api

pytestmark = pytest.mark.db

SLOW, FAST = "cn-north-1", ("cn-east-1", "cn-east-2", "cn-south-1")


def delayed(delays: dict[str, float]) -> Any:
    """A handler answering an empty page after the region's delay (seconds)."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delays.get(request.match_info["region"], 0))
        return web.json_response(EMPTY_PAGE)

    return handler


async def run_row(engine: AsyncEngine) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                sa.text("SELECT run_id, status, partitions, error_message FROM inventory.sync_runs")
            )
        ).one()


async def test_an_abandoned_run_counts_only_the_partitions_it_recorded(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """Shutdown: one partition done, two left for later (not_started), one in hand when
    the run is cancelled. The abandoned run counts the one recorded partition only."""
    stop, first_done = asyncio.Event(), asyncio.Event()

    class StopAfterFirst(Progress):
        def partition_started(self, partition: Partition) -> None:
            if partition.region == FAST[0]:
                stop.set()  # this one goes on; the partitions not yet started will not

        def partition_finished(self, report: PartitionReport) -> None:
            first_done.set()

    partitions = [Partition(SLOW, "private"), *(Partition(r, "private") for r in FAST)]
    async with local_api(delayed({SLOW: 30})) as url, open_runtime(make_settings(url)) as rt:
        run = asyncio.ensure_future(
            sync_once(
                engine,
                rt.client,
                partitions,
                partition_concurrency=2,
                stop=stop,
                progress=StopAfterFirst(),
            )
        )
        await asyncio.wait_for(first_done.wait(), 10)
        await asyncio.sleep(0.3)  # the other two take the gate and report not_started
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    async with engine.connect() as conn:
        recorded = await conn.scalar(sa.text("SELECT count(*) FROM inventory.sync_partitions"))
    row = await run_row(engine)
    assert (row.status, recorded) == ("abandoned", 1)
    assert row.partitions == recorded


async def test_an_unexpected_error_in_one_partition_cancels_the_others_and_ends_the_run(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """A bug in one partition (here the caller's progress callback raises) stops its
    siblings at once and closes the run as failed, instead of leaving it running."""

    class Broken(Progress):
        def partition_started(self, partition: Partition) -> None:
            if partition.region != SLOW:
                raise RuntimeError("progress display broke")

    partitions = [Partition(SLOW, "private"), Partition(FAST[0], "private")]
    async with local_api(delayed({SLOW: 30})) as url, open_runtime(make_settings(url)) as rt:
        with pytest.raises(RuntimeError, match="progress display broke"):
            await asyncio.wait_for(sync_once(engine, rt.client, partitions, progress=Broken()), 10)
    row = await run_row(engine)
    assert (row.status, row.error_message) == ("failed", "internal error: RuntimeError")


async def test_refused_credentials_raise_the_clients_own_error(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """The AuthError sync_once raises is the client's: Retry-After and requestId kept."""

    async def refuse(request: web.Request) -> web.Response:
        body = {
            "requestId": "req-401",
            "error": {"code": 401, "status": "UNAUTHENTICATED", "message": "bad signature"},
        }
        return web.json_response(body, status=401, headers={"Retry-After": "7"})

    async with local_api(refuse) as url, open_runtime(make_settings(url)) as rt:
        with pytest.raises(AuthError) as caught:
            await sync_once(engine, rt.client, [Partition(FAST[0], "private")])
    error = caught.value
    assert (error.http_status, error.status, error.request_id) == (
        401,
        "UNAUTHENTICATED",
        "req-401",
    )
    assert error.retry_after == 7.0


class _SkewedClock(dt.datetime):
    """A replica whose wall clock is two hours fast."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> Any:
        return dt.datetime.now(tz) + dt.timedelta(hours=2)


async def test_partition_times_come_from_the_database_clock(
    engine: AsyncEngine, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the process's clock two hours off, the partition rows still lie within
    their run (both placed by the database), so the freshness guard is not moved."""
    monkeypatch.setattr("service.sync.datetime", _SkewedClock, raising=False)
    async with local_api(delayed({})) as url, open_runtime(make_settings(url)) as rt:
        await sync_once(engine, rt.client, [Partition(r, "private") for r in FAST])
    async with engine.connect() as conn:
        outside = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM inventory.sync_partitions p"
                " JOIN inventory.sync_runs r ON r.run_id = p.run_id"
                " WHERE NOT (p.started_at BETWEEN r.started_at AND p.finished_at"
                "        AND p.finished_at <= r.finished_at)"
            )
        )
        total = await conn.scalar(sa.text("SELECT count(*) FROM inventory.sync_partitions"))
    assert (total, outside) == (3, 0)
