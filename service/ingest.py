"""Taking in one partition's pages: validate, de-duplicate, skip the unchanged, stage.

:class:`PartitionIntake` is the sync's second job (the first, running a run, is
:mod:`service.sync`): inside the partition's transaction it lists each of the
partition's listings until it settles (:data:`MAX_LISTING_PASSES`), hands each page to
a :class:`_ListingPass` that normalises the items into rows (an item whose content hash
is the stored one is only recorded as seen), counts and logs invalid items once, stages
the rows through the :class:`~service.store.apply.PartitionWriter`, asks the other image
APIs about the images that have extras, and, for a complete partition, confirms by id
the images that a settled listing still missed. What it saw is an :class:`Intake`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.config import OFFLINE_SOURCES
from service.errors import PermanentApiError
from service.jdcloud.client import ImagesClient, RequestStats, is_plain_image_id
from service.jdcloud.listing import Listing, ListingOutcome, Partition, list_pages
from service.normalize import ImageExtras, ImageRow, InvalidItem, content_hash, normalize_image
from service.store.apply import PartitionWriter
from service.store.runs import PartitionReport

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_LISTING_PASSES = 3
"""How many times a drifting listing is read before the partition is incomplete."""
MAX_REPORTED_INVALID = 20
"""Invalid items logged per partition (all are counted)."""
EXTRA_SOURCES = frozenset({"private", "public", "thirdparty"})
"""Sources whose images other APIs say more about: members (private images shared with
specified users) and instance-type constraints (public and thirdparty images)."""
MEMBERS_CONCURRENCY = 16
"""describeImageMembers calls of one partition waiting at once (the client's gate and
rate limit still decide when each is sent)."""


class Progress:
    """Receives progress callbacks; the CLI renders them, the daemon ignores them."""

    def partition_started(self, partition: Partition) -> None: ...
    def pages(self, partition: Partition, listing: Listing, done: int, total: int) -> None: ...
    def partition_finished(self, report: PartitionReport) -> None: ...


@dataclass(frozen=True, slots=True)
class Intake:
    """What the pages of one partition amounted to, once staged."""

    settled: bool
    """Every listing settled within :data:`MAX_LISTING_PASSES`."""
    total_count: int
    invalid: int
    invalid_without_id: int
    keep_ids: tuple[str, ...]
    """Listed images the merge must neither update nor remove: invalid items with an
    id, and images read on no page that the API still returns by id."""

    @property
    def complete(self) -> bool:
        """Only a complete partition may remove images."""
        return self.settled and self.invalid_without_id == 0

    def problem(self) -> tuple[str | None, str | None]:
        """``(error_status, error_message)`` of an incomplete partition, else Nones."""
        if not self.settled:
            return "DRIFT", (
                f"the listing kept changing while it was read ({MAX_LISTING_PASSES} passes): "
                "nothing was removed"
            )
        if self.invalid_without_id:
            return "INVALID_ITEMS", (
                f"{self.invalid_without_id} items without a usable imageId: nothing was removed"
            )
        return None, None


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
    # A resync: an item listed with its stored content hash (asked of the database page
    # by page) is only recorded as seen, not normalised or staged in full.
    resync: bool = False
    # listing -> ids (of its last pass) that other image APIs are asked about.
    extras_ids: dict[int, list[str]] = field(default_factory=dict)


class PartitionIntake:
    """Takes in one partition's pages (:meth:`take_in`); its counts of invalid items stay
    readable when the partition fails half-way."""

    def __init__(
        self,
        client: ImagesClient,
        partition: Partition,
        *,
        page_size: int,
        stats: RequestStats,
        progress: Progress,
        window: asyncio.Semaphore | None = None,
    ) -> None:
        self.client = client
        self.window = window  # the run's pages ahead (listing.RUN_PAGES_AHEAD)
        self.partition = partition
        self.page_size = page_size
        self.stats = stats
        self.progress = progress
        self.staged = _Staged()
        self._stage_lock = asyncio.Lock()

    @property
    def invalid(self) -> int:
        return self.staged.invalid

    async def take_in(self, writer: PartitionWriter) -> Intake:
        """List, validate and stage every listing of the partition through ``writer``
        (opened, in the partition's transaction). API errors propagate."""
        staged, partition = self.staged, self.partition
        staged.resync = await writer.has_listed()
        settled = all(
            await gather_or_cancel(
                *(self._list_until_settled(writer, listing) for listing in partition.listings())
            )
        )
        if partition.source in EXTRA_SOURCES:
            ids = sorted({i for ids in staged.extras_ids.values() for i in ids})
            stored = [e.image_id for e in await writer.stored_extras(ids)]
            extras, vanished = await fetch_extras(self.client, partition, ids, self.stats, stored)
            # Deleted between its listing and its members or constraints call: keep
            # what is stored (the next sync sees it gone), no spurious change.
            await writer.stage_extras([*extras, *await writer.stored_extras(vanished)])
        if settled and staged.invalid_without_id == 0:
            staged.keep_ids |= await self._still_there(writer)
        return Intake(
            settled=settled,
            total_count=sum(o.total_count for o in staged.outcomes.values()),
            invalid=staged.invalid,
            invalid_without_id=staged.invalid_without_id,
            keep_ids=tuple(sorted(staged.keep_ids)),
        )

    async def _list_until_settled(self, writer: PartitionWriter, listing: Listing) -> bool:
        """List (and stage) one listing until it settles or the passes run out."""
        staged = self.staged
        for attempt in range(1, MAX_LISTING_PASSES + 1):
            if attempt > 1:
                async with self._stage_lock:
                    await writer.discard_listing(listing.index)
            this_pass = _ListingPass(writer, listing, staged, self._stage_lock)
            outcome = await list_pages(
                self.client,
                listing,
                page_size=self.page_size,
                stats=self.stats,
                on_page=this_pass.on_page,
                on_progress=lambda done, total: self.progress.pages(
                    self.partition, listing, done, total
                ),
                window=self.window,
            )
            staged.outcomes[listing.index] = outcome
            staged.extras_ids[listing.index] = this_pass.extras_ids
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

    async def _still_there(self, writer: PartitionWriter) -> set[str]:
        """Of the images a complete partition would remove (listed before, on no page
        now), those the API still returns by id: they are kept, not removed.

        Settled listings can still miss an image: one moving between the offline=false
        and offline=true listings between their reads is in neither, and within a listing
        a deletion above a page boundary plus an insertion below it between two page
        reads keep totalCount and the count while the image sliding across the boundary
        is read on no page. An id lookup does not page, so it cannot miss it."""
        staged, partition = self.staged, self.partition
        missing = [i for i in await writer.unstaged_listed() if i not in staged.keep_ids]
        wanted = set(missing)
        if not missing:
            return set()
        found = await self.client.lookup_ids(partition.region, missing, stats=self.stats)
        kept = {
            item["imageId"]
            for item in found
            if isinstance(item, dict)
            and item.get("imageSource") == partition.source
            and item.get("imageId") in wanted
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
        source = self.listing.source
        rows: list[ImageRow] = []
        unchanged: list[str] = []
        known: set[str] = set()
        if self.staged.resync:
            ids: list[str] = []
            hashes: list[bytes] = []
            for item in items:
                image_id = item.get("imageId") if isinstance(item, dict) else None
                digest = content_hash(item, source) if isinstance(image_id, str) else None
                if digest is not None:
                    ids.append(image_id)  # type: ignore[arg-type]
                    hashes.append(digest)
            async with self.lock:  # the partition's one connection
                known = await self.writer.unchanged_of(ids, hashes)
        for item in items:
            image_id = item.get("imageId") if known and isinstance(item, dict) else None
            if isinstance(image_id, str) and image_id in known:
                if image_id not in self.ids:
                    self.ids.add(image_id)
                    unchanged.append(image_id)
                    if self._wants_extras(item):
                        self.extras_ids.append(image_id)
                continue
            row = self._row(item)
            if row is None or row.image_id in self.ids:
                continue  # invalid, or seen on an earlier page of this pass (page drift)
            self.ids.add(row.image_id)
            rows.append(row)
            if self._wants_extras(item):
                self.extras_ids.append(row.image_id)
        async with self.lock:
            await self.writer.stage(rows, self.listing.index)
            await self.writer.stage_unchanged(unchanged, self.listing.index)

    def _row(self, item: Any) -> ImageRow | None:
        """The item's row; None for an invalid item, counted and logged once."""
        staged, listing = self.staged, self.listing
        try:
            return normalize_image(item, region_id=listing.region, image_source=listing.source)
        except InvalidItem as exc:
            if exc.image_id:
                if exc.image_id in self.ids:
                    return None  # seen on an earlier page of this pass
                staged.keep_ids.add(exc.image_id)
                self.ids.add(exc.image_id)
                key = (listing.index, exc.image_id)
            else:
                self.idless += 1
                key = (listing.index, f"#{self.idless}")
            if key in staged.invalid_seen:
                return None  # counted in an earlier pass over this listing
            staged.invalid_seen.add(key)
            staged.invalid += 1
            if not exc.image_id:
                staged.invalid_without_id += 1
            if staged.invalid <= MAX_REPORTED_INVALID:
                log.warning("partition %s: invalid item skipped: %s", listing, exc)
            return None


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
    ``stored``, the ids with a stored constraint, is for). Any other failure raises: the
    partition fails and its transaction rolls back. An id that cannot be put in a URL as
    it is (no real one) is not asked about: its extras stay null."""
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

    await gather_or_cancel(*(confirm(i) for i in sorted(wanted & set(stored) - found.keys())))
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
    (not one task per id: waiting tasks cost memory per id, bench/README.md)."""
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

    await gather_or_cancel(*(worker() for _ in range(min(MEMBERS_CONCURRENCY, len(ids)))))
    return found, vanished


async def gather_or_cancel(*aws: Coroutine[Any, Any, _T]) -> list[_T]:
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
