"""The change feed: commit-ordered batches of events, NOTIFY, and webhook cursors.

Writing (inside a partition's transaction, the merge's last call): :func:`record_batch`
takes the next number from ``inventory.feed_clock`` and files the transaction's events
under it in ``inventory.change_batches``, then queues ``NOTIFY inventory_changes``.
The clock's row lock is held until the transaction ends, so transactions that took
numbers commit in number order: a reader that can see batch N can see every batch
before it (docs/queries.md, "Change feed", has the whole argument).

Reading: :func:`read_changes` pages ``inventory.changes_since()``; an event's cursor is
``batch << 24 | position``, so a page may end inside a batch and the next call resumes
at the following event of that batch.

Webhook subscribers' cursors live in ``inventory.webhook_cursors``; a session-level
advisory lock per subscriber (:func:`try_lock_subscriber`) makes one replica at a time
deliver for it.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.errors import DatabaseError
from service.store.engine import connect, database_errors
from service.store.tables import FEED_POSITION_BITS

CHANNEL = "inventory_changes"
"""The NOTIFY channel of the feed (DESIGN.md)."""

SUBSCRIBER_LOCK_SPACE = 0x1D5E
"""First key of the advisory locks that make one replica deliver for a subscriber."""

MAX_BATCH_EVENTS = (1 << FEED_POSITION_BITS) - 1
"""Events one transaction may file under one batch (the cursor's position bits)."""

# The events this transaction inserted for the partition: those after the floor read
# before the merge inserted any (so the primary key is scanned over the last few events
# only, never a region's whole history) whose xmin is this transaction (the merge runs
# no subtransactions).
_RECORD_BATCH = """
WITH mine AS (
    SELECT e.event_id FROM inventory.image_events e
     WHERE e.event_id > :floor
       AND e.xmin = pg_current_xact_id()::xid
       AND e.sync_run_id = :run_id AND e.region_id = :region AND e.image_source = :source
), ids AS (
    SELECT count(*)::integer AS n, array_agg(event_id ORDER BY event_id) AS ids FROM mine
), clock AS (
    UPDATE inventory.feed_clock SET batch = batch + 1 RETURNING batch
)
INSERT INTO inventory.change_batches
       (batch, committed_at, run_id, region_id, image_source, event_count, event_ids, account)
SELECT clock.batch, clock_timestamp(), :run_id, :region, :source, ids.n, ids.ids, :account
  FROM clock, ids
RETURNING batch, event_count
"""

_READ = """
SELECT c.cursor, c.committed_at, c.event_id, c.event_type, c.region_id, c.image_source,
       c.image_id, c.document
  FROM inventory.changes_since(:cursor, :max_rows) c
"""

_END = f"""
SELECT coalesce((SELECT (batch << {FEED_POSITION_BITS}) | event_count
                   FROM inventory.change_batches ORDER BY batch DESC LIMIT 1), 0)
"""

_LAG = f"""
SELECT coalesce(sum(b.event_count), 0)::bigint
         - coalesce(sum(CASE WHEN b.batch = :cursor >> {FEED_POSITION_BITS}
                             THEN least(:cursor & {MAX_BATCH_EVENTS}, b.event_count)
                             ELSE 0 END), 0)::bigint AS events,
       coalesce(extract(epoch FROM clock_timestamp() - min(b.committed_at)
                         FILTER (WHERE b.batch > :cursor >> {FEED_POSITION_BITS}
                                    OR (:cursor & {MAX_BATCH_EVENTS}) < b.event_count)),
                0)::double precision AS seconds
  FROM inventory.change_batches b
 WHERE b.batch >= :cursor >> {FEED_POSITION_BITS}
"""


_FLOOR = "SELECT coalesce(max(event_id), 0) FROM inventory.image_events"


async def event_id_floor(conn: AsyncConnection) -> int:
    """An event id below every id this transaction will take from now on: the highest
    id it can see, which the sequence handed out before any id still to come (a backward
    scan of the primary key; reading the sequence itself would need a privilege on it
    that a role granted only the tables lacks)."""
    return int(await conn.scalar(sa.text(_FLOOR)) or 0)


def cursor_of(batch: int, position: int) -> int:
    """The feed cursor of the ``position``-th (1-based) event of ``batch``."""
    return (batch << FEED_POSITION_BITS) | position


@dataclass(frozen=True, slots=True)
class Change:
    """One event of the feed. ``document`` is the whole ``image_events`` row (every
    column, also those added by later migrations), as JSON."""

    cursor: int
    committed_at: datetime
    event_id: int
    event_type: str
    region_id: str
    image_source: str
    image_id: str
    document: Mapping[str, Any]

    def payload(self) -> dict[str, Any]:
        """The event as webhooks and ``image-sync changes --json`` send it."""
        return {**self.document, "cursor": self.cursor}


async def record_batch(
    conn: AsyncConnection,
    *,
    run_id: int,
    region: str,
    source: str,
    counts: Mapping[str, int],
    floor: int,
    account: str | None = None,
) -> int | None:
    """File the events this transaction recorded for the partition as the feed's next
    batch and queue the NOTIFY; returns the batch's last cursor, or None (and writes
    nothing) when there were no events. ``floor`` is :func:`event_id_floor` read before
    the events were inserted. Call it last before the commit: the feed clock stays
    locked until then, and other partitions wait for it to take their number."""
    expected = sum(counts.values())
    if expected == 0:
        return None
    if expected > MAX_BATCH_EVENTS:
        raise DatabaseError(f"{expected} events in one partition: the feed takes at most "
                            f"{MAX_BATCH_EVENTS} per commit")  # fmt: skip
    params = {
        "run_id": run_id,
        "region": region,
        "source": source,
        "floor": floor,
        "account": account,
    }
    row = (await conn.execute(sa.text(_RECORD_BATCH), params)).one()
    if row.event_count != expected:
        # A bug, not an outage: roll the partition back rather than file a wrong batch.
        raise DatabaseError(
            f"change feed: found {row.event_count} of the {expected} events the merge of "
            f"{region}/{source} recorded"
        )
    cursor = cursor_of(row.batch, row.event_count)
    payload = {
        "run_id": run_id,
        "account": account,
        "region_id": region,
        "image_source": source,
        "counts": {name: n for name, n in counts.items() if n},
        "cursor": cursor,
    }
    await conn.execute(
        sa.text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": json.dumps(payload, separators=(",", ":"))},
    )
    return cursor


async def read_changes(conn: AsyncConnection, cursor: int, max_rows: int = 1000) -> list[Change]:
    """At most ``max_rows`` events after ``cursor``, in commit order (one snapshot)."""
    result = await conn.execute(sa.text(_READ), {"cursor": cursor, "max_rows": max_rows})
    return [
        Change(
            cursor=r.cursor,
            committed_at=r.committed_at,
            event_id=r.event_id,
            event_type=r.event_type,
            region_id=r.region_id,
            image_source=r.image_source,
            image_id=r.image_id,
            document=_json(r.document),
        )
        for r in result
    ]


@asynccontextmanager
async def listen(engine: AsyncEngine) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """``LISTEN inventory_changes`` on a pooled connection held while the block runs;
    the queue receives each notification's payload (a commit that recorded events)."""
    async with connect(engine, "cannot LISTEN") as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            queue.put_nowait(json.loads(payload))

        await driver.add_listener(CHANNEL, on_notify)
        try:
            yield queue
        finally:
            await driver.remove_listener(CHANNEL, on_notify)


def _json(value: Any) -> Mapping[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


async def feed_end(conn: AsyncConnection) -> int:
    """The cursor of the newest committed event (0 when the feed is empty)."""
    return int(await conn.scalar(sa.text(_END)) or 0)


async def cursor_at(conn: AsyncConnection, since: datetime) -> int:
    """The cursor standing before the first batch committed at or after ``since`` (the
    feed's end when there is none)."""
    batch = await conn.scalar(
        sa.text("SELECT min(batch) FROM inventory.change_batches WHERE committed_at >= :since"),
        {"since": since},
    )
    return cursor_of(int(batch), 0) if batch is not None else await feed_end(conn)


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a cursor is behind the feed's end."""

    events: int
    seconds: float


async def lag_of(conn: AsyncConnection, cursor: int) -> Lag:
    """Events committed after ``cursor``, and the age of the oldest of them."""
    row = (await conn.execute(sa.text(_LAG), {"cursor": cursor})).one()
    return Lag(int(row.events), float(row.seconds))


# -- webhook subscribers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriberState:
    """One row of ``inventory.webhook_cursors``."""

    subscriber: str
    url: str
    cursor: int
    created_at: datetime
    delivered_at: datetime | None
    attempted_at: datetime | None
    failing: bool
    failures: int
    last_error: str | None


def subscriber_lock_key(subscriber: str) -> int:
    """Second advisory-lock key of a subscriber: a stable signed 32-bit hash."""
    value = zlib.crc32(subscriber.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


async def try_lock_subscriber(conn: AsyncConnection, subscriber: str) -> bool:
    """Take the subscriber's session-level lock on ``conn`` (autocommit); False when
    another replica is delivering for it. :func:`unlock_subscriber` releases it; a dead
    connection releases it too."""
    return bool(
        await conn.scalar(
            sa.text("SELECT pg_try_advisory_lock(:space, :key)"),
            {"space": SUBSCRIBER_LOCK_SPACE, "key": subscriber_lock_key(subscriber)},
        )
    )


@database_errors("cannot release a webhook subscriber's lock")
async def unlock_subscriber(conn: AsyncConnection, subscriber: str) -> None:
    await conn.execute(
        sa.text("SELECT pg_advisory_unlock(:space, :key)"),
        {"space": SUBSCRIBER_LOCK_SPACE, "key": subscriber_lock_key(subscriber)},
    )


async def ensure_subscriber(
    conn: AsyncConnection, subscriber: str, *, url: str, from_beginning: bool
) -> int:
    """The subscriber's stored cursor; a new subscriber starts at the feed's end (no
    backlog), or at 0 with ``from_beginning``."""
    start = 0 if from_beginning else await feed_end(conn)
    await conn.execute(
        sa.text(
            "INSERT INTO inventory.webhook_cursors (subscriber, url, cursor, created_at)"
            " VALUES (:subscriber, :url, :cursor, now())"
            " ON CONFLICT (subscriber) DO UPDATE SET url = EXCLUDED.url"
        ),
        {"subscriber": subscriber, "url": url, "cursor": start},
    )
    return int(
        await conn.scalar(
            sa.text("SELECT cursor FROM inventory.webhook_cursors WHERE subscriber = :s"),
            {"s": subscriber},
        )
    )


async def advance_subscriber(
    conn: AsyncConnection, subscriber: str, cursor: int, *, delivered: bool
) -> None:
    """Store an acknowledged cursor (``delivered``: a batch was POSTed, not only events
    the subscriber's filters skip); the subscriber is no longer failing."""
    await conn.execute(
        sa.text(
            "UPDATE inventory.webhook_cursors SET cursor = greatest(cursor, :cursor),"
            " failing = false, failures = 0, last_error = NULL,"
            " delivered_at = CASE WHEN :delivered THEN now() ELSE delivered_at END,"
            " attempted_at = CASE WHEN :delivered THEN now() ELSE attempted_at END"
            " WHERE subscriber = :subscriber"
        ),
        {"subscriber": subscriber, "cursor": cursor, "delivered": delivered},
    )


async def mark_subscriber_failing(conn: AsyncConnection, subscriber: str, error: str) -> None:
    """A delivery failed all its attempts: the cursor stays, the subscriber is failing."""
    await conn.execute(
        sa.text(
            "UPDATE inventory.webhook_cursors SET failing = true, failures = failures + 1,"
            " last_error = :error, attempted_at = now() WHERE subscriber = :subscriber"
        ),
        {"subscriber": subscriber, "error": error[:500]},
    )


async def subscriber_states(
    conn: AsyncConnection, names: Sequence[str] | None = None
) -> list[SubscriberState]:
    """The stored subscribers (only ``names`` when given), by name."""
    query = "SELECT * FROM inventory.webhook_cursors"
    params: dict[str, Any] = {}
    if names is not None:
        query += " WHERE subscriber = ANY(:names)"
        params["names"] = list(names)
    result = await conn.execute(sa.text(query + " ORDER BY subscriber"), params)
    return [SubscriberState(**r._mapping) for r in result]


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    """A subscriber's stored state and how far it lags the feed (status page, CLI)."""

    state: SubscriberState
    lag: Lag


async def subscriber_statuses(conn: AsyncConnection) -> list[SubscriberStatus]:
    """Every stored webhook subscriber with its lag, by name."""
    return [
        SubscriberStatus(state, await lag_of(conn, state.cursor))
        for state in await subscriber_states(conn)
    ]
