"""``image-sync run``: the scheduler, the replicas' coordination, and the lifecycle.

One :class:`Daemon` owns an APScheduler ``AsyncIOScheduler`` that ticks every
*tick interval* (the smallest of the configured sources' intervals) with a little
jitter, ``max_instances=1`` and ``coalesce=True``, and once right after start.

Coordination between replicas lives in PostgreSQL only:

- Ticks are aligned to multiples of the tick interval since the Unix epoch, so the
  replicas of one deployment tick together (within the jitter and their clock skew).
- A scheduled tick belongs to the boundary ``B`` it follows. A source's interval is
  rounded up to a whole number ``n`` of ticks; in the tick of ``B`` a partition is
  *due* unless a success of it finished after ``B - (n - 1) * tick``
  (:meth:`Daemon.due_after`): with ``n = 1``, unless it was synced in this very tick.
  A sync of the previous tick that takes almost a whole tick still leaves it due.
- The start-up tick is not aligned: there a partition is due when its last success is
  older than its interval, so restarting a replica does not resync fresh partitions.
- :func:`~service.sync.sync_once` takes each partition's advisory lock and checks that
  again under it (``fresh_within``), so of N replicas ticking together one syncs each
  due partition and the others skip it (``skipped_locked`` while it is held, silently
  once it is done), however long the sync takes within the tick. A replica that dies
  loses its locks with its connections; the partition is due again on the next tick of
  any replica. The replicas' clocks must agree (NTP) to well under the time a
  partition takes to sync, or a partition may occasionally be synced twice in a tick.

Lifecycle: SIGTERM/SIGINT stop the scheduler and tell the run in hand to start no
more partitions; the partitions in hand get ``grace_period`` seconds to finish, then
the run is cancelled (their transactions roll back, the run is recorded
``abandoned``). :func:`service.app.run_daemon` builds the daemon on the runtime, with
the status server beside it, and owns the signals, the pool and the HTTP session.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from service.config import Settings
from service.errors import AuthError, DatabaseError, SchemaNotCurrent
from service.jdcloud.client import ImagesClient
from service.jdcloud.listing import Partition, partitions_of
from service.metrics import Metrics
from service.store import migrate
from service.store.engine import Engine
from service.store.feed import listen
from service.store.runs import last_successes, prune_runs
from service.sync import AccountClient, SyncReport, sync_once
from service.webhooks import Dispatcher, subscribers_of

__all__ = ["Daemon", "DaemonState"]

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.1
"""Jitter added to each tick, as a fraction of the tick interval ..."""
MAX_JITTER = 30.0
"""... and at most this many seconds."""


class DaemonState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _log_refusals(exc: AuthError) -> None:
    """One line per account whose credentials the API refused in a tick."""
    for account, error in (exc.by_account or {"": exc}).items():
        where = f" of account {account}" if account else ""
        log.error("tick: the API refused the credentials%s: %s", where, error)


class Daemon:
    """Scheduled syncs with the parts of a runtime (:func:`service.app.open_runtime`),
    which the caller owns and closes."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: ImagesClient,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        accounts: Sequence[AccountClient] = (),
        partitions: Sequence[Partition] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.accounts = tuple(accounts)
        """The configured accounts' clients (DESIGN.md, Accounts); none: ``client``
        lists every partition."""
        self.metrics = metrics
        self.partitions: list[Partition] = (
            list(partitions)
            if partitions is not None
            else partitions_of(settings.regions, settings.sources)
        )
        self.tick_interval = settings.tick_interval
        self.jitter = min(self.tick_interval * JITTER_FRACTION, MAX_JITTER)
        self.state = DaemonState.CREATED
        self.schema_ok = True
        self._stop = asyncio.Event()
        self._draining = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._cancelling_tick = False  # set by the drain just before it cancels the tick
        self._startup_tick: asyncio.Task[None] | None = None
        self._ticks = 0
        subscribers = subscribers_of(self.settings)
        self.webhooks = (
            Dispatcher(
                engine,
                session,
                subscribers,
                max_attempts=settings.webhook_max_attempts,
                timeout=settings.webhook_timeout,
                metrics=metrics,
            )
            if subscribers
            else None
        )
        self._wake_webhooks = asyncio.Event()

    # -- scheduling -------------------------------------------------------------------

    def interval_for(self, partition: Partition) -> float:
        return self.settings.interval_for(partition.source)

    def ticks_per_sync(self, partition: Partition) -> int:
        """The partition's interval in ticks, rounded up: never synced more often."""
        return max(1, math.ceil(self.interval_for(partition) / self.tick_interval - 1e-9))

    def due_after(self, partition: Partition, now: float, *, aligned: bool = True) -> float:
        """Unix time: in a tick at ``now``, a success of ``partition`` that finished after
        this makes it not due. ``aligned=False`` for the start-up tick."""
        if not aligned:
            return now - self.interval_for(partition)
        boundary = math.floor(now / self.tick_interval) * self.tick_interval
        return boundary - (self.ticks_per_sync(partition) - 1) * self.tick_interval

    async def due_partitions(self, cutoffs: dict[Partition, float]) -> list[Partition]:
        """The configured partitions whose last success finished before their cutoff."""
        last = await last_successes(self.engine)
        return [p for p in self.partitions if (at := last.get(p)) is None or at <= cutoffs[p]]

    async def tick(self, *, aligned: bool = True) -> SyncReport | None:
        """One tick: sync the due partitions. Never raises for expected failures (the
        next tick retries); returns the run's report, or None when nothing ran."""
        if self._stop.is_set():
            return None
        engine = self.engine
        now = time.time()
        cutoffs = {p: self.due_after(p, now, aligned=aligned) for p in self.partitions}

        def fresh_within(partition: Partition) -> float:
            return time.time() - cutoffs[partition]

        try:
            await migrate.ensure_current(engine)
            self.schema_ok = True
            pruned = await prune_runs(engine, self.settings.keep_runs_days)
            if pruned:
                log.info(
                    "pruned %d run(s) older than %d days (IMAGE_SYNC_KEEP_RUNS_DAYS)",
                    pruned,
                    self.settings.keep_runs_days,
                )
            due = await self.due_partitions(cutoffs)
        except SchemaNotCurrent as exc:
            if self.schema_ok:
                log.error("tick: syncs paused: %s", exc)
            self.schema_ok = False
            return None
        except DatabaseError as exc:
            log.error("tick: database unavailable: %s", exc)
            return None
        if self._stop.is_set():
            return None
        if not due:
            log.info("tick: no partition due (%d configured)", len(self.partitions))
            return None
        log.info("tick: %d of %d partitions due", len(due), len(self.partitions))
        try:
            report = await sync_once(
                engine,
                self.client,
                due,
                accounts=self.accounts,
                page_size=self.settings.page_size,
                trigger="schedule",
                metrics=self.metrics,
                fresh_within=fresh_within,
                stop=self._draining,
            )
        except AuthError as exc:
            _log_refusals(exc)  # recorded already; the other accounts' commits are in
            self._wake_webhooks.set()
            return None
        except DatabaseError as exc:
            log.error("tick: %s", exc)
            return None
        self._wake_webhooks.set()
        return report

    async def _scheduled_tick(self) -> None:
        """The scheduler's job: a tick, tracked so that shutdown can wait for it."""
        if self._tick_task is not None and not self._tick_task.done():
            log.info("tick skipped: the previous tick is still running")
            return
        self._tick_task = asyncio.current_task()
        self._ticks += 1
        try:
            if self._ticks > 1 and self.jitter:
                # Jitter after the boundary, never before it, and never accumulated: the
                # trigger itself fires exactly on the boundaries.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), random.uniform(0, self.jitter))
                if self._stop.is_set():
                    return
            await self.tick(aligned=self._ticks > 1)
        except asyncio.CancelledError:
            if not self._cancelling_tick:
                raise
            # The drain's own cancel once the grace is over: the shutdown working, not
            # an error for the scheduler to report. The task ends normally.
            log.info("tick cancelled: the daemon is stopping")
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception:  # a bug; the daemon keeps ticking and says so
            log.exception("tick failed unexpectedly")
        finally:
            self._tick_task = None

    def _start_scheduler(self) -> AsyncIOScheduler:
        # Align tick boundaries on the epoch so the replicas of a deployment tick together.
        now = time.time()
        aligned = math.floor(now / self.tick_interval) * self.tick_interval
        # No APScheduler jitter: it adds to the previous (jittered) fire time, so ticks
        # would drift off the boundaries; the tick applies its own jitter instead.
        trigger = IntervalTrigger(
            seconds=self.tick_interval,
            start_date=datetime.fromtimestamp(aligned, UTC),
            timezone=UTC,
        )
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            self._scheduled_tick,
            trigger,
            id="sync",
            name="sync due partitions",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        scheduler.start()
        # The start-up tick, right away (a `next_run_time` on the job would shift every
        # later tick off the boundaries).
        self._startup_tick = asyncio.ensure_future(self._scheduled_tick())
        return scheduler

    async def _serve_webhooks(self, dispatcher: Dispatcher) -> None:
        """Delivery rounds after each tick, on each NOTIFY of a commit, and every tick
        interval (a failing subscriber is retried then), until the daemon stops."""
        relay = asyncio.ensure_future(self._relay_notifications())
        try:
            await dispatcher.run(self._stop, self._wake_webhooks, self.tick_interval)
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def _relay_notifications(self) -> None:
        while not self._stop.is_set():
            try:
                async with listen(self.engine) as queue:
                    while True:
                        await queue.get()
                        self._wake_webhooks.set()
            except DatabaseError as exc:
                log.warning("webhooks: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.tick_interval)

    # -- lifecycle --------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new work; :meth:`serve` then drains and returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Tick until :meth:`request_stop`; then drain the run in hand within the grace."""
        if self.state is not DaemonState.CREATED:
            raise RuntimeError(f"the daemon cannot serve twice (it is {self.state.value})")
        self.state = DaemonState.RUNNING
        self._scheduler = self._start_scheduler()
        sources = ", ".join(
            f"{s}={self.settings.interval_for(s):g}s" for s in self.settings.sources
        )
        log.info(
            "daemon started: %d partitions, tick every %gs (jitter up to %.1fs), intervals %s",
            len(self.partitions),
            self.tick_interval,
            self.jitter,
            sources,
        )
        webhooks = (
            asyncio.ensure_future(self._serve_webhooks(self.webhooks)) if self.webhooks else None
        )
        try:
            await self._stop.wait()
        finally:
            self.state = DaemonState.STOPPING
            if webhooks is not None:
                # A batch in flight is not acknowledged: it is delivered again later.
                webhooks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await webhooks
            # Pause first: shutting the scheduler down would cancel the tick in hand.
            self._scheduler.pause()
            await self._drain()
            if self._startup_tick is not None and not self._startup_tick.done():
                self._startup_tick.cancel()  # it never began: the drain found no tick
                with contextlib.suppress(asyncio.CancelledError):
                    await self._startup_tick
            self._scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # the scheduler shuts down on the loop's next turn
            self.state = DaemonState.STOPPED

    async def _drain(self) -> None:
        self._draining.set()
        task = self._tick_task
        if task is None or task.done():
            log.info("daemon stopping: no sync in progress")
            return
        grace = self.settings.grace_period
        log.info("daemon stopping: waiting up to %gs for the partitions in hand", grace)
        done, _ = await asyncio.wait({task}, timeout=grace)
        if done:
            log.info("daemon stopping: the run in hand finished")
            return
        log.warning("daemon stopping: grace period over; cancelling the run in hand")
        self._cancelling_tick = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
