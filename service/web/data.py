"""What the status server shows, from the store's read queries: readiness, metric
gauges, page data.

The queries are :mod:`service.store.status` (the same as ``image-sync status``'s); this
module turns their rows into the gauges and the page's data (transition buckets with
the empty ones filled in). Nothing here writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from service.config import OFFLINE_SOURCES
from service.metrics import Metrics
from service.store import status
from service.store.engine import Connection
from service.store.feed import SubscriberStatus, subscriber_statuses
from service.store.status import HealthRow, RunDuration, RunRow, SummaryRow, TransitionBucket

TRANSITIONS_WINDOW = timedelta(days=7)
"""How far back the offline-transitions chart looks."""
MAX_BUCKETS = 48
BUCKET_SECONDS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
"""Candidate bucket widths of the transitions chart; the smallest giving <= MAX_BUCKETS."""


def offline_label(offline: bool | None) -> str:
    """The ``offline`` label of ``image_sync_images``: true, false, or none (no such flag)."""
    return "none" if offline is None else str(offline).lower()


async def refresh_gauges(
    conn: Connection,
    metrics: Metrics,
    regions: Sequence[str],
    sources: Sequence[str],
) -> None:
    """Set ``image_sync_images`` and ``..._last_success_timestamp_seconds`` from the database.

    Configured partitions without images report 0, so a partition that empties does not
    vanish from the series; partitions that never succeeded have no timestamp.
    """
    images: dict[tuple[str, str, str], float] = {}
    for region in regions:
        for source in sources:
            for offline in (False, True) if source in OFFLINE_SOURCES else (None,):
                images[region, source, offline_label(offline)] = 0
    for row in await status.images_gauge(conn):
        images[row.region_id, row.image_source, offline_label(row.offline)] = row.images
    last = await status.last_success_times(conn)
    metrics.images.clear()
    for labels, value in images.items():
        metrics.images.labels(*labels).set(value)
    metrics.last_success.clear()
    for (region, source, account), ts in last.items():
        metrics.last_success.labels(region, source, account).set(ts)
    # Red in the tick that failed (refused credentials, unreachable endpoint), not only
    # once the last success has aged past the stale threshold; per partition identity.
    failing = await status.failing_partitions(conn)
    metrics.partition_failing.clear()
    for (region, source, account), red in failing.items():
        metrics.partition_failing.labels(region, source, account).set(int(red))
    for subscriber in await subscriber_statuses(conn):
        name = subscriber.state.subscriber
        metrics.webhook_failing.labels(name).set(1 if subscriber.state.failing else 0)
        metrics.webhook_lag_events.labels(name).set(subscriber.lag.events)
        metrics.webhook_lag_seconds.labels(name).set(subscriber.lag.seconds)


@dataclass(frozen=True, slots=True)
class Transitions:
    """Offline transitions counted per bucket (``bucket_seconds`` wide), oldest first."""

    bucket_seconds: int
    buckets: tuple[TransitionBucket, ...]


@dataclass(frozen=True, slots=True)
class PageData:
    """Everything the status page shows, read in one go."""

    now: datetime
    health: list[HealthRow]
    runs: list[RunRow]
    summary: list[SummaryRow]
    transitions: Transitions
    durations: list[RunDuration]
    webhooks: list[SubscriberStatus] = field(default_factory=list)


def bucket_width(span_seconds: float) -> int:
    """The smallest candidate width that covers ``span_seconds`` in <= MAX_BUCKETS bars."""
    for width in BUCKET_SECONDS:
        if span_seconds / width <= MAX_BUCKETS:
            return width
    return BUCKET_SECONDS[-1]


async def transitions(conn: Connection, now: datetime) -> Transitions:
    since = now - TRANSITIONS_WINDOW
    first = await status.first_transition(conn, since)
    if first is None:
        return Transitions(3600, ())
    width = bucket_width((now - first).total_seconds())
    rows = await status.transition_counts(conn, since, width)
    counted = {row.start: row for row in rows}
    # Every bucket from the first event to now, empty ones included: time reads left to right.
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    start = epoch + timedelta(seconds=math.floor((first - epoch).total_seconds() / width) * width)
    buckets = []
    while start <= now:
        row = counted.get(start)
        buckets.append(
            TransitionBucket(start, row.went_offline if row else 0, row.came_online if row else 0)
        )
        start += timedelta(seconds=width)
    return Transitions(width, tuple(buckets))


async def page_data(conn: Connection, *, runs: int = 12, durations: int = 40) -> PageData:
    now = await status.database_now(conn)
    return PageData(
        now=now,
        health=await status.partition_health(conn),
        runs=await status.recent_runs(conn, runs),
        summary=await status.inventory_summary(conn),
        transitions=await transitions(conn, now),
        durations=await status.run_durations(conn, durations),
        webhooks=await subscriber_statuses(conn),
    )
