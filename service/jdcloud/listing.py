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
    """One partition identity (account, region, source): the unit that is locked,
    applied and recorded. ``account`` is ``""`` for a catalogue partition (public,
    thirdparty, community: listed once per region) and for the partitions of a caller
    that names no account; recorded as null then."""

    region: str
    source: str
    account: str = ""
    named: bool = field(default=True, compare=False)
    """Whether its name shows the account (not in the one-account form, whose output
    stays as it was)."""

    def __str__(self) -> str:
        where = f"{self.region}/{self.source}"
        return f"{self.account}:{where}" if self.account and self.named else where

    @property
    def account_or_none(self) -> str | None:
        return self.account or None

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


MAX_PAGES_AHEAD = 32
"""Pages of one listing requested or received but not yet consumed by its sink: memory
is bounded by this window (and the run's, below), not by the listing; a page beyond it
is queued for a request slot only when an earlier page is consumed (sizes and
measurements: bench/README.md, "Constants and their numbers")."""

RUN_PAGES_AHEAD = 128
"""Pages requested or received but not yet consumed, all listings of one sync run
together (``window`` of :func:`list_pages`, ~40 MB of decoded pages): with the
per-listing window alone (then 256), the listings of eight partitions at once each held
up to 256 pages when the database was slower than the API, so memory grew with the
catalogue (100,000 images: 241 MB in a no-change resync). A listing's own window is a
quarter of this one, so the big partition's pages waiting for their sink cannot take
every permit: with 64 a run and 256 a listing, the 3,100-image shared partitions of
make bench waited 16 s for permits in a no-change resync (3 s with 128 and 32)."""

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
    window: asyncio.Semaphore | None = None,
) -> ListingOutcome:
    """Fetch every page of ``listing`` once and hand each page to ``on_page``.

    ``window`` bounds the pages requested or received but not yet consumed, shared
    with other listings (:data:`RUN_PAGES_AHEAD`); each listing also keeps to
    :data:`MAX_PAGES_AHEAD` of its own. Permits still held when the listing ends (an
    error, a cancellation) are given back.

    API errors propagate (after the client's retries); pages still in flight are
    cancelled.
    """
    pager = _Pager(client, listing, page_size, stats, on_page, on_progress, window)
    first = await pager.first()
    if pager.pages > 1:
        await pager.the_rest()
    await pager.past_the_end(first)
    return pager.outcome


class _Pager:
    """One pass over a listing's pages: the first alone, then the rest at once."""

    def __init__(
        self,
        client: ImagesClient,
        listing: Listing,
        page_size: int,
        stats: RequestStats,
        on_page: PageSink,
        on_progress: Callable[[int, int], None] | None,
        window: asyncio.Semaphore | None = None,
    ) -> None:
        self.client = client
        self.window = window
        self.shared = 0  # permits of ``window`` this listing holds
        self.listing = listing
        self.page_size = page_size
        self.stats = stats
        self.on_page = on_page
        self.on_progress = on_progress or (lambda done, total: None)
        self.outcome = ListingOutcome()
        self.priority = FIRST_PAGE_PRIORITY
        self.pages = 1
        self.consumed = 0

    async def fetch(self, number: int) -> Page:
        return await self.client.describe_images(
            self.listing.region,
            image_source=self.listing.source,
            offline=self.listing.offline,
            page_number=number,
            page_size=self.page_size,
            stats=self.stats,
            priority=self.priority,
        )

    def _received(self, page: Page) -> None:
        self.outcome.pages += 1
        self.stats.pages += 1
        self.outcome.totals_seen.add(page.total_count)

    async def first(self) -> Page:
        """Page 1: it tells how many pages there are."""
        first = await self.fetch(1)
        self.outcome.total_count = first.total_count
        self.pages = max(1, math.ceil(first.total_count / self.page_size))
        self.priority = page_priority(self.pages)
        self._received(first)
        await self.on_page(first.images)
        self.consumed = 1
        self.on_progress(1, self.pages)
        return first

    async def past_the_end(self, first: Page) -> None:
        """A totalCount that understates the listing by whole pages would look complete
        (and let the merge remove real images). When the last page was full, read one
        more: anything on it makes the listing unsettled."""
        if first.total_count == 0 or first.total_count % self.page_size:
            return
        extra = await self.fetch(self.pages + 1)
        self._received(extra)
        if extra.images:  # new ids here make the unique count exceed totalCount
            await self.on_page(extra.images)

    async def the_rest(self) -> None:
        """Pages 2..n, every one queued for the client at once (its limits pace them,
        bigger listings first), at most MAX_PAGES_AHEAD of them (and of the run's
        ``window``) not yet consumed; a page is dropped as soon as ``on_page`` returns.
        So memory is bounded by the windows, not the listing."""
        ahead = asyncio.Semaphore(MAX_PAGES_AHEAD)

        async def fetch_ahead(number: int) -> Page:
            await ahead.acquire()  # both released when the page has been consumed
            if self.window is not None:
                await self.window.acquire()
                self.shared += 1
            return await self.fetch(number)

        arrived: asyncio.Queue[asyncio.Task[Page]] = asyncio.Queue()
        pending: set[asyncio.Task[Page]] = set()
        for number in range(2, self.pages + 1):
            task = asyncio.ensure_future(fetch_ahead(number))
            task.add_done_callback(arrived.put_nowait)
            pending.add(task)
        # Two sink calls overlap: while one page is being written (the sink awaits its
        # database), the next is already handed over, so its CPU-bound part runs meanwhile.
        writing: asyncio.Task[None] | None = None
        try:
            while pending:
                task = await arrived.get()
                pending.discard(task)
                page = task.result()
                del task
                self._received(page)
                # Track the new sink before awaiting the previous one: if that raises, the
                # `finally` below must still cancel and collect this one (else its error
                # is "Task exception was never retrieved").
                previous, writing = writing, asyncio.ensure_future(self.on_page(page.images))
                del page
                if previous is not None:
                    await self._finish(previous, ahead)
            if writing is not None:
                await self._finish(writing, ahead)
                writing = None
        finally:
            for task in pending:
                task.cancel()
            if writing is not None:
                writing.cancel()
            await asyncio.gather(*pending, *([writing] if writing else []), return_exceptions=True)
            self._give_back()

    def _give_back(self) -> None:
        """The run window's permits this listing still holds (an error, a cancel)."""
        if self.window is not None:
            for _ in range(self.shared):
                self.window.release()
        self.shared = 0

    async def _finish(self, sink: asyncio.Task[None], ahead: asyncio.Semaphore) -> None:
        await sink
        ahead.release()
        if self.window is not None:
            self.shared -= 1
            self.window.release()
        self.consumed += 1
        self.on_progress(self.consumed, self.pages)
