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
from collections.abc import Callable, Collection, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import OFFLINE_SOURCES
from service.errors import ApiError, AuthError, DatabaseError, ImageSyncError, PermanentApiError
from service.jdcloud.client import ImagesClient, RequestStats, is_plain_image_id
from service.jdcloud.listing import Listing, ListingOutcome, list_pages
from service.metrics import Metrics
from service.normalize import ImageExtras, ImageRow, InvalidItem, content_hash, normalize_image
from service.store.apply import MergeCounts, PartitionWriter
from service.store.engine import describe_error
from service.store.runs import (
    PartitionRecord,
    finish_run,
    mark_abandoned,
    record_partition,
    record_partitions,
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
    # listing -> ids (of its last pass) that other image APIs are asked about.
    extras_ids: dict[int, list[str]] = field(default_factory=dict)


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
        except BaseException as exc:
            # Shutdown (cancelled) or a bug in one partition: the partitions in hand roll
            # back and the run is closed now, not left running until mark_abandoned.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(exc, asyncio.CancelledError):
                status, why = "abandoned", "cancelled (shutdown) before it finished"
            else:
                log.error("run %d: unexpected error", run_id, exc_info=exc)
                status, why = "failed", f"internal error: {type(exc).__name__}"
            with suppress(OSError, sa.exc.SQLAlchemyError):
                await asyncio.shield(
                    finish_run(
                        engine, run_id, status=status, totals=_totals(_recorded(reports)), error=why
                    )
                )
            raise
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

        if auth_failure:
            for report in await _record_refused(
                engine, run_id, partitions, reports, auth_failure[0], started
            ):
                reports.append(report)
                _observe(metrics, report)
                progress.partition_finished(report)
        seconds = time.monotonic() - started
        reports = _recorded(reports)
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
            raise auth_failure[0]  # the client's own error: its cause and retry_after kept
        return result
    finally:
        if run_id is not None:
            await release_run(lock_conn, run_id)
        await lock_conn.close()


def _recorded(reports: Sequence[PartitionReport]) -> list[PartitionReport]:
    """The reports that have a ``sync_partitions`` row (and count in the run's totals)."""
    return [r for r in reports if r.status not in _NOT_RECORDED]


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
                if partition.source in EXTRA_SOURCES:
                    ids = sorted({i for ids in staged.extras_ids.values() for i in ids})
                    stored = [e.image_id for e in await writer.stored_extras(ids)]
                    extras, vanished = await fetch_extras(client, partition, ids, stats, stored)
                    # Deleted between its listing and its members or constraints call:
                    # keep what is stored (the next sync sees it gone), no spurious change.
                    await writer.stage_extras([*extras, *await writer.stored_extras(vanished)])
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
                await record_partition(conn, _record(report, run_id))
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
        await _record_outside(engine, report, run_id)
    return report


async def _record_refused(
    engine: AsyncEngine,
    run_id: int,
    partitions: Sequence[Partition],
    reports: Sequence[PartitionReport],
    error: AuthError,
    started: float,
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
            seconds=time.monotonic() - started,  # from the run's start: they waited that long
        )
        for p in partitions
        if p not in done
    ]
    try:
        async with engine.begin() as conn:
            await record_partitions(conn, [_record(r, run_id) for r in refused])
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        log.error(
            "could not record the partitions refused in run %d: %s",
            run_id,
            describe_error(exc, str(engine.url)),
        )
    return refused


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


async def _record_outside(engine: AsyncEngine, report: PartitionReport, run_id: int) -> None:
    """Record a failed or skipped partition in its own transaction (best effort)."""
    try:
        async with engine.begin() as conn:
            await record_partition(conn, _record(report, run_id))
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        log.error(
            "could not record partition %s: %s",
            report.partition,
            describe_error(exc, str(engine.url)),
        )


def _record(report: PartitionReport, run_id: int) -> PartitionRecord:
    return PartitionRecord(
        run_id=run_id,
        region_id=report.partition.region,
        image_source=report.partition.source,
        status=report.status,
        seconds=report.seconds,
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
        self.extras_ids: list[str] = []  # what fetch_extras asks about
        self._wants_extras = _wants_extras(listing.source)

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
                    if self._wants_extras(item):
                        self.extras_ids.append(image_id)
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
            if self._wants_extras(item):
                self.extras_ids.append(row.image_id)
        async with self.lock:
            await self.writer.stage(rows, listing.index)
            await self.writer.stage_unchanged(unchanged, listing.index)


EXTRA_SOURCES = frozenset({"private", "public", "thirdparty"})
"""Sources whose images other APIs say more about: members (private images shared with
specified users) and instance-type constraints (public and thirdparty images)."""
MEMBERS_CONCURRENCY = 16
"""describeImageMembers calls of one partition waiting at once (the client's gate and
rate limit still decide when each is sent)."""


def _wants_extras(source: str) -> Callable[[Any], bool]:
    """Whether a (valid) listed item is one to ask the other image APIs about."""
    if source == "private":
        return lambda item: item.get("launchPermission") == "specifiedUsers"
    if source in OFFLINE_SOURCES:
        return lambda item: True
    return lambda item: False


async def fetch_extras(
    client: ImagesClient,
    partition: Partition,
    ids: Sequence[str],
    stats: RequestStats,
    stored: Collection[str] = (),
) -> tuple[list[ImageExtras], list[str]]:
    """Members of the partition's shared private images (one describeImageMembers call
    each, every sync: a share changes nothing describeImages shows), or the
    instance-type constraints of its public/thirdparty images (describeImageConstraintsBatch,
    as few calls as the URL length allows). Returns the images with something to say,
    and the ids whose members call answered 404 (the image was deleted after the
    listing: drift, not a failure; constraints: see :func:`_fetch_constraints`, which
    ``stored``, the ids with a stored constraint, is for). Any other failure raises: the partition fails and its transaction rolls back. An id that
    cannot be put in a URL as it is (no real one) is not asked about: its extras stay null."""
    ids = [image_id for image_id in ids if is_plain_image_id(image_id)]
    if partition.source == "private":
        return await _fetch_members(client, partition, ids, stats)
    if not ids:
        return [], []
    return await _fetch_constraints(client, partition, ids, stats, stored)


async def _fetch_constraints(
    client: ImagesClient,
    partition: Partition,
    ids: Sequence[str],
    stats: RequestStats,
    stored: Collection[str],
) -> tuple[list[ImageExtras], list[str]]:
    """describeImageConstraintsBatch for all ``ids``. Its answer lists only images that
    exist and have a constraint, so an absent id is ambiguous: constraint lifted, or image
    deleted after its listing. Absent ids with a ``stored`` constraint are asked one by
    one (describeImageConstraints): 404 is a vanished image (its stored value stays)."""
    wanted = set(ids)
    found = {  # by id: an id answered twice is recorded once (its last answer)
        c.image_id: c
        for c in await client.describe_image_constraints(partition.region, ids, stats=stats)
        if c.image_id in wanted and (c.constraints_type is not None or c.instance_types is not None)
    }
    vanished: list[str] = []

    async def confirm(image_id: str) -> None:
        try:
            found[image_id] = await client.describe_image_constraint(
                partition.region, image_id, stats=stats
            )
        except PermanentApiError as exc:
            if exc.http_status != 404:
                raise
            log.info("partition %s: %s vanished after its listing", partition, image_id)
            vanished.append(image_id)

    await _gather_or_cancel(*(confirm(i) for i in sorted(wanted & set(stored) - found.keys())))
    extras = [
        ImageExtras(
            c.image_id,
            instance_types_constraint=c.constraints_type,
            instance_types=c.instance_types,
        )
        for c in found.values()
        if c.constraints_type is not None or c.instance_types is not None
    ]
    return extras, vanished


async def _fetch_members(
    client: ImagesClient, partition: Partition, ids: Sequence[str], stats: RequestStats
) -> tuple[list[ImageExtras], list[str]]:
    """describeImageMembers for each id, by a fixed pool of workers sharing one iterator
    (not one task per id: 13,000 waiting tasks cost ~100 MB)."""
    found: list[ImageExtras] = []
    vanished: list[str] = []
    pending = iter(ids)

    async def worker() -> None:
        for image_id in pending:  # each id is taken by exactly one worker
            try:
                pins = await client.describe_image_members(partition.region, image_id, stats=stats)
            except PermanentApiError as exc:
                if exc.http_status != 404:
                    raise
                log.info("partition %s: %s vanished after its listing", partition, image_id)
                vanished.append(image_id)
                continue
            found.append(ImageExtras(image_id, shared_with=pins))

    await _gather_or_cancel(*(worker() for _ in range(min(MEMBERS_CONCURRENCY, len(ids)))))
    return found, vanished


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
        staged.extras_ids[listing.index] = this_pass.extras_ids
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
