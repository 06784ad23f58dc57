"""One sync: every partition listed, staged and merged; the run recorded.

:func:`sync_once` is the only function that syncs; the CLI, the scheduler, the demo
and the benchmark call it. This module runs a run: the run record and its liveness
lock, the fan-out over partitions, the abort when the credentials are refused, the
totals, log lines and metrics. Taking in a partition's pages (validation,
de-duplication, the unchanged-hash skip) is :mod:`service.ingest`'s job. Partitions
run concurrently (within a bound) and each is applied in its own transaction, so a
failure rolls back only its partition. A failed or incomplete partition never removes
anything; a complete one removes only images the API no longer returns by id. A
401/403 stops the whole run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace

from service.errors import ApiError, AuthError, DatabaseError, ImageSyncError
from service.ingest import PartitionIntake, Progress
from service.jdcloud.client import ImagesClient, RequestStats
from service.jdcloud.listing import Partition
from service.metrics import Metrics
from service.store.apply import PartitionWriter
from service.store.engine import Connection, Engine, connect, transaction
from service.store.runs import (
    PartitionReport,
    finish_run,
    mark_abandoned,
    record_partition,
    record_partitions,
    release_run,
    start_run,
)
from service.vocabulary import EVENT_TYPES, NOT_RECORDED

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncReport:
    """The outcome of one run."""

    run_id: int
    status: str
    partitions: tuple[PartitionReport, ...]
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def total(self, name: str) -> int:
        return sum(getattr(p.counts, name) for p in self.partitions)


@dataclass(frozen=True, slots=True)
class _Run:
    """What every partition of one run shares."""

    engine: Engine
    client: ImagesClient
    run_id: int
    started: float
    page_size: int
    progress: Progress
    metrics: Metrics | None
    fresh_within: Callable[[Partition], float] | None
    stop: asyncio.Event | None


async def sync_once(
    engine: Engine,
    client: ImagesClient,
    partitions: Sequence[Partition],
    *,
    page_size: int = 100,
    trigger: str = "cli",
    metrics: Metrics | None = None,
    progress: Progress | None = None,
    partition_concurrency: int = 8,
    fresh_within: Callable[[Partition], float] | None = None,
    stop: asyncio.Event | None = None,
) -> SyncReport:
    """List and apply every partition once; record the run. Never raises for API errors
    of one partition; raises :class:`AuthError` (after recording) when credentials fail
    and :class:`DatabaseError` when the run cannot be recorded at all.

    ``fresh_within(p)`` (seconds), when given, skips a partition whose last success is
    younger than that, checked under the partition's lock: the scheduler's guard against
    syncing a partition another replica has just finished. Such partitions are reported
    as ``skipped_fresh`` and not recorded. Once ``stop`` is set, partitions not yet
    started are left for a later run (reported as ``not_started``, not recorded): the
    daemon's shutdown. If the run is cancelled (shutdown), the partitions in hand roll
    back and the run is recorded as ``abandoned``.
    """
    started = time.monotonic()
    await mark_abandoned(engine)
    async with connect(engine, "cannot start a run", autocommit=True) as lock_conn:
        run_id = await start_run(lock_conn, trigger=trigger)
        try:
            log.info("run %d started: %d partitions", run_id, len(partitions))
            run = _Run(
                engine=engine,
                client=client,
                run_id=run_id,
                started=started,
                page_size=page_size,
                progress=progress or Progress(),
                metrics=metrics,
                fresh_within=fresh_within,
                stop=stop,
            )
            reports, refusal = await _fan_out(run, partitions, partition_concurrency)
            if refusal is not None:
                for report in await _record_refused(run, partitions, reports, refusal):
                    reports.append(report)
                    _finished(run, report)
            result = await _finish(run, reports, refusal)
            if refusal is not None:
                raise refusal  # the client's own error: its cause and retry_after kept
            return result
        finally:
            await release_run(lock_conn, run_id)


async def _fan_out(
    run: _Run, partitions: Sequence[Partition], concurrency: int
) -> tuple[list[PartitionReport], AuthError | None]:
    """Sync the partitions, at most ``concurrency`` at once; the reports in completion
    order, and the refusal that cut the run short (the others are cancelled then)."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(partition: Partition) -> PartitionReport:
        async with gate:
            if run.stop is not None and run.stop.is_set():
                return PartitionReport(partition, "not_started")
            return await _sync_partition(run, partition)

    tasks = [asyncio.ensure_future(one(p)) for p in partitions]
    reports: list[PartitionReport] = []
    try:
        for done in asyncio.as_completed(tasks):
            try:
                report = await done
            except AuthError as exc:
                for task in tasks:
                    task.cancel()
                return reports, exc
            reports.append(report)
            _finished(run, report)
    except BaseException as exc:
        # Shutdown (cancelled) or a bug in one partition: the partitions in hand roll
        # back and the run is closed now, not left running until mark_abandoned.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_cut_short(run, reports, exc)
        raise
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
    return reports, None


async def _close_cut_short(
    run: _Run, reports: Sequence[PartitionReport], exc: BaseException
) -> None:
    """Record a run cut short by a cancellation (``abandoned``) or a bug (``failed``)."""
    if isinstance(exc, asyncio.CancelledError):
        status, why = "abandoned", "cancelled (shutdown) before it finished"
    else:
        log.error("run %d: unexpected error", run.run_id, exc_info=exc)
        status, why = "failed", f"internal error: {type(exc).__name__}"
    with suppress(DatabaseError):
        await asyncio.shield(
            finish_run(
                run.engine, run.run_id, status=status, totals=_totals(_recorded(reports)), error=why
            )
        )


async def _finish(
    run: _Run, reports: Sequence[PartitionReport], refusal: AuthError | None
) -> SyncReport:
    """Close the run record with its status and totals; log and measure it."""
    seconds = time.monotonic() - run.started
    recorded = _recorded(reports)
    status = _run_status(recorded, auth_failed=refusal is not None)
    totals = _totals(recorded)
    error = None if refusal is None else f"the API refused the credentials: {refusal}"
    await finish_run(run.engine, run.run_id, status=status, totals=totals, error=error)
    if run.metrics:
        run.metrics.run_duration.observe(seconds)
    log.info(
        "run %d %s in %.1fs: %s",
        run.run_id,
        status,
        seconds,
        ", ".join(f"{k}={v}" for k, v in totals.items() if k != "partitions"),
    )
    return SyncReport(
        run.run_id, status, tuple(sorted(recorded, key=lambda r: r.partition)), seconds, error
    )


def _recorded(reports: Sequence[PartitionReport]) -> list[PartitionReport]:
    """The reports that have a ``sync_partitions`` row (and count in the run's totals)."""
    return [r for r in reports if r.status not in NOT_RECORDED]


def _run_status(reports: Sequence[PartitionReport], *, auth_failed: bool) -> str:
    if auth_failed:
        return "failed"
    tried = [r for r in reports if r.status != "skipped_locked"]
    bad = [r for r in tried if r.status in ("failed", "incomplete")]
    if not bad:
        return "succeeded"
    return "failed" if len(bad) == len(tried) else "partial"


def _totals(reports: Sequence[PartitionReport]) -> dict[str, int]:
    totals = {
        "partitions": len(reports),
        "partitions_failed": sum(r.status in ("failed", "incomplete") for r in reports),
        "api_requests": sum(r.api_requests for r in reports),
        "retries": sum(r.retries for r in reports),
        "images_seen": sum(r.counts.images_seen for r in reports),
    }
    for name in EVENT_TYPES:
        totals[name] = sum(getattr(r.counts, name) for r in reports)
    return totals


def _finished(run: _Run, report: PartitionReport) -> None:
    """A partition's outcome: its log line, its metrics, the progress display."""
    _observe(run.metrics, report)
    run.progress.partition_finished(report)


def _observe(metrics: Metrics | None, report: PartitionReport) -> None:
    p = report.partition
    if report.status in NOT_RECORDED:
        log.debug("partition %s %s", p, NOT_RECORDED[report.status])
        return
    line = (
        f"partition {p} {report.status} in {report.seconds:.2f}s: pages={report.pages} "
        f"requests={report.api_requests} retries={report.retries} "
        f"seen={report.counts.images_seen} created={report.counts.created} "
        f"updated={report.counts.updated} unchanged={report.counts.unchanged} "
        f"went_offline={report.counts.went_offline} came_online={report.counts.came_online} "
        f"removed={report.counts.removed} reappeared={report.counts.reappeared} "
        f"invalid={report.invalid_items}"
    )
    if report.error_message:
        line += f" error={report.error_status}: {report.error_message}"
    if report.status in ("succeeded", "skipped_locked"):
        log.info(line)
    else:
        log.warning(line)
    if metrics is None:
        return
    metrics.partitions.labels(p.region, p.source, report.status).inc()
    if report.status != "skipped_locked":
        metrics.partition_duration.labels(p.region, p.source).observe(report.seconds)
    for event_type, count in report.counts.events().items():
        if count:
            metrics.events.labels(event_type).inc(count)


async def _sync_partition(run: _Run, partition: Partition) -> PartitionReport:
    """One partition in its own transaction; its outcome, recorded. Raises only
    :class:`AuthError` (the run stops) and cancellation."""
    started = time.monotonic()
    stats = RequestStats()
    intake = PartitionIntake(
        run.client, partition, page_size=run.page_size, stats=stats, progress=run.progress
    )
    run.progress.partition_started(partition)
    failure: tuple[str, str] | None = None
    try:
        async with transaction(run.engine) as conn:
            report = await _apply_partition(run, conn, partition, intake)
            if report.status in ("succeeded", "incomplete"):
                report = replace(report, seconds=time.monotonic() - started)
                await record_partition(conn, run.run_id, report)
    except AuthError:
        raise
    except ApiError as exc:
        status = exc.status or (f"HTTP_{exc.http_status}" if exc.http_status else "API_ERROR")
        failure = (status, exc.describe())
    except ImageSyncError as exc:
        failure = ("DATABASE", str(exc))
    if failure is not None:
        report = PartitionReport(
            partition,
            "failed",
            pages=stats.pages,
            api_requests=stats.requests,
            retries=stats.retries,
            invalid_items=intake.invalid if failure[0] != "DATABASE" else 0,
            error_status=failure[0],
            error_message=failure[1],
        )
    report = replace(report, seconds=time.monotonic() - started)
    if report.status in ("failed", "skipped_locked"):
        await _record_outside(run, report)
    return report


async def _apply_partition(
    run: _Run, conn: Connection, partition: Partition, intake: PartitionIntake
) -> PartitionReport:
    """Lock, check freshness, take in the pages and merge them, on ``conn`` (in the
    partition's transaction); the report, not yet recorded."""
    writer = PartitionWriter(conn, region=partition.region, source=partition.source)
    if not await writer.try_lock():
        return PartitionReport(partition, "skipped_locked")
    if run.fresh_within is not None and await writer.succeeded_within(run.fresh_within(partition)):
        return PartitionReport(partition, "skipped_fresh")
    await writer.open()
    taken = await intake.take_in(writer)
    counts = await writer.merge(
        run_id=run.run_id, remove_missing=taken.complete, keep_ids=taken.keep_ids
    )
    error_status, error_message = taken.problem()
    stats = intake.stats
    return PartitionReport(
        partition,
        "succeeded" if taken.complete else "incomplete",
        counts,
        pages=stats.pages,
        api_requests=stats.requests,
        retries=stats.retries,
        total_count=taken.total_count,
        invalid_items=taken.invalid,
        error_status=error_status,
        error_message=error_message,
    )


async def _record_refused(
    run: _Run,
    partitions: Sequence[Partition],
    reports: Sequence[PartitionReport],
    error: AuthError,
) -> list[PartitionReport]:
    """Record ``failed`` with the API's refusal every partition of the run that has no
    outcome yet (the one refused, those cut short, those never started), so health,
    status and alerts turn red in this tick rather than going stale in three intervals."""
    status = error.status or f"HTTP_{error.http_status}"
    message = f"the API refused the credentials: {error.describe()}"
    done = {r.partition for r in reports}
    refused = [
        PartitionReport(
            p,
            "failed",
            error_status=status,
            error_message=message,
            seconds=time.monotonic() - run.started,  # from the run's start: they waited that long
        )
        for p in partitions
        if p not in done
    ]
    try:
        async with transaction(run.engine) as conn:
            await record_partitions(conn, run.run_id, refused)
    except DatabaseError as exc:
        log.error("could not record the partitions refused in run %d: %s", run.run_id, exc)
    return refused


async def _record_outside(run: _Run, report: PartitionReport) -> None:
    """Record a failed or skipped partition in its own transaction (best effort)."""
    try:
        async with transaction(run.engine) as conn:
            await record_partition(conn, run.run_id, report)
    except DatabaseError as exc:
        log.error("could not record partition %s: %s", report.partition, exc)
