"""What the status server reads from PostgreSQL: readiness, metric gauges, page data.

Only the views and run tables of schema ``inventory`` are read (``sync_health``,
``inventory_summary``, ``offline_transitions``, ``sync_runs``, ``sync_partitions``);
nothing here writes. The health, runs and summary queries are those of
``image-sync status`` (:mod:`service.report`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.config import OFFLINE_SOURCES
from service.metrics import Metrics
from service.report import HEALTH_SQL, RUNS_SQL, SUMMARY_SQL
from service.store.feed import SubscriberStatus, subscriber_statuses

NEWEST_SUCCESS_SQL = """
SELECT extract(epoch FROM clock_timestamp() - max(finished_at))::double precision
  FROM inventory.sync_partitions
 WHERE status = 'succeeded' AND region_id = ANY(:regions) AND image_source = ANY(:sources)
"""
IMAGES_GAUGE_SQL = """
SELECT region_id, image_source, offline, sum(images)::bigint AS images
  FROM inventory.inventory_summary GROUP BY region_id, image_source, offline
"""
LAST_SUCCESS_GAUGE_SQL = """
SELECT region_id, image_source, extract(epoch FROM last_success_at)::double precision AS ts
  FROM inventory.sync_health WHERE last_success_at IS NOT NULL
"""
FAILING_GAUGE_SQL = """
SELECT region_id, image_source FROM inventory.sync_health
 WHERE last_status IN ('failed', 'incomplete')
"""
TRANSITIONS_RANGE_SQL = """
SELECT min(occurred_at) FROM inventory.offline_transitions WHERE occurred_at >= :since
"""
TRANSITIONS_SQL = """
SELECT date_bin(make_interval(secs => :bucket), occurred_at, timestamptz '2000-01-01 00:00Z')
           AS bucket,
       count(*) FILTER (WHERE event_type = 'went_offline')::bigint AS went_offline,
       count(*) FILTER (WHERE event_type = 'came_online')::bigint AS came_online
  FROM inventory.offline_transitions
 WHERE occurred_at >= :since
 GROUP BY 1 ORDER BY 1
"""
DURATIONS_SQL = """
SELECT run_id, started_at, status, partitions,
       extract(epoch FROM finished_at - started_at)::double precision AS seconds
  FROM inventory.sync_runs
 WHERE finished_at IS NOT NULL
 ORDER BY run_id DESC LIMIT :n
"""

TRANSITIONS_WINDOW = timedelta(days=7)
"""How far back the offline-transitions chart looks."""
MAX_BUCKETS = 48
BUCKET_SECONDS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
"""Candidate bucket widths of the transitions chart; the smallest giving <= MAX_BUCKETS."""


def offline_label(offline: bool | None) -> str:
    """The ``offline`` label of ``image_sync_images``: true, false, or none (no such flag)."""
    return "none" if offline is None else str(offline).lower()


async def newest_success_age(
    conn: AsyncConnection, regions: Sequence[str], sources: Sequence[str]
) -> float | None:
    """Seconds since any configured partition last succeeded; None when none ever did."""
    age = await conn.scalar(
        sa.text(NEWEST_SUCCESS_SQL), {"regions": list(regions), "sources": list(sources)}
    )
    return None if age is None else float(age)


async def refresh_gauges(
    conn: AsyncConnection,
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
    for row in (await conn.execute(sa.text(IMAGES_GAUGE_SQL))).all():
        images[row.region_id, row.image_source, offline_label(row.offline)] = row.images
    last = {
        (row.region_id, row.image_source): row.ts
        for row in (await conn.execute(sa.text(LAST_SUCCESS_GAUGE_SQL))).all()
    }
    metrics.images.clear()
    for labels, value in images.items():
        metrics.images.labels(*labels).set(value)
    metrics.last_success.clear()
    for (region, source), ts in last.items():
        metrics.last_success.labels(region, source).set(ts)
    # Red in the tick that failed (refused credentials, unreachable endpoint), not only
    # once the last success has aged past the stale threshold.
    failing = {
        (r.region_id, r.image_source) for r in await conn.execute(sa.text(FAILING_GAUGE_SQL))
    }
    metrics.partition_failing.clear()
    for region in regions:
        for source in sources:
            metrics.partition_failing.labels(region, source).set(int((region, source) in failing))
    for status in await subscriber_statuses(conn):
        name = status.state.subscriber
        metrics.webhook_failing.labels(name).set(1 if status.state.failing else 0)
        metrics.webhook_lag_events.labels(name).set(status.lag.events)
        metrics.webhook_lag_seconds.labels(name).set(status.lag.seconds)


@dataclass(frozen=True, slots=True)
class TransitionBucket:
    start: datetime
    went_offline: int
    came_online: int


@dataclass(frozen=True, slots=True)
class Transitions:
    """Offline transitions counted per bucket (``bucket_seconds`` wide), oldest first."""

    bucket_seconds: int
    buckets: tuple[TransitionBucket, ...]


@dataclass(frozen=True, slots=True)
class RunDuration:
    run_id: int
    started_at: datetime
    status: str
    partitions: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PageData:
    """Everything the status page shows, read in one go."""

    now: datetime
    health: list[sa.Row[Any]]
    runs: list[sa.Row[Any]]
    summary: list[sa.Row[Any]]
    transitions: Transitions
    durations: list[RunDuration]
    webhooks: list[SubscriberStatus] = field(default_factory=list)


def bucket_width(span_seconds: float) -> int:
    """The smallest candidate width that covers ``span_seconds`` in <= MAX_BUCKETS bars."""
    for width in BUCKET_SECONDS:
        if span_seconds / width <= MAX_BUCKETS:
            return width
    return BUCKET_SECONDS[-1]


async def transitions(conn: AsyncConnection, now: datetime) -> Transitions:
    since = now - TRANSITIONS_WINDOW
    first = await conn.scalar(sa.text(TRANSITIONS_RANGE_SQL), {"since": since})
    if first is None:
        return Transitions(3600, ())
    width = bucket_width((now - first).total_seconds())
    rows = (await conn.execute(sa.text(TRANSITIONS_SQL), {"bucket": width, "since": since})).all()
    counted = {row.bucket: row for row in rows}
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


async def page_data(conn: AsyncConnection, *, runs: int = 12, durations: int = 40) -> PageData:
    now = await conn.scalar(sa.text("SELECT now()"))
    assert isinstance(now, datetime)
    return PageData(
        now=now,
        health=list((await conn.execute(sa.text(HEALTH_SQL))).all()),
        runs=list((await conn.execute(sa.text(RUNS_SQL), {"n": runs})).all()),
        summary=list((await conn.execute(sa.text(SUMMARY_SQL))).all()),
        transitions=await transitions(conn, now),
        durations=[
            RunDuration(r.run_id, r.started_at, r.status, r.partitions, r.seconds)
            for r in reversed((await conn.execute(sa.text(DURATIONS_SQL), {"n": durations})).all())
        ],
        webhooks=await subscriber_statuses(conn),
    )
