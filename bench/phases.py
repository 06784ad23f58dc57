"""The measured phases, each run in a subprocess: ``python -m bench.phases PHASE JSON``.

A phase prints one JSON object on its last stdout line: its wall time (measured
inside, so interpreter start-up and imports are not counted), what it did, and the
process's peak RSS (``ru_maxrss``).

* ``floor``: every listing of every partition fetched with the service's own client
  (same page size, same concurrency, page 1 then the rest concurrently) and decoded;
  the items are counted and dropped. Nothing is normalised or written.
* ``load_floor``: the same pages fetched with the same client, normalised with the
  service's own :func:`service.normalize.normalize_image`, and binary-COPYed straight
  into the empty copies of ``images``, ``image_disks`` and ``image_events`` in schema
  ``load_floor`` (same keys and indexes: :func:`bench.run.create_load_floor`), with a
  ``created`` event per image carrying its history document. No staging, change
  detection, merge or extra API calls: the least a first sync must do.
* ``sync``: one :func:`service.sync.sync_once` over every partition, as the CLI runs it.
* ``baseline``: :mod:`bench.baseline`, the SDK script.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
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


async def fetch_all(
    settings: Settings, sink: Callable[[Any], Callable[[list[Any]], Awaitable[None]]]
) -> dict[str, Any]:
    """Every listing of every partition through the service's client, each page handed
    to ``sink(listing)``; the wall time of the fetching (and sinking) alone."""
    from service.app import credentials_of
    from service.jdcloud.client import ImagesClient, RequestStats, open_session
    from service.jdcloud.listing import RUN_PAGES_AHEAD, list_pages, partitions_of

    window = asyncio.Semaphore(RUN_PAGES_AHEAD)  # as sync_once bounds a run's pages ahead
    listings = [
        listing
        for partition in partitions_of(settings.regions, settings.sources)
        for listing in partition.listings()
    ]
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
                list_pages(
                    client, listing, page_size=settings.page_size, stats=stats,
                    on_page=sink(listing), window=window,
                )
                for listing in listings
            )
        )  # fmt: skip
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "pages": stats.pages, "requests": stats.requests}


async def floor(config: dict[str, Any]) -> dict[str, Any]:
    items = 0

    async def drop(images: list[Any]) -> None:
        nonlocal items
        items += len(images)

    result = await fetch_all(settings_for(config), lambda listing: drop)
    return {**result, "items": items}


async def load_floor(config: dict[str, Any]) -> dict[str, Any]:
    import asyncpg
    import orjson

    from service.jdcloud.listing import partitions_of
    from service.normalize import (
        DISK_COLUMNS,
        EXTRA_COLUMNS,
        IMAGE_COLUMNS,
        KNOWN_FIELDS,
        ImageRow,
        image_record,
        normalize_image,
    )

    settings = settings_for(config)
    doc_fields = [c for c in IMAGE_COLUMNS if c not in ("region_id", "image_id", "content_hash")]
    image_columns = (*IMAGE_COLUMNS, "raw", "first_seen_at", "last_changed_at")
    event_columns = (
        "occurred_at", "sync_run_id", "region_id", "image_id", "image_source", "event_type",
        "changed_fields", "after", "baseline",
    )  # fmt: skip
    items = 0
    now = datetime.now(UTC)
    # As the sync: one connection and one transaction per partition, its listings'
    # pages written one at a time (a commit per page would measure fsyncs instead).
    partitions: dict[tuple[str, str], tuple[Any, Any, asyncio.Lock]] = {}

    async def open_partition(key: tuple[str, str]) -> None:
        conn = await asyncpg.connect(config["database_url"])
        transaction = conn.transaction()
        await transaction.start()
        partitions[key] = (conn, transaction, asyncio.Lock())

    async def partition_conn(listing: Any) -> tuple[Any, asyncio.Lock]:
        conn, _, lock = partitions[(listing.region, listing.source)]
        return conn, lock

    def document(row: ImageRow) -> str:
        record = dict(zip(IMAGE_COLUMNS, image_record(row), strict=False))
        doc: dict[str, Any] = {name: record[name] for name in doc_fields}
        doc.update(dict.fromkeys(EXTRA_COLUMNS))
        doc["disks"] = [dict(zip(DISK_COLUMNS, _disk(d), strict=True)) for d in row.disks]
        raw = orjson.loads(row.raw_json)
        doc["extra"] = {k: v for k, v in raw.items() if k not in KNOWN_FIELDS}
        return orjson.dumps(doc).decode()

    async def write(listing: Any, images: list[Any]) -> None:
        nonlocal items
        rows = [
            normalize_image(item, region_id=listing.region, image_source=listing.source)
            for item in images
        ]
        items += len(rows)
        conn, lock = await partition_conn(listing)
        async with lock:
            await conn.copy_records_to_table(
                "images",
                schema_name="load_floor",
                columns=image_columns,
                records=[(*image_record(r), now, now) for r in rows],
            )
            await conn.copy_records_to_table(
                "image_disks",
                schema_name="load_floor",
                columns=("region_id", "image_id", *DISK_COLUMNS),
                records=[(r.region_id, r.image_id, *_disk(d)) for r in rows for d in r.disks],
            )
            await conn.copy_records_to_table(
                "image_events",
                schema_name="load_floor",
                columns=event_columns,
                records=[
                    (
                        now,
                        run_id,
                        r.region_id,
                        r.image_id,
                        r.image_source,
                        "created",
                        [],
                        document(r),
                        True,
                    )
                    for r in rows
                ],
            )

    first = await asyncpg.connect(config["database_url"])
    try:
        run_id = await first.fetchval(
            "INSERT INTO inventory.sync_runs (started_at, status, trigger, host, pid)"
            " VALUES (now(), 'running', 'bench', 'load-floor', pg_backend_pid())"
            " RETURNING run_id"
        )
    finally:
        await first.close()
    try:
        # Connected before the clock starts (the sync's pool connects as it goes, at most
        # eight at once; twenty connects one after the other took seconds here).
        await asyncio.gather(
            *(
                open_partition((p.region, p.source))
                for p in partitions_of(settings.regions, settings.sources)
            )
        )
        started = time.perf_counter()
        result = await fetch_all(settings, lambda listing: lambda images: write(listing, images))
        for _, transaction, _ in partitions.values():
            await transaction.commit()
    finally:
        for conn, _, _ in partitions.values():
            await conn.close()
    return {**result, "seconds": time.perf_counter() - started, "items": items}


def _disk(d: Any) -> tuple[Any, ...]:
    return tuple(getattr(d, c) for c in d.__slots__)


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
    elif phase == "load_floor":
        result = asyncio.run(load_floor(config))
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
