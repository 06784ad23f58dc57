"""Listing a whole describeImages result set by page number, safely under drift.

Page-number paging shifts when images are added or removed while it runs: an item
can be skipped or seen twice. A listing therefore reads page 1 to learn
``totalCount``, fetches the remaining pages concurrently, de-duplicates by
``imageId``, and calls itself **complete** only when the de-duplicated count equals
``totalCount`` and every page reported the same ``totalCount``. Otherwise the caller
lists again (bounded); a listing that never settles is incomplete, and an incomplete
partition never removes anything.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.config import OFFLINE_SOURCES
from service.jdcloud.client import ImagesClient, Page, RequestStats


@dataclass(frozen=True, slots=True)
class Listing:
    """One listing of a partition: a source, and ``offline`` for public/thirdparty."""

    region: str
    source: str
    offline: bool | None
    index: int

    def __str__(self) -> str:
        suffix = "" if self.offline is None else f" offline={str(self.offline).lower()}"
        return f"{self.region}/{self.source}{suffix}"


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    """One (region, source) pair: the unit that is locked, applied and recorded."""

    region: str
    source: str

    def __str__(self) -> str:
        return f"{self.region}/{self.source}"

    def listings(self) -> tuple[Listing, ...]:
        """Two listings (``offline=false``, ``offline=true``) for public and thirdparty;
        one without ``offline`` for the other sources."""
        if self.source in OFFLINE_SOURCES:
            return (
                Listing(self.region, self.source, False, 0),
                Listing(self.region, self.source, True, 1),
            )
        return (Listing(self.region, self.source, None, 0),)


def partitions_of(regions: Sequence[str], sources: Sequence[str]) -> list[Partition]:
    """Every (region, source) pair, regions first."""
    return [Partition(r, s) for r in regions for s in sources]


@dataclass(slots=True)
class ListingOutcome:
    """What one pass over a listing saw."""

    total_count: int = 0
    pages: int = 0
    totals_seen: set[int] = field(default_factory=set)

    def settled(self, unique: int) -> bool:
        return self.totals_seen == {self.total_count} and unique == self.total_count


MAX_PAGES_AHEAD = 256
"""Pages of one listing requested or received but not yet consumed by its sink: memory
is bounded by this window, not by the listing; a page beyond it is queued for a request
slot only when an earlier page is consumed (sizes and measurements: bench/README.md,
"Constants and their numbers")."""

FIRST_PAGE_PRIORITY = -math.inf
"""Every listing's first page goes before other pages: it tells how big the listing is."""


def page_priority(pages: int) -> float:
    """Priority of a listing's later pages (lower is served first): bigger listings
    first, so the merge of a big partition runs while small ones are still fetched,
    instead of after everything else."""
    return -float(pages)


PageSink = Callable[[list[Any]], Awaitable[None]]
"""Receives each page's items in completion order. Calls are started in that order and
at most two are outstanding: the second may start while the first awaits (its writes),
so a sink must keep its own order where it matters (a FIFO lock around its writes)."""


async def list_pages(
    client: ImagesClient,
    listing: Listing,
    *,
    page_size: int,
    stats: RequestStats,
    on_page: PageSink,
    on_progress: Callable[[int, int], None] | None = None,
) -> ListingOutcome:
    """Fetch every page of ``listing`` once and hand each page to ``on_page``.

    API errors propagate (after the client's retries); pages still in flight are
    cancelled.
    """

    priority = FIRST_PAGE_PRIORITY

    async def fetch(number: int) -> Page:
        return await client.describe_images(
            listing.region,
            image_source=listing.source,
            offline=listing.offline,
            page_number=number,
            page_size=page_size,
            stats=stats,
            priority=priority,
        )

    outcome = ListingOutcome()
    first = await fetch(1)
    outcome.total_count = first.total_count
    outcome.totals_seen.add(first.total_count)
    pages = max(1, math.ceil(first.total_count / page_size))
    priority = page_priority(pages)
    outcome.pages = 1
    stats.pages += 1
    await on_page(first.images)
    if on_progress:
        on_progress(1, pages)

    async def past_the_end() -> None:
        # A totalCount that understates the listing by whole pages would look complete
        # (and let the merge remove real images). When the last page was full, read
        # one more: anything on it makes the listing unsettled.
        if first.total_count == 0 or first.total_count % page_size:
            return
        extra = await fetch(pages + 1)
        outcome.pages += 1
        stats.pages += 1
        outcome.totals_seen.add(extra.total_count)
        if extra.images:  # new ids here make the unique count exceed totalCount
            await on_page(extra.images)

    if pages == 1:
        await past_the_end()
        return outcome

    # Every page is queued for the client at once (its limits pace them, bigger listings
    # first), at most MAX_PAGES_AHEAD of them not yet consumed; a page is dropped
    # as soon as ``on_page`` returns. So memory is bounded by the window, not the listing.
    ahead = asyncio.Semaphore(MAX_PAGES_AHEAD)

    async def fetch_ahead(number: int) -> Page:
        await ahead.acquire()  # released when the page has been consumed
        return await fetch(number)

    arrived: asyncio.Queue[asyncio.Task[Page]] = asyncio.Queue()
    pending: set[asyncio.Task[Page]] = set()
    for number in range(2, pages + 1):
        task = asyncio.ensure_future(fetch_ahead(number))
        task.add_done_callback(arrived.put_nowait)
        pending.add(task)
    # Two sink calls overlap: while one page is being written (the sink awaits its
    # database), the next is already handed over, so its CPU-bound part runs meanwhile.
    writing: asyncio.Task[None] | None = None
    consumed = 1

    async def finish(sink: asyncio.Task[None]) -> None:
        nonlocal consumed
        await sink
        ahead.release()
        consumed += 1
        if on_progress:
            on_progress(consumed, pages)

    try:
        while pending:
            task = await arrived.get()
            pending.discard(task)
            page = task.result()
            del task
            outcome.pages += 1
            stats.pages += 1
            outcome.totals_seen.add(page.total_count)
            # Track the new sink before awaiting the previous one: if that raises, the
            # `finally` below must still cancel and collect this one (else its error is
            # "Task exception was never retrieved").
            previous, writing = writing, asyncio.ensure_future(on_page(page.images))
            del page
            if previous is not None:
                await finish(previous)
        if writing is not None:
            await finish(writing)
            writing = None
    finally:
        for task in pending:
            task.cancel()
        if writing is not None:
            writing.cancel()
        await asyncio.gather(*pending, *([writing] if writing else []), return_exceptions=True)
    await past_the_end()
    return outcome
