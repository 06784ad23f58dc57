"""The composition root: the service's parts, built once at start-up, in one place.

:func:`open_runtime` builds, in order, the database (engine, maybe an embedded
server), the HTTP session and the API client, and closes them in reverse order; the
CLI, the demo and the benchmark start here. :func:`run_daemon` adds the scheduler
(:class:`~service.daemon.Daemon`) and the status server (:mod:`service.web.server`)
on top: the daemon and the status server do not know each other, this module wires
the status server to the daemon's state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp

from service.config import Settings
from service.daemon import Daemon
from service.jdcloud.client import ImagesClient, open_session
from service.jdcloud.listing import Partition, partitions_of
from service.jdcloud.signer import Credentials
from service.metrics import Metrics
from service.store import migrate
from service.store.engine import Database, open_database
from service.store.registry import register_configuration
from service.store.runs import mark_abandoned
from service.web.server import StatusContext, serve_status

log = logging.getLogger(__name__)

PARTITION_CONCURRENCY = 8
"""Partitions applied at once; each holds one database connection while it runs."""

GC_THRESHOLDS = (20_000, 50, 50)
"""A sync allocates a few container objects per image, almost all freed by reference
counting: the cyclic collector runs less often (measured: bench/README.md, "Constants
and their numbers")."""


def tune_garbage_collector() -> None:
    """Freeze the objects that exist now (imports, engine, session: they live as long as
    the process) out of the collector's scans, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def credentials_of(settings: Settings) -> Credentials:
    """The API key pair of the settings; the simulator's demo pair when they have none
    (the settings refuse that for an endpoint other than a local one)."""
    if settings.access_key and settings.secret_key:
        token = settings.security_token
        return Credentials(
            settings.access_key,
            settings.secret_key.get_secret_value(),
            token.get_secret_value() if token else None,
        )
    return Credentials.demo()


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

    def daemon(self) -> Daemon:
        """A scheduler on these parts (not started: :meth:`Daemon.serve` starts it)."""
        return Daemon(self.settings, self.database.engine, self.client, self.session, self.metrics)


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
            credentials=credentials_of(settings),
            concurrency=settings.concurrency,
            rate_limit=settings.rate_limit,
            max_attempts=settings.max_attempts,
            max_url_length=settings.max_url_length,
            metrics=metrics,
        )
        tune_garbage_collector()
        yield Runtime(settings, database, session, client, metrics)


async def run_daemon(settings: Settings, *, apply_migrations: bool = False) -> int:
    """``image-sync run``: the runtime, the daemon and its status server, until
    SIGTERM/SIGINT; 0 after a clean stop. Raises DatabaseError (and its
    SchemaNotCurrent) when the database is unusable at start."""
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    daemon: Daemon | None = None
    early_stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if early_stop.is_set() or (daemon is not None and daemon.stopping):
            log.warning("second %s: exiting at once", signum.name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s received: stopping", signum.name)
        early_stop.set()
        if daemon is not None:
            daemon.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
        signals.append(signum)
    try:
        async with AsyncExitStack() as stack:
            runtime = await stack.enter_async_context(
                open_runtime(settings, apply_migrations=apply_migrations)
            )
            daemon = await _start_daemon(runtime, stack)
            if early_stop.is_set():
                daemon.request_stop()
            runtime.metrics.up.set(1)
            try:
                await daemon.serve()
            finally:
                runtime.metrics.up.set(0)
        log.info("daemon stopped")
        return 0
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _start_daemon(runtime: Runtime, stack: AsyncExitStack) -> Daemon:
    """The daemon on ``runtime``, its partitions registered, its status server listening
    (closed by ``stack``)."""
    engine = runtime.database.engine
    abandoned = await mark_abandoned(engine)
    if abandoned:
        log.info("marked %d run(s) of stopped processes as abandoned", abandoned)
    daemon = runtime.daemon()
    await register_configuration(engine, [(p.region, p.source) for p in daemon.partitions])
    address = runtime.settings.http_address
    if address is not None:
        context = StatusContext(
            engine=engine,
            settings=runtime.settings,
            metrics=runtime.metrics,
            stopping=lambda: daemon.stopping,
        )
        await stack.enter_async_context(serve_status(context, *address))
    return daemon
