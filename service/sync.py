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
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace

from service.errors import ApiError, AuthError, DatabaseError, ImageSyncError
from service.ingest import PartitionIntake, Progress
from service.jdcloud.client import ImagesClient, RequestStats
from service.jdcloud.listing import RUN_PAGES_AHEAD, Partition
from service.metrics import Metrics
from service.store.apply import PartitionWriter
from service.store.engine import Connection, Engine, connect, transaction
from service.store.runs import (
    PartitionReport,
    finish_run,
    mark_abandoned,
    record_partition,
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
class AccountClient:
    """One configured account as a run uses it: its name, its regions (config order) and
    the API client signing with its credentials."""

    name: str
    regions: tuple[str, ...]
    client: ImagesClient


MAX_MERGE_ATTEMPTS = 3
"""Times a partition runs when its transaction meets a deadlock or serialization failure
(merges of account partitions that share images): retried, never a failure before."""


@dataclass(frozen=True, slots=True)
class _Run:
    """What every partition of one run shares."""

    engine: Engine
    clients: Mapping[str, ImagesClient]
    """Account name -> its client (``""``: the one client of a caller naming no account)."""
    listers: Mapping[str, tuple[str, ...]]
    """Region -> the accounts covering it, in configuration order: who lists its
    catalogue partitions (the next one when the first is refused)."""
    run_id: int
    started: float
    page_size: int
    progress: Progress
    metrics: Metrics | None
    fresh_within: Callable[[Partition], float] | None
    stop: asyncio.Event | None
    refused: dict[str, AuthError] = field(default_factory=dict)
    """Accounts whose credentials the API refused in this run: no further request."""
    pages_window: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(RUN_PAGES_AHEAD)
    )
    """Pages ahead of their sinks, every listing of the run together."""

    def listers_of(self, partition: Partition) -> tuple[str, ...]:
        """The accounts that may list ``partition``, in the order they are tried."""
        if "" in self.clients:  # a caller naming no account: its one client lists all
            return ("",)
        if partition.account:
            return (partition.account,)
        # A region no account covers (a one-off --region run): every account, in order.
        return self.listers.get(partition.region) or tuple(self.clients)


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
    accounts: Sequence[AccountClient] = (),
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

    With ``accounts`` (DESIGN.md, Accounts) an account partition is listed with its
    account's client and a catalogue partition with the first account covering its
    region; a refused account fails its partitions only (the other accounts sync), and
    the :class:`AuthError` raised at the end carries every refusal in ``by_account``.
    Without, ``client`` lists everything and a refusal stops the run.
    """
    started = time.monotonic()
    await mark_abandoned(engine)
    async with connect(engine, "cannot start a run", autocommit=True) as lock_conn:
        run_id = await start_run(lock_conn, trigger=trigger)
        try:
            log.info("run %d started: %d partitions", run_id, len(partitions))
            clients = {a.name: a.client for a in accounts} or {"": client}
            run = _Run(
                engine=engine,
                clients=clients,
                listers=_listers(accounts),
                run_id=run_id,
                started=started,
                page_size=page_size,
                progress=progress or Progress(),
                metrics=metrics,
                fresh_within=fresh_within,
                stop=stop,
            )
            reports = await _fan_out(run, partitions, partition_concurrency)
            refusal = next(iter(run.refused.values()), None)
            result = await _finish(run, reports, refusal if not accounts else None)
            if refusal is not None:
                refusal.by_account = dict(run.refused)
                raise refusal  # the client's own error: its cause and retry_after kept
            return result
        finally:
            await release_run(lock_conn, run_id)


def _listers(accounts: Sequence[AccountClient]) -> dict[str, tuple[str, ...]]:
    """Region -> the accounts covering it, in configuration order."""
    listers: dict[str, tuple[str, ...]] = {}
    for account in accounts:
        for region in account.regions:
            listers[region] = (*listers.get(region, ()), account.name)
    return listers


async def _fan_out(
    run: _Run, partitions: Sequence[Partition], concurrency: int
) -> list[PartitionReport]:
    """Sync the partitions, at most ``concurrency`` at once; the reports in completion
    order. A refused account's partitions fail (:func:`_with_listers`)."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(partition: Partition) -> PartitionReport:
        async with gate:
            if run.stop is not None and run.stop.is_set():
                return PartitionReport(partition, "not_started")
            return await _with_listers(run, partition)

    tasks = [asyncio.ensure_future(one(p)) for p in partitions]
    reports: list[PartitionReport] = []
    try:
        for done in asyncio.as_completed(tasks):
            report = await done
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
    return reports


async def _with_listers(run: _Run, partition: Partition) -> PartitionReport:
    """The partition listed with the first of its accounts whose credentials are not
    refused; when the API refuses them now, that account is refused for the rest of the
    run (one line) and the next account covering the region lists a catalogue partition.
    With every account refused the partition is ``failed`` with the API's refusal."""
    refusal: AuthError | None = None
    for lister in run.listers_of(partition):
        if lister in run.refused:
            refusal = run.refused[lister]
            continue
        try:
            return await _sync_partition(run, partition, lister)
        except AuthError as exc:
            refusal = run.refused.setdefault(lister, exc)
            if refusal is exc:
                log.error(
                    "account %s: the API refused the credentials (%s); its partitions fail",
                    lister or "(the configured pair)",
                    exc,
                )
    if refusal is None:  # no account covers the region (a caller's mistake)
        report = PartitionReport(
            partition, "failed", error_status="NO_ACCOUNT",
            error_message=f"no configured account covers {partition.region}",
        )  # fmt: skip
    else:
        report = PartitionReport(
            partition,
            "failed",
            error_status=refusal.status or f"HTTP_{refusal.http_status}",
            error_message=f"the API refused the credentials: {refusal.describe()}",
            seconds=time.monotonic() - run.started,
        )
    await _record_outside(run, report)
    return report


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
    metrics.partitions.labels(p.region, p.source, report.status, p.account).inc()
    if report.status != "skipped_locked":
        metrics.partition_duration.labels(p.region, p.source, p.account).observe(report.seconds)
    for event_type, count in report.counts.events().items():
        if count:
            metrics.events.labels(event_type).inc(count)


async def _sync_partition(run: _Run, partition: Partition, lister: str) -> PartitionReport:
    """One partition in its own transaction, listed with ``lister``'s client; its outcome,
    recorded. A deadlock or serialization failure runs it again (at most
    :data:`MAX_MERGE_ATTEMPTS` times). Raises only :class:`AuthError` and cancellation."""
    started = time.monotonic()
    run.progress.partition_started(partition)
    for attempt in range(1, MAX_MERGE_ATTEMPTS + 1):
        stats = RequestStats()
        intake = PartitionIntake(
            run.clients[lister], partition, page_size=run.page_size, stats=stats,
            progress=run.progress, window=run.pages_window,
        )  # fmt: skip
        try:
            return await _attempt_partition(run, partition, intake, started)
        except DatabaseError as exc:
            if not exc.retryable or attempt == MAX_MERGE_ATTEMPTS:
                raise
            log.info("partition %s: %s; running it again", partition, exc)
    raise AssertionError("unreachable")


async def _attempt_partition(
    run: _Run, partition: Partition, intake: PartitionIntake, started: float
) -> PartitionReport:
    """One attempt of :func:`_sync_partition`; a retryable database error propagates."""
    stats = intake.stats
    failure: tuple[str, str] | None = None
    try:
        async with transaction(run.engine) as conn:
            report = await _apply_partition(run, conn, partition, intake)
            if report.status in ("succeeded", "incomplete"):
                report = replace(report, seconds=time.monotonic() - started)
                await record_partition(conn, run.run_id, report)
    except AuthError:
        raise
    except DatabaseError as exc:
        if exc.retryable:
            raise
        failure = ("DATABASE", str(exc))
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
    writer = PartitionWriter(
        conn, region=partition.region, source=partition.source, account=partition.account
    )
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


async def _record_outside(run: _Run, report: PartitionReport) -> None:
    """Record a failed or skipped partition in its own transaction (best effort)."""
    try:
        async with transaction(run.engine) as conn:
            await record_partition(conn, run.run_id, report)
    except DatabaseError as exc:
        log.error("could not record partition %s: %s", report.partition, exc)
