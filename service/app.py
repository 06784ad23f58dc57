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
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import aiohttp

from service.config import Settings
from service.daemon import Daemon
from service.jdcloud.accounts import account_partitions, accounts_of
from service.jdcloud.client import ImagesClient, open_session
from service.jdcloud.listing import Partition
from service.jdcloud.signer import Credentials
from service.jdcloud.sts import RoleCredentials, StsClient
from service.logs import redact_from_now_on
from service.metrics import Metrics
from service.store import migrate
from service.store.engine import Database, open_database
from service.store.registry import register_partitions
from service.store.runs import mark_abandoned
from service.sync import AccountClient
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


def account_clients(
    settings: Settings, client: ImagesClient, session: aiohttp.ClientSession
) -> list[AccountClient]:
    """A client per configured account, in configuration order: its own key pair, or
    its role's credentials from STS (assumed with the base pair, renewed in time, the
    issued secrets redacted from the log). All share ``client``'s session and global
    limit; each has its own rate windows (the gateway counts per account)."""
    out = []
    sts: dict[Credentials, StsClient] = {}
    for account in accounts_of(settings, credentials_of(settings)):
        if account.credentials is not None:
            own = client.with_credentials(account.credentials)
        else:
            assert account.role is not None and account.base is not None
            base = account.base
            caller = sts.setdefault(
                base, StsClient(session, endpoint=settings.sts_endpoint, base=base)
            )
            role = RoleCredentials(
                caller,
                account.role,
                valid_for=settings.request_timeout,
                on_secret=redact_from_now_on,
            )
            own = client.with_credentials(role)
        out.append(AccountClient(account.name, account.regions, own))
    return out


@dataclass
class Runtime:
    settings: Settings
    database: Database
    session: aiohttp.ClientSession
    client: ImagesClient
    metrics: Metrics
    accounts: list[AccountClient] = field(default_factory=list)

    def partitions(
        self, regions: list[str] | None = None, sources: list[str] | None = None
    ) -> list[Partition]:
        """The configured partitions (DESIGN.md, Accounts), ``regions``/``sources``
        keeping only those."""
        resolved = accounts_of(self.settings, credentials_of(self.settings))
        return account_partitions(
            resolved,
            sources or self.settings.sources,
            regions=regions or None,
            named=bool(self.settings.accounts),
        )

    async def register(self, partitions: Sequence[Partition]) -> None:
        """Write the configuration (accounts and partitions) to the registry."""
        resolved = accounts_of(self.settings, credentials_of(self.settings))
        await register_partitions(
            self.database.engine,
            [(p.account_or_none, p.region, p.source) for p in partitions],
            [(a.name, a.role.role_jrn if a.role else None, a.regions) for a in resolved],
        )

    def daemon(self) -> Daemon:
        """A scheduler on these parts (not started: :meth:`Daemon.serve` starts it)."""
        return Daemon(
            self.settings,
            self.database.engine,
            self.client,
            self.session,
            self.metrics,
            accounts=self.accounts,
            partitions=self.partitions(),
        )


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
        accounts = account_clients(settings, client, session)
        runtime = Runtime(settings, database, session, client, metrics, accounts)
        metrics.initialise(
            settings.regions,
            settings.sources,
            [(p.region, p.source, p.account) for p in runtime.partitions()],
        )
        tune_garbage_collector()
        yield runtime


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
    await runtime.register(daemon.partitions)
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
