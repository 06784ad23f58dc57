"""The measured phases, each run in a subprocess: ``python -m bench.phases PHASE JSON``.

A phase prints one JSON object on its last stdout line: its wall time (measured
inside, so interpreter start-up and imports are not counted), what it did, and the
process's peak RSS (``ru_maxrss``).

* ``floor``: every listing of every partition fetched with the service's own client
  (same page size, same concurrency, page 1 then the rest concurrently) and decoded;
  the items are counted and dropped. Nothing is normalised or written.
* ``sync``: one :func:`service.sync.sync_once` over every partition, as the CLI runs it.
* ``baseline``: :mod:`bench.baseline`, the SDK script.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from service.config import Settings, load_settings


def settings_for(config: dict[str, Any]) -> Settings:
    scenario = config["scenario"]
    return load_settings(
        {
            "DATABASE_URL": config["database_url"],
            "JDCLOUD_ENDPOINT": config["endpoint"],
            "IMAGE_SYNC_CONCURRENCY": str(scenario["concurrency"]),
            "IMAGE_SYNC_PAGE_SIZE": str(scenario["page_size"]),
            "IMAGE_SYNC_RATE_LIMIT": "0",
            "IMAGE_SYNC_HTTP": "off",
        }
    )


async def floor(config: dict[str, Any]) -> dict[str, Any]:
    from service.app import credentials_of
    from service.jdcloud.client import ImagesClient, RequestStats, open_session
    from service.jdcloud.listing import list_pages, partitions_of

    settings = settings_for(config)
    listings = [
        listing
        for partition in partitions_of(settings.regions, settings.sources)
        for listing in partition.listings()
    ]
    items = 0

    async def drop(images: list[Any]) -> None:
        nonlocal items
        items += len(images)

    async with open_session(
        connect_timeout=settings.connect_timeout,
        request_timeout=settings.request_timeout,
        limit=settings.concurrency,
    ) as session:
        client = ImagesClient(
            session,
            endpoint=settings.endpoint,
            credentials=credentials_of(settings),
            concurrency=settings.concurrency,
            rate_limit=0,
        )
        stats = RequestStats()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                list_pages(client, listing, page_size=settings.page_size, stats=stats, on_page=drop)
                for listing in listings
            )
        )
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "pages": stats.pages, "requests": stats.requests, "items": items}


async def sync(config: dict[str, Any]) -> dict[str, Any]:
    from service.app import open_runtime
    from service.sync import sync_once

    settings = settings_for(config)
    profile = config.get("profile")
    profile_text = None
    async with open_runtime(settings) as rt:
        profiler = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled", interval=0.002)
            profiler.start()
        started = time.perf_counter()
        report = await sync_once(
            rt.database.engine,
            rt.client,
            rt.partitions(),
            page_size=settings.page_size,
            trigger="bench",
            metrics=rt.metrics,
        )
        seconds = time.perf_counter() - started
        if profiler is not None:
            profiler.stop()
            profile_text = profiler.output_text(unicode=True, color=False)
    totals = {
        name: report.total(name)
        for name in (
            "images_seen",
            "created",
            "updated",
            "unchanged",
            "went_offline",
            "came_online",
            "removed",
            "reappeared",
        )
    }
    return {
        "seconds": seconds,
        "profile_text": profile_text,
        "status": report.status,
        "requests": sum(p.api_requests for p in report.partitions),
        "pages": sum(p.pages for p in report.partitions),
        "totals": totals,
        "partitions": {
            str(p.partition): {"status": p.status, "seconds": round(p.seconds, 3)}
            for p in report.partitions
        },
    }


def main(argv: list[str]) -> int:
    phase, raw = argv
    config = json.loads(raw)
    if phase == "floor":
        result = asyncio.run(floor(config))
    elif phase == "sync":
        result = asyncio.run(sync(config))
        profile_text = result.pop("profile_text")
        if profile_text:
            Path(config["profile"]).write_text(profile_text)
    elif phase == "baseline":
        from bench.baseline import run_baseline

        result = run_baseline(config)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the whole process, start-up too
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
