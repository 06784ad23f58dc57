"""Run records: ``sync_runs`` and ``sync_partitions``, and liveness of running runs.

A process holds a session-level advisory lock ``(RUN_LOCK_SPACE, run_id)`` on a
dedicated connection for as long as its run is ``running``. PostgreSQL releases it
when the process or its connection dies, so :func:`mark_abandoned` can tell a run that
is still in progress on another replica from one whose process crashed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.errors import DatabaseError
from service.jdcloud.listing import Partition
from service.store.apply import MergeCounts
from service.store.engine import DRIVER_ERRORS, database_errors
from service.store.tables import sync_partitions, sync_runs

RUN_LOCK_SPACE = 0x1D5D

RUN_IS_LIVE = f"""EXISTS (
    SELECT 1 FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid = {RUN_LOCK_SPACE} AND l.objid = (r.run_id % 2147483648)
       AND l.objsubid = 2)"""
"""SQL: true while the process of run ``r`` (a ``sync_runs`` row) holds its liveness lock."""


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """The outcome of one partition in one run: what the sync reports and, unless its
    status is one of :data:`~service.vocabulary.NOT_RECORDED`, one ``sync_partitions``
    row."""

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
    """How long the partition took (the process's monotonic clock; the database's clock
    places it: it finished when recorded, and started ``seconds`` before)."""


async def start_run(lock_conn: AsyncConnection, *, trigger: str) -> int:
    """Insert a ``running`` run and take its liveness lock on ``lock_conn`` (autocommit,
    from :func:`~service.store.engine.connect`, which translates driver errors)."""
    run_id: int = await lock_conn.scalar(
        sa.insert(sync_runs)
        .values(
            started_at=sa.func.now(),
            status="running",
            trigger=trigger,
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        .returning(sync_runs.c.run_id)
    )
    locked = await lock_conn.scalar(
        sa.text("SELECT pg_try_advisory_lock(:space, :key)"),
        {"space": RUN_LOCK_SPACE, "key": run_id % (1 << 31)},
    )
    if not locked:  # only if a crashed run's id wrapped around onto ours: refuse, loudly
        raise DatabaseError(f"the liveness lock of run {run_id} is held by another session")
    return run_id


async def release_run(lock_conn: AsyncConnection, run_id: int) -> None:
    """Release the liveness lock before the connection goes back to the pool."""
    try:
        await lock_conn.execute(
            sa.text("SELECT pg_advisory_unlock(:space, :key)"),
            {"space": RUN_LOCK_SPACE, "key": run_id % (1 << 31)},
        )
    except DRIVER_ERRORS:
        await lock_conn.invalidate()  # a broken connection: its locks died with it


async def finish_run(
    engine: AsyncEngine, run_id: int, *, status: str, totals: dict[str, int], error: str | None
) -> None:
    """Close the run: its status, totals and error (one line or None)."""
    with database_errors(f"run {run_id} ended {status} but could not be recorded"):
        async with engine.begin() as conn:
            await conn.execute(
                sa.update(sync_runs)
                .where(sync_runs.c.run_id == run_id)
                .values(finished_at=sa.func.now(), status=status, error_message=error, **totals)
            )


async def record_partition(conn: AsyncConnection, run_id: int, report: PartitionReport) -> None:
    """Insert one partition outcome (in the caller's transaction)."""
    await record_partitions(conn, run_id, [report])


async def record_partitions(
    conn: AsyncConnection, run_id: int, reports: Sequence[PartitionReport]
) -> None:
    """Insert partition outcomes in one multi-row statement (in the caller's transaction,
    whose block translates driver errors: :class:`~service.store.engine.database_errors`).

    Their times come from the database's clock, as the runs' do: a replica whose clock
    is off neither misplaces the rows nor moves the freshness guard
    (:meth:`~service.store.apply.PartitionWriter.succeeded_within`)."""
    if not reports:
        return
    rows: list[dict[str, Any]] = []
    for report in reports:
        values: dict[str, Any] = {f: getattr(report, f) for f in PartitionReport.__slots__}
        partition: Partition = values.pop("partition")
        values.update(
            asdict(values.pop("counts")),
            run_id=run_id,
            region_id=partition.region,
            image_source=partition.source,
            account=partition.account_or_none,
        )
        seconds = sa.literal(max(0.0, values.pop("seconds")), sa.Float)
        values["finished_at"] = sa.func.clock_timestamp()
        values["started_at"] = sa.func.clock_timestamp() - sa.func.make_interval(
            0, 0, 0, 0, 0, 0, seconds
        )
        rows.append(values)
    await conn.execute(sa.insert(sync_partitions).values(rows))


@database_errors("cannot check for abandoned runs")
async def mark_abandoned(engine: AsyncEngine) -> int:
    """Mark ``abandoned`` every ``running`` run whose process no longer holds its lock."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.text(
                f"""
                UPDATE inventory.sync_runs r
                   SET status = 'abandoned', finished_at = now(),
                       error_message = coalesce(error_message,
                           'its process stopped before finishing the run')
                 WHERE r.status = 'running' AND NOT {RUN_IS_LIVE}
                """
            )
        )
        return result.rowcount


_PRUNE = """
DELETE FROM inventory.sync_runs r
 WHERE r.started_at < now() - make_interval(days => :days)
   AND r.status <> 'running'
   -- events are never pruned, and they keep the run they name
   AND NOT EXISTS (SELECT 1 FROM inventory.image_events e WHERE e.sync_run_id = r.run_id)
   -- a partition's latest success stays, or sync_health would say "never"
   AND NOT EXISTS (
        SELECT 1 FROM inventory.sync_partitions p
         WHERE p.run_id = r.run_id AND p.status = 'succeeded'
           AND p.finished_at = (SELECT max(q.finished_at) FROM inventory.sync_partitions q
                                 WHERE q.region_id = p.region_id
                                   AND q.image_source = p.image_source
                                   AND q.status = 'succeeded'))
"""


@database_errors("cannot prune old runs")
async def prune_runs(engine: AsyncEngine, keep_days: int) -> int:
    """Delete the runs (and, by cascade, their ``sync_partitions`` rows) that started more
    than ``keep_days`` days ago, unless an event references them or they hold a
    partition's latest success. One set-based statement; returns the runs deleted."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.text(_PRUNE), {"days": keep_days})
        return result.rowcount


_LAST_SUCCESS = """
SELECT region_id, image_source, coalesce(account, '') AS account,
       extract(epoch FROM max(finished_at))::double precision AS last_success
  FROM inventory.sync_partitions
 WHERE status = 'succeeded'
 GROUP BY region_id, image_source, coalesce(account, '')
"""


@database_errors("cannot read the partitions' last successes")
async def last_successes(engine: AsyncEngine) -> dict[Partition, float]:
    """Unix time of each partition's newest success (partitions never synced absent)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text(_LAST_SUCCESS))).all()
    return {Partition(r.region_id, r.image_source, r.account): r.last_success for r in rows}
