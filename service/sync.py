"""One sync: every partition listed, staged and merged; the run recorded.

:func:`sync_once` is the only function that syncs; the CLI, the scheduler, the demo
and the benchmark call it. Partitions run concurrently (within a bound) and each is
applied in its own transaction, so a failure rolls back only its partition. A failed
or incomplete partition never removes anything; a complete one removes only images
the API no longer returns by id. A 401/403 stops the whole run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import OFFLINE_SOURCES
from service.errors import ApiError, AuthError, DatabaseError, ImageSyncError
from service.jdcloud.client import ImagesClient, RequestStats
from service.jdcloud.listing import Listing, ListingOutcome, list_pages
from service.metrics import Metrics
from service.normalize import ImageRow, InvalidItem, content_hash, normalize_image
from service.store.apply import MergeCounts, PartitionWriter
from service.store.engine import describe_error
from service.store.runs import (
    PartitionRecord,
    finish_run,
    mark_abandoned,
    record_partition,
    release_run,
    start_run,
)
from service.store.tables import EVENT_TYPES

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_LISTING_PASSES = 3
"""How many times a drifting listing is read before the partition is incomplete."""
MAX_REPORTED_INVALID = 20
"""Invalid items logged per partition (all are counted)."""
_NOT_RECORDED = {
    "skipped_fresh": "skipped: another process synced it moments ago",
    "not_started": "not started: shutting down",
}
"""Partition outcomes that leave no row in sync_partitions, with their debug line."""


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    """One (region, source) pair."""

    region: str
    source: str

    def __str__(self) -> str:
        return f"{self.region}/{self.source}"

    def listings(self) -> tuple[Listing, ...]:
        if self.source in OFFLINE_SOURCES:
            return (
                Listing(self.region, self.source, False, 0),
                Listing(self.region, self.source, True, 1),
            )
        return (Listing(self.region, self.source, None, 0),)


def partitions_of(regions: Sequence[str], sources: Sequence[str]) -> list[Partition]:
    return [Partition(r, s) for r in regions for s in sources]


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """The outcome of one partition in one run."""

    partition: Partition
    status: str
    counts: MergeCounts = field(default_factory=MergeCounts)
    pages: int = 0
    api_requests: int = 0
    retries: int = 0
    total_count: int | None = None
    invalid_items: int = 0
    error_status: str | None = None
    error_message: str | None = None
    seconds: float = 0.0


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


class Progress:
    """Receives progress callbacks; the CLI renders them, the daemon ignores them."""

    def partition_started(self, partition: Partition) -> None: ...
    def pages(self, partition: Partition, listing: Listing, done: int, total: int) -> None: ...
    def partition_finished(self, report: PartitionReport) -> None: ...


@dataclass
class _Staged:
    """Per-partition bookkeeping while pages stream into staging."""

    invalid: int = 0
    invalid_without_id: int = 0
    keep_ids: set[str] = field(default_factory=set)
    # (listing, imageId or "#n" for the n-th idless item): each bad item counted and
    # logged once, however many passes re-read its listing.
    invalid_seen: set[tuple[int, str]] = field(default_factory=set)
    outcomes: dict[int, ListingOutcome] = field(default_factory=dict)
    seen: dict[int, set[str]] = field(default_factory=dict)  # listing -> ids of its last pass
    # image_id -> stored content hash of the partition's listed images: an item whose
    # hash is unchanged is only recorded as seen, not normalised or staged in full.
    known: dict[str, bytes] = field(default_factory=dict)


async def sync_once(
    engine: AsyncEngine,
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
    progress = progress or Progress()
    try:
        await mark_abandoned(engine)
        lock_conn = await engine.connect()
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DatabaseError(f"cannot start a run: {describe_error(exc, str(engine.url))}") from None
    run_id: int | None = None
    try:
        try:
            await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
            run_id = await start_run(lock_conn, trigger=trigger)
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise DatabaseError(
                f"cannot start a run: {describe_error(exc, str(engine.url))}"
            ) from None
        log.info("run %d started: %d partitions", run_id, len(partitions))
        gate = asyncio.Semaphore(max(1, partition_concurrency))
        auth_failure: list[AuthError] = []

        async def one(partition: Partition) -> PartitionReport:
            async with gate:
                if stop is not None and stop.is_set():
                    return PartitionReport(partition, "not_started")
                if auth_failure:
                    return PartitionReport(
                        partition,
                        "failed",
                        error_status="UNAUTHENTICATED",
                        error_message="not tried: the credentials were refused",
                    )
                return await _sync_partition(
                    engine, client, partition, run_id, page_size, progress, fresh_within
                )

        tasks = [asyncio.ensure_future(one(p)) for p in partitions]
        reports: list[PartitionReport] = []
        error: str | None = None
        try:
            for done in asyncio.as_completed(tasks):
                try:
                    report = await done
                except AuthError as exc:
                    auth_failure.append(exc)
                    error = f"the API refused the credentials: {exc}"
                    for task in tasks:
                        task.cancel()
                    break
                reports.append(report)
                _observe(metrics, report)
                progress.partition_finished(report)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.shield(
                finish_run(
                    engine,
                    run_id,
                    status="abandoned",
                    totals=_totals(reports),
                    error="cancelled (shutdown) before it finished",
                )
            )
            raise
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

        seconds = time.monotonic() - started
        reports = [r for r in reports if r.status not in _NOT_RECORDED]
        status = _run_status(reports, auth_failed=bool(auth_failure))
        totals = _totals(reports)
        try:
            await finish_run(engine, run_id, status=status, totals=totals, error=error)
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            # The database went away during the run: one clear line, not a driver error.
            raise DatabaseError(
                f"run {run_id} ended {status} but could not be recorded: "
                f"{describe_error(exc, str(engine.url))}"
            ) from None
        if metrics:
            metrics.run_duration.observe(seconds)
        log.info(
            "run %d %s in %.1fs: %s",
            run_id,
            status,
            seconds,
            ", ".join(f"{k}={v}" for k, v in totals.items() if k != "partitions"),
        )
        result = SyncReport(
            run_id, status, tuple(sorted(reports, key=lambda r: r.partition)), seconds, error
        )
        if auth_failure:
            raise AuthError(
                auth_failure[0].message,
                http_status=auth_failure[0].http_status,
                status=auth_failure[0].status,
                request_id=auth_failure[0].request_id,
                region=auth_failure[0].region,
            )
        return result
    finally:
        if run_id is not None:
            await release_run(lock_conn, run_id)
        await lock_conn.close()


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


def _observe(metrics: Metrics | None, report: PartitionReport) -> None:
    p = report.partition
    if report.status in _NOT_RECORDED:
        log.debug("partition %s %s", p, _NOT_RECORDED[report.status])
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


async def _sync_partition(
    engine: AsyncEngine,
    client: ImagesClient,
    partition: Partition,
    run_id: int,
    page_size: int,
    progress: Progress,
    fresh_within: Callable[[Partition], float] | None = None,
) -> PartitionReport:
    started_at = datetime.now(UTC)
    started = time.monotonic()
    stats = RequestStats()
    staged = _Staged()
    status = "failed"
    report: PartitionReport
    progress.partition_started(partition)
    try:
        async with engine.connect() as conn, conn.begin():
            writer = PartitionWriter(conn, region=partition.region, source=partition.source)
            if not await writer.try_lock():
                report = PartitionReport(partition, "skipped_locked")
            elif fresh_within is not None and await writer.succeeded_within(
                fresh_within(partition)
            ):
                report = PartitionReport(partition, "skipped_fresh")
            else:
                await writer.open()
                staged.known = await writer.listed_hashes()
                stage_lock = asyncio.Lock()
                settled = await _gather_or_cancel(
                    *(
                        _list_until_settled(
                            client,
                            writer,
                            listing,
                            staged,
                            stats,
                            page_size,
                            stage_lock,
                            progress,
                            partition,
                        )
                        for listing in partition.listings()
                    )
                )
                complete = all(settled) and staged.invalid_without_id == 0
                if complete:
                    staged.keep_ids |= await _still_there(client, partition, staged, stats)
                counts = await writer.merge(
                    run_id=run_id, remove_missing=complete, keep_ids=sorted(staged.keep_ids)
                )
                status = "succeeded" if complete else "incomplete"
                message = None
                if not all(settled):
                    message = (
                        f"the listing kept changing while it was read ({MAX_LISTING_PASSES} passes): "
                        "nothing was removed"
                    )
                elif staged.invalid_without_id:
                    message = (
                        f"{staged.invalid_without_id} items without a usable imageId: "
                        "nothing was removed"
                    )
                report = PartitionReport(
                    partition,
                    status,
                    counts,
                    pages=stats.pages,
                    api_requests=stats.requests,
                    retries=stats.retries,
                    total_count=sum(o.total_count for o in staged.outcomes.values()),
                    invalid_items=staged.invalid,
                    error_status="DRIFT"
                    if message and not all(settled)
                    else ("INVALID_ITEMS" if message else None),
                    error_message=message,
                )
                report = replace(report, seconds=time.monotonic() - started)
                await record_partition(conn, _record(report, run_id, started_at))
    except AuthError:
        raise
    except ApiError as exc:
        report = PartitionReport(
            partition,
            "failed",
            pages=stats.pages,
            api_requests=stats.requests,
            retries=stats.retries,
            invalid_items=staged.invalid,
            error_status=exc.status
            or (f"HTTP_{exc.http_status}" if exc.http_status else "API_ERROR"),
            error_message=exc.describe(),
        )
    except (OSError, sa.exc.SQLAlchemyError, ImageSyncError) as exc:
        message = (
            describe_error(exc, str(engine.url))
            if isinstance(exc, sa.exc.SQLAlchemyError)
            else str(exc)
        )
        report = PartitionReport(
            partition,
            "failed",
            pages=stats.pages,
            api_requests=stats.requests,
            retries=stats.retries,
            error_status="DATABASE",
            error_message=message,
        )
    report = replace(report, seconds=time.monotonic() - started)
    if report.status in ("failed", "skipped_locked"):
        await _record_outside(engine, report, run_id, started_at)
    return report


async def _gather_or_cancel(*aws: Coroutine[Any, Any, _T]) -> list[_T]:
    """``asyncio.gather``, except that when one fails the others are cancelled and awaited
    before the error propagates: a listing must never outlive its partition's
    transaction (it would keep staging through a connection back in the pool)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones
        await asyncio.gather(*tasks, return_exceptions=True)


async def _record_outside(
    engine: AsyncEngine, report: PartitionReport, run_id: int, started_at: datetime
) -> None:
    """Record a failed or skipped partition in its own transaction (best effort)."""
    try:
        async with engine.begin() as conn:
            await record_partition(conn, _record(report, run_id, started_at))
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        log.error(
            "could not record partition %s: %s",
            report.partition,
            describe_error(exc, str(engine.url)),
        )


def _record(report: PartitionReport, run_id: int, started_at: datetime) -> PartitionRecord:
    return PartitionRecord(
        run_id=run_id,
        region_id=report.partition.region,
        image_source=report.partition.source,
        status=report.status,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        counts=report.counts,
        pages=report.pages,
        api_requests=report.api_requests,
        retries=report.retries,
        total_count=report.total_count,
        invalid_items=report.invalid_items,
        error_status=report.error_status,
        error_message=report.error_message,
    )


async def _still_there(
    client: ImagesClient, partition: Partition, staged: _Staged, stats: RequestStats
) -> set[str]:
    """Of the images a complete partition would remove (listed before, on no page now),
    those the API still returns by id: they are kept, not removed.

    Settled listings can still miss an image: one moving between the offline=false and
    offline=true listings between their reads is in neither, and within a listing a
    deletion above a page boundary plus an insertion below it between two page reads
    keep totalCount and the count while the image sliding across the boundary is read
    on no page. An id lookup does not page, so it cannot miss it."""
    seen = set().union(*staged.seen.values())
    missing = sorted(set(staged.known) - seen - staged.keep_ids)
    if not missing:
        return set()
    found = await client.lookup_ids(partition.region, missing, stats=stats)
    kept = {
        item["imageId"]
        for item in found
        if isinstance(item, dict)
        and item.get("imageSource") == partition.source
        and item.get("imageId") in staged.known
    }
    if kept:
        log.info(
            "partition %s: %d image(s) read on no page are still there by id; not removed",
            partition,
            len(kept),
        )
    return kept


class _ListingPass:
    """One pass over a listing: validates, de-duplicates and stages its pages."""

    def __init__(
        self, writer: PartitionWriter, listing: Listing, staged: _Staged, lock: asyncio.Lock
    ) -> None:
        self.writer = writer
        self.listing = listing
        self.staged = staged
        self.lock = lock
        self.ids: set[str] = set()
        self.idless = 0

    @property
    def unique(self) -> int:
        """Distinct items seen, invalid ones included (they count toward totalCount)."""
        return len(self.ids) + self.idless

    async def on_page(self, items: list[Any]) -> None:
        staged, listing = self.staged, self.listing
        known = staged.known
        rows: list[ImageRow] = []
        unchanged: list[str] = []
        for item in items:
            image_id = item.get("imageId") if known and isinstance(item, dict) else None
            if (
                isinstance(image_id, str)
                and image_id in known
                and known[image_id] == content_hash(item, listing.source)
            ):
                if image_id not in self.ids:
                    self.ids.add(image_id)
                    unchanged.append(image_id)
                continue
            try:
                row = normalize_image(item, region_id=listing.region, image_source=listing.source)
            except InvalidItem as exc:
                if exc.image_id:
                    if exc.image_id in self.ids:
                        continue  # seen on an earlier page of this pass
                    staged.keep_ids.add(exc.image_id)
                    self.ids.add(exc.image_id)
                    key = (listing.index, exc.image_id)
                else:
                    self.idless += 1
                    key = (listing.index, f"#{self.idless}")
                if key in staged.invalid_seen:
                    continue  # counted in an earlier pass over this listing
                staged.invalid_seen.add(key)
                staged.invalid += 1
                if not exc.image_id:
                    staged.invalid_without_id += 1
                if staged.invalid <= MAX_REPORTED_INVALID:
                    log.warning("partition %s: invalid item skipped: %s", listing, exc)
                continue
            if row.image_id in self.ids:
                continue  # seen on an earlier page of this pass (page-number drift)
            self.ids.add(row.image_id)
            rows.append(row)
        async with self.lock:
            await self.writer.stage(rows, listing.index)
            await self.writer.stage_unchanged(unchanged, listing.index)


async def _list_until_settled(
    client: ImagesClient,
    writer: PartitionWriter,
    listing: Listing,
    staged: _Staged,
    stats: RequestStats,
    page_size: int,
    stage_lock: asyncio.Lock,
    progress: Progress,
    partition: Partition,
) -> bool:
    """List (and stage) one listing until it settles or the passes run out."""
    for attempt in range(1, MAX_LISTING_PASSES + 1):
        if attempt > 1:
            async with stage_lock:
                await writer.discard_listing(listing.index)
        this_pass = _ListingPass(writer, listing, staged, stage_lock)
        outcome = await list_pages(
            client,
            listing,
            page_size=page_size,
            stats=stats,
            on_page=this_pass.on_page,
            on_progress=lambda done, total: progress.pages(partition, listing, done, total),
        )
        staged.outcomes[listing.index] = outcome
        staged.seen[listing.index] = this_pass.ids
        if outcome.settled(this_pass.unique):
            return True
        log.info(
            "listing %s drifted (pass %d: %d unique of totalCount %d, totals seen %s); "
            "listing again",
            listing,
            attempt,
            this_pass.unique,
            outcome.total_count,
            sorted(outcome.totals_seen),
        )
    return False
