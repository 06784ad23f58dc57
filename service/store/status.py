"""Read-only queries of the status views and run tables, as frozen typed rows.

What ``image-sync status``, the status server (``/readyz``, ``/metrics``, ``/``) and the
demo read: only the views and run tables of schema ``inventory`` (``sync_health``,
``inventory_summary``, ``offline_transitions``, ``current_images``, ``sync_runs``,
``sync_partitions``, ``image_events``); nothing here writes. Functions taking an
engine open (and translate the errors of) their own connection; those taking a
connection run on the caller's (:func:`~service.store.engine.connect`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from service.store.engine import Connection, Engine, connect

_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One row of ``inventory.sync_health``: a partition's latest outcome."""

    region_id: str
    image_source: str
    last_status: str | None
    last_success_at: datetime | None
    age_seconds: float | None
    last_error_status: str | None
    last_error_message: str | None
    configured: bool
    account: str | None = None
    """The partition's account (private, shared); None for a catalogue partition."""


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of ``inventory.sync_runs`` with its events summed (``events``)."""

    run_id: int
    started_at: datetime
    finished_at: datetime | None
    status: str
    trigger: str
    host: str
    partitions: int
    partitions_failed: int
    api_requests: int
    retries: int
    images_seen: int
    created: int
    updated: int
    went_offline: int
    came_online: int
    removed: int
    reappeared: int
    error_message: str | None
    events: int


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """Images of one (region, source) in ``inventory.inventory_summary``."""

    region_id: str
    image_source: str
    images: int
    offline: int


@dataclass(frozen=True, slots=True)
class ImagesGauge:
    """Images of one (region, source, offline) for the ``image_sync_images`` gauge."""

    region_id: str
    image_source: str
    offline: bool | None
    images: int


@dataclass(frozen=True, slots=True)
class TransitionBucket:
    """Offline transitions in one bucket of ``offline_transitions``, from ``start``."""

    start: datetime
    went_offline: int
    came_online: int


@dataclass(frozen=True, slots=True)
class RunDuration:
    run_id: int
    started_at: datetime
    status: str
    partitions: int
    seconds: float


@dataclass(frozen=True, slots=True)
class EventSample:
    """An event of a run, as the demo prints it."""

    event_type: str
    region_id: str
    image_id: str
    changed_fields: tuple[str, ...]


_HEALTH = """
SELECT region_id, image_source, last_status, last_success_at, age_seconds,
       last_error_status, last_error_message, configured, account
  FROM inventory.sync_health ORDER BY region_id, image_source, account NULLS FIRST
"""
_RUNS = """
SELECT run_id, started_at, finished_at, status, trigger, host, partitions, partitions_failed,
       api_requests, retries, images_seen, created, updated, went_offline, came_online,
       removed, reappeared, error_message,
       created + updated + went_offline + came_online + removed + reappeared AS events
  FROM inventory.sync_runs ORDER BY run_id DESC LIMIT :n
"""
_SUMMARY = """
SELECT region_id, image_source, sum(images)::bigint AS images,
       coalesce(sum(images) FILTER (WHERE offline), 0)::bigint AS offline
  FROM inventory.inventory_summary GROUP BY region_id, image_source ORDER BY 1, 2
"""
_NEWEST_SUCCESS_AGE = """
SELECT extract(epoch FROM clock_timestamp() - max(finished_at))::double precision
  FROM inventory.sync_partitions
 WHERE status = 'succeeded' AND region_id = ANY(:regions) AND image_source = ANY(:sources)
"""
_IMAGES_GAUGE = """
SELECT region_id, image_source, offline, sum(images)::bigint AS images
  FROM inventory.inventory_summary GROUP BY region_id, image_source, offline
"""
_LAST_SUCCESS_GAUGE = """
SELECT region_id, image_source, coalesce(account, '') AS account,
       extract(epoch FROM last_success_at)::double precision AS ts
  FROM inventory.sync_health WHERE last_success_at IS NOT NULL
"""
_FAILING = """
SELECT region_id, image_source, coalesce(account, '') AS account,
       coalesce(last_status IN ('failed', 'incomplete'), false) AS failing
  FROM inventory.sync_health
"""
_FIRST_TRANSITION = """
SELECT min(occurred_at) FROM inventory.offline_transitions WHERE occurred_at >= :since
"""
_TRANSITIONS = """
SELECT date_bin(make_interval(secs => :bucket), occurred_at, timestamptz '2000-01-01 00:00Z')
           AS start,
       count(*) FILTER (WHERE event_type = 'went_offline')::bigint AS went_offline,
       count(*) FILTER (WHERE event_type = 'came_online')::bigint AS came_online
  FROM inventory.offline_transitions
 WHERE occurred_at >= :since
 GROUP BY 1 ORDER BY 1
"""
_DURATIONS = """
SELECT run_id, started_at, status, partitions,
       extract(epoch FROM finished_at - started_at)::double precision AS seconds
  FROM inventory.sync_runs
 WHERE finished_at IS NOT NULL
 ORDER BY run_id DESC LIMIT :n
"""
_EVENTS_BY_TYPE = """
SELECT event_type, count(*) AS n FROM inventory.image_events
 WHERE sync_run_id = :run GROUP BY event_type
"""
_EVENT_SAMPLE = """
SELECT e.event_type, e.region_id, e.image_id, e.changed_fields
  FROM inventory.image_events e WHERE e.sync_run_id = :run
 ORDER BY e.event_id LIMIT :n
"""


async def _rows(conn: Connection, cls: type[_R], sql: str, **params: Any) -> list[_R]:
    """The statement's rows as ``cls`` (its fields named as the statement's columns)."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    result = await conn.execute(sa.text(sql), params)
    return [cls(**{n: getattr(row, n) for n in names}) for row in result.all()]


async def ping(conn: Connection) -> None:
    """One round trip: the server answers."""
    await conn.execute(sa.text("SELECT 1"))


async def database_now(conn: Connection) -> datetime:
    """The database's clock (the transaction's start)."""
    now = await conn.scalar(sa.text("SELECT now()"))
    assert isinstance(now, datetime)
    return now


async def partition_health(conn: Connection) -> list[HealthRow]:
    """``sync_health``, by region and source."""
    return await _rows(conn, HealthRow, _HEALTH)


async def recent_runs(conn: Connection, n: int) -> list[RunRow]:
    """The ``n`` newest runs, newest first."""
    return await _rows(conn, RunRow, _RUNS, n=n)


async def inventory_summary(conn: Connection) -> list[SummaryRow]:
    """Images and offline images per (region, source)."""
    return await _rows(conn, SummaryRow, _SUMMARY)


async def newest_success_age(
    conn: Connection, regions: Sequence[str], sources: Sequence[str]
) -> float | None:
    """Seconds since any of these partitions last succeeded; None when none ever did."""
    age = await conn.scalar(
        sa.text(_NEWEST_SUCCESS_AGE), {"regions": list(regions), "sources": list(sources)}
    )
    return None if age is None else float(age)


async def images_gauge(conn: Connection) -> list[ImagesGauge]:
    return await _rows(conn, ImagesGauge, _IMAGES_GAUGE)


async def last_success_times(conn: Connection) -> dict[tuple[str, str, str], float]:
    """Unix time of the last success per partition identity (region, source, account;
    ``""`` for a catalogue partition) that ever succeeded."""
    rows = (await conn.execute(sa.text(_LAST_SUCCESS_GAUGE))).all()
    return {(r.region_id, r.image_source, r.account): r.ts for r in rows}


async def failing_partitions(conn: Connection) -> dict[tuple[str, str, str], bool]:
    """Each partition ``sync_health`` shows (region, source, account): whether its latest
    outcome is failed or incomplete."""
    rows = await conn.execute(sa.text(_FAILING))
    return {(r.region_id, r.image_source, r.account): bool(r.failing) for r in rows}


async def first_transition(conn: Connection, since: datetime) -> datetime | None:
    """When the first offline transition at or after ``since`` happened."""
    first = await conn.scalar(sa.text(_FIRST_TRANSITION), {"since": since})
    return first if isinstance(first, datetime) else None


async def transition_counts(
    conn: Connection, since: datetime, bucket_seconds: int
) -> list[TransitionBucket]:
    """Offline transitions since ``since`` per bucket (buckets aligned on 2000-01-01 UTC),
    only the buckets that have any."""
    return await _rows(conn, TransitionBucket, _TRANSITIONS, bucket=bucket_seconds, since=since)


async def run_durations(conn: Connection, n: int) -> list[RunDuration]:
    """The ``n`` newest finished runs, oldest first."""
    return list(reversed(await _rows(conn, RunDuration, _DURATIONS, n=n)))


async def status_tables(engine: Engine, runs: int) -> tuple[list[HealthRow], list[RunRow]]:
    """``image-sync status``: partition health and the ``runs`` newest runs."""
    async with connect(engine, "cannot read the status") as conn:
        return await partition_health(conn), await recent_runs(conn, runs)


async def events_by_type(engine: Engine, run_id: int) -> dict[str, int]:
    """How many events of each type a run recorded."""
    async with connect(engine, "cannot read the events") as conn:
        rows = (await conn.execute(sa.text(_EVENTS_BY_TYPE), {"run": run_id})).all()
    return {r.event_type: r.n for r in rows}


async def event_sample(engine: Engine, run_id: int, n: int) -> list[EventSample]:
    """The first ``n`` events of a run."""
    async with connect(engine, "cannot read the events") as conn:
        rows = (await conn.execute(sa.text(_EVENT_SAMPLE), {"run": run_id, "n": n})).all()
    return [
        EventSample(r.event_type, r.region_id, r.image_id, tuple(r.changed_fields or ()))
        for r in rows
    ]


async def summary_and_listed(engine: Engine) -> tuple[list[SummaryRow], int]:
    """The inventory summary and the number of images listed now (``current_images``)."""
    async with connect(engine, "cannot read the inventory") as conn:
        listed = await conn.scalar(sa.text("SELECT count(*) FROM inventory.current_images"))
        return await inventory_summary(conn), int(listed or 0)
