"""The client's limits, measured where the gateway would measure them: at the simulator.

* ``IMAGE_SYNC_RATE_LIMIT``: no one-second window (sliding, over arrival times) sees more
  than that many requests to one region;
* ``IMAGE_SYNC_CONCURRENCY``: never more requests in flight at the server, all regions
  together. With a fixed latency L and no jitter, a request is in flight at the server
  for at least L after it arrives, and a slot is free again only after its response: so
  the number of arrivals within any span shorter than L is the number in flight.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.simulator import Catalogue, running_simulator, simulator_in_thread
from service.sync import sync_once
from tests.test_sync import assert_matches_catalogue


def max_in_window(times: Sequence[float], span: float) -> int:
    """Most arrivals within any half-open window ``[t, t + span)``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= span:
            start += 1
        best = max(best, end - start + 1)
    return best


async def test_rate_limit_holds_per_region_at_the_simulator(
    engine: AsyncEngine, make_settings: Any
) -> None:
    catalogue = Catalogue(
        seed=8, images=240, regions=("cn-north-1", "cn-east-1"), sources=("private", "shared")
    )
    # The simulator throttles like the gateway, at the same rate: the client must never
    # be told RATE_LIMIT, because it never sends the sixth request of a second. It runs
    # in a thread of its own, as the gateway is another machine: arrival times must not
    # include the stalls of the client's event loop (which also does the database work).
    with simulator_in_thread(catalogue=catalogue, faults={"rate_limit": 5}) as sim:
        settings = make_settings(
            sim.url,
            IMAGE_SYNC_RATE_LIMIT="5",
            IMAGE_SYNC_PAGE_SIZE="10",
            IMAGE_SYNC_CONCURRENCY="16",
            IMAGE_SYNC_REGIONS="cn-north-1,cn-east-1",
            IMAGE_SYNC_SOURCES="private,shared",
        )
        started = time.monotonic()
        async with open_runtime(settings) as rt:
            report = await sync_once(engine, rt.client, rt.partitions(), page_size=10)
        elapsed = time.monotonic() - started
    log = list(sim.requests)
    await assert_matches_catalogue(engine, sim.catalogue)
    assert report.ok, report
    by_region: dict[str, list[float]] = defaultdict(list)
    for entry in log:
        by_region[entry["region"]].append(entry["time"])
    assert sorted(by_region) == ["cn-east-1", "cn-north-1"]
    busiest = {region: max_in_window(times, 1.0) for region, times in by_region.items()}
    assert all(len(times) >= 12 for times in by_region.values())
    assert busiest == {"cn-east-1": 5, "cn-north-1": 5}, busiest  # at the limit, not above
    assert [e for e in log if e["status"] != 200] == []
    assert sum(p.retries for p in report.partitions) == 0
    assert elapsed >= 2.0  # 12+ requests per region at 5/s


async def test_global_concurrency_holds_at_the_simulator(
    engine: AsyncEngine, make_settings: Any
) -> None:
    latency = 0.04
    async with running_simulator(
        seed=9, images=800, faults={"latency_ms": latency * 1000, "jitter_ms": 0}
    ) as sim:
        settings = make_settings(sim.url, IMAGE_SYNC_CONCURRENCY="3", IMAGE_SYNC_PAGE_SIZE="10")
        async with open_runtime(settings) as rt:
            report = await sync_once(engine, rt.client, rt.partitions(), page_size=10)
        log = list(sim.requests)
        await assert_matches_catalogue(engine, sim.catalogue)
    assert report.ok, report
    assert len(log) > 60 and len({e["region"] for e in log}) == 4
    # Partitions run 8 at a time and each fetches its pages concurrently, so demand is far
    # above 3: the limit is reached, and never exceeded.
    assert max_in_window([e["time"] for e in log], latency * 0.95) == 3
