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
``abandoned``). The pool and the HTTP session close and :func:`run_daemon` returns 0.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import random
import signal
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from service.config import Settings
from service.errors import AuthError, DatabaseError, SchemaNotCurrent
from service.metrics import Metrics
from service.runtime import Runtime, open_runtime
from service.store import migrate
from service.store.engine import describe_error
from service.store.feed import listen
from service.store.registry import register_configuration
from service.store.runs import mark_abandoned, prune_runs
from service.sync import Partition, SyncReport, sync_once
from service.webhooks import Dispatcher, subscribers_of

__all__ = ["Daemon", "DaemonState", "run_daemon"]

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.1
"""Jitter added to each tick, as a fraction of the tick interval ..."""
MAX_JITTER = 30.0
"""... and at most this many seconds."""
LAST_SUCCESS_SQL = """
SELECT region_id, image_source,
       extract(epoch FROM max(finished_at))::double precision AS last_success
  FROM inventory.sync_partitions
 WHERE status = 'succeeded'
 GROUP BY region_id, image_source
"""


class DaemonState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon:
    """Scheduled syncs on one :class:`~service.runtime.Runtime` (which the caller owns)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self.partitions: list[Partition] = runtime.partitions()
        self.tick_interval = min(self.settings.interval_for(s) for s in self.settings.sources)
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
                runtime.database.engine,
                runtime.session,
                subscribers,
                max_attempts=self.settings.webhook_max_attempts,
                timeout=self.settings.webhook_timeout,
                metrics=runtime.metrics,
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
        async with self.runtime.database.engine.connect() as conn:
            rows = (await conn.execute(sa.text(LAST_SUCCESS_SQL))).all()
        last = {(r.region_id, r.image_source): r.last_success for r in rows}
        return [
            p
            for p in self.partitions
            if (at := last.get((p.region, p.source))) is None or at <= cutoffs[p]
        ]

    async def tick(self, *, aligned: bool = True) -> SyncReport | None:
        """One tick: sync the due partitions. Never raises for expected failures (the
        next tick retries); returns the run's report, or None when nothing ran."""
        if self._stop.is_set():
            return None
        engine = self.runtime.database.engine
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
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            log.error("tick: database unavailable: %s", describe_error(exc, str(engine.url)))
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
                self.runtime.client,
                due,
                page_size=self.settings.page_size,
                trigger="schedule",
                metrics=self.runtime.metrics,
                fresh_within=fresh_within,
                stop=self._draining,
            )
        except AuthError as exc:
            log.error("tick: the API refused the credentials: %s", exc)
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
        engine = self.runtime.database.engine
        while not self._stop.is_set():
            try:
                async with listen(engine) as queue:
                    while True:
                        await queue.get()
                        self._wake_webhooks.set()
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("webhooks: cannot LISTEN: %s", describe_error(exc, str(engine.url)))
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


async def run_daemon(settings: Settings, *, apply_migrations: bool = False) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean stop. Raises DatabaseError (and its
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
    metrics = Metrics()
    try:
        async with AsyncExitStack() as stack:
            runtime = await stack.enter_async_context(
                open_runtime(settings, metrics=metrics, apply_migrations=apply_migrations)
            )
            abandoned = await _mark_abandoned(runtime)
            if abandoned:
                log.info("marked %d run(s) of stopped processes as abandoned", abandoned)
            daemon = Daemon(runtime)
            await register_configuration(
                runtime.database.engine, [(p.region, p.source) for p in daemon.partitions]
            )
            if early_stop.is_set():
                daemon.request_stop()
            address = settings.http_address
            if address is not None:
                from service.web.server import start_status_server

                await stack.enter_async_context(start_status_server(daemon, *address))
            metrics.up.set(1)
            try:
                await daemon.serve()
            finally:
                metrics.up.set(0)
        log.info("daemon stopped")
        return 0
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _mark_abandoned(runtime: Runtime) -> int:
    engine = runtime.database.engine
    try:
        return await mark_abandoned(engine)
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DatabaseError(
            f"cannot check for abandoned runs: {describe_error(exc, str(engine.url))}"
        ) from None
