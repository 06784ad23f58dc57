"""The service's parts, built once at start-up and owned by one object.

:func:`open_runtime` builds, in order, the database (engine, maybe an embedded
server), the HTTP session and the API client, and closes them in reverse order.
The CLI, the daemon, the demo and the benchmark all start here.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp

from service.config import Settings
from service.jdcloud.client import ImagesClient, open_session
from service.metrics import Metrics
from service.store import migrate
from service.store.engine import Database, open_database
from service.sync import Partition, partitions_of

PARTITION_CONCURRENCY = 8
"""Partitions applied at once; each holds one database connection while it runs."""

GC_THRESHOLDS = (20_000, 50, 50)
"""A sync allocates a few container objects per image (decoded JSON), almost all freed
by reference counting; at the default (700, 10, 10) the cyclic collector ran every few
pages and rescanned the start-up objects. Measured on the benchmark's first sync:
process CPU 6.6 -> 5.8 s with these thresholds and the start-up objects frozen."""


def tune_garbage_collector() -> None:
    """Freeze the objects that exist now (imports, engine, session: they live as long as
    the process) out of the collector's scans, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class Runtime:
    settings: Settings
    database: Database
    session: aiohttp.ClientSession
    client: ImagesClient
    metrics: Metrics

    def partitions(
        self, regions: list[str] | None = None, sources: list[str] | None = None
    ) -> list[Partition]:
        return partitions_of(regions or self.settings.regions, sources or self.settings.sources)


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    apply_migrations: bool = False,
    check_schema: bool = True,
) -> AsyncIterator[Runtime]:
    """Everything a sync needs; raises DatabaseError / SchemaNotCurrent with one clear line."""
    async with AsyncExitStack() as stack:
        database = await stack.enter_async_context(
            open_database(settings, pool_size=PARTITION_CONCURRENCY + 2)
        )
        if apply_migrations:
            await migrate.upgrade(database.engine)
        elif check_schema:
            await migrate.ensure_current(database.engine)
        session = await stack.enter_async_context(
            open_session(
                connect_timeout=settings.connect_timeout,
                request_timeout=settings.request_timeout,
                limit=settings.concurrency,
            )
        )
        metrics = metrics or Metrics()
        metrics.initialise(settings.regions, settings.sources)
        client = ImagesClient(
            session,
            endpoint=settings.endpoint,
            credentials=settings.credentials(),
            concurrency=settings.concurrency,
            rate_limit=settings.rate_limit,
            max_attempts=settings.max_attempts,
            max_url_length=settings.max_url_length,
            metrics=metrics,
        )
        tune_garbage_collector()
        yield Runtime(settings, database, session, client, metrics)
