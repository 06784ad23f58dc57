"""``image-sync check``: verify the invariants the inventory promises its readers.

:func:`check_invariants` reads the database in one read-only, repeatable-read
transaction (one snapshot, so a sync committing meanwhile cannot cause a false
alarm; the liveness check, which reads live lock state, runs after it: see
:func:`_run_liveness`) and returns one readable line per broken invariant, each with a
few example keys; an empty list means everything holds. The invariants:

1. ``system_disk``: every listed image whose raw API object has a ``systemDisk`` has
   its position-0 ``system`` disk row, and as many data disk rows as ``dataDisks``;
2. ``removed_at``: ``removed_at`` is set exactly for the images whose last event is
   ``removed`` (and every image has at least one event);
3. ``replay``: the current state equals the events replayed:
   ``images_as_of_events()`` (the fold of the events) lists the same images as
   ``current_images`` with the same field values, disks and unknown API fields (except,
   for an image seen through accounts, ``image_source`` and ``shared_with``, which the
   accounts' rule rewrites without an event);
   ``versions``: so does ``images_as_of()`` (the current rows of ``image_versions``);
4. ``event_order``: each image's history is a valid sequence (it starts with
   ``created``; no second ``created`` without a ``removed`` in between; ``reappeared``
   only after ``removed``; nothing else after ``removed``);
5. ``run_liveness``: no run is ``running`` without a live process holding its
   liveness lock (the test :func:`service.store.runs.mark_abandoned` uses);
6. ``partition_counts``: the events of each recorded partition match the counts in
   its ``sync_partitions`` row, and no partition wrote events without a record (a
   partition's merge and its record share one transaction).

The SQL here is written independently of :mod:`service.store.apply` on purpose: a
checker that reused the merge's own expressions would share its bugs. That is why this
module, alone outside ``service/store/``, builds SQL and imports the driver
(tests/test_architecture.py allows it): it is the store's read-only auditor, not one of
its clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.normalize import DISK_COLUMNS, KNOWN_FIELDS, TRACKED_FIELDS
from service.store.runs import RUN_IS_LIVE

EXAMPLES = 5
"""Keys quoted per broken invariant; the count covers them all."""

_DISK_DOC = (
    "coalesce((SELECT jsonb_agg(jsonb_build_object("
    + ", ".join(f"'{c}', d.{c}" for c in DISK_COLUMNS)
    + ") ORDER BY d.position) FROM inventory.image_disks d"
    " WHERE d.region_id = i.region_id AND d.image_id = i.image_id), '[]'::jsonb)"
)
_KNOWN = "ARRAY[" + ", ".join(f"'{k}'" for k in sorted(KNOWN_FIELDS)) + "]::text[]"


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    description: str
    sql: str  # yields (key text, detail text) rows, one per offender


# Of an image seen through accounts, images.image_source follows the accounts' rule
# (private while a configured account owns it, else shared) and shared_with what its
# owner's listing said, both rewritten without an event when the accounts that see the
# image change (DESIGN.md, Accounts): the events cannot replay them. The versions can.
_ACCOUNT_RULE_FIELDS = ("image_source", "shared_with")


def _differs(field: str, events_only: bool) -> str:
    test = f"c.{field} IS DISTINCT FROM r.{field}"
    if events_only and field in _ACCOUNT_RULE_FIELDS:
        return f"({test} AND c.image_source NOT IN ('private', 'shared'))"
    return test


def _replay(function: str) -> str:
    """Images listed now whose stored state differs from ``function('infinity')``."""
    events_only = function == "images_as_of_events"
    differs = {f: _differs(f, events_only) for f in TRACKED_FIELDS}
    return f"""
    WITH cur AS (
        SELECT i.*, {_DISK_DOC} AS disks, i.raw - {_KNOWN} AS extra
          FROM inventory.images i WHERE i.removed_at IS NULL
    ), replay AS (
        -- 'infinity', not now(): every event visible in this snapshot, even one
        -- whose transaction started after ours.
        SELECT * FROM inventory.{function}('infinity')
    )
    SELECT coalesce(c.region_id, r.region_id) || '/' || coalesce(c.image_id, r.image_id),
           CASE WHEN r.image_id IS NULL THEN 'listed now, not in the replayed history'
                WHEN c.image_id IS NULL THEN 'listed by the replayed history, not now'
                ELSE 'differs in ' || array_to_string(ARRAY[
                    {
        ", ".join(f"CASE WHEN {differs[f]} THEN '{f}' END" for f in TRACKED_FIELDS)
    }], ', ') END
      FROM cur c
      FULL JOIN replay r ON r.region_id = c.region_id AND r.image_id = c.image_id
     WHERE c.image_id IS NULL OR r.image_id IS NULL
        OR ({" OR ".join(differs.values())})
     ORDER BY 1
    """


_CHECKS: tuple[_Check, ...] = (
    _Check(
        "system_disk",
        "listed images whose API object has a systemDisk lack the disk rows it implies",
        """
        SELECT i.region_id || '/' || i.image_id,
               format('system disk row: %s, data disk rows: %s of %s',
                      CASE WHEN sys.n > 0 THEN 'present' ELSE 'missing' END,
                      dat.n, jsonb_array_length(coalesce(i.raw -> 'dataDisks', '[]')))
          FROM inventory.images i
          CROSS JOIN LATERAL (
                SELECT count(*) AS n FROM inventory.image_disks d
                 WHERE d.region_id = i.region_id AND d.image_id = i.image_id
                   AND d.position = 0 AND d.role = 'system') sys
          CROSS JOIN LATERAL (
                SELECT count(*) AS n FROM inventory.image_disks d
                 WHERE d.region_id = i.region_id AND d.image_id = i.image_id
                   AND d.position > 0 AND d.role = 'data') dat
         WHERE i.removed_at IS NULL
           AND ((jsonb_typeof(i.raw -> 'systemDisk') = 'object' AND sys.n = 0)
             OR (jsonb_typeof(i.raw -> 'dataDisks') = 'array'
                 AND dat.n <> jsonb_array_length(i.raw -> 'dataDisks')))
         ORDER BY 1
        """,
    ),
    _Check(
        "removed_at",
        "removed_at disagrees with the image's last event",
        """
        SELECT i.region_id || '/' || i.image_id,
               format('removed_at %s, last event %s',
                      coalesce(i.removed_at::text, 'null'), coalesce(l.event_type, 'none'))
          FROM inventory.images i
          LEFT JOIN LATERAL (
                SELECT e.event_type FROM inventory.image_events e
                 WHERE e.region_id = i.region_id AND e.image_id = i.image_id
                 ORDER BY e.event_id DESC LIMIT 1) l ON true
         WHERE l.event_type IS NULL
            OR (l.event_type = 'removed') <> (i.removed_at IS NOT NULL)
         ORDER BY 1
        """,
    ),
    _Check(
        "replay",
        "the current state differs from the events replayed (images_as_of_events('infinity'))",
        _replay("images_as_of_events"),
    ),
    _Check(
        "versions",
        "the current state differs from the current versions (images_as_of('infinity'))",
        _replay("images_as_of"),
    ),
    _Check(
        "event_order",
        "an image's history is not a valid sequence of events",
        """
        WITH seq AS (
            SELECT e.region_id, e.image_id, e.event_id, e.event_type,
                   lag(e.event_type) OVER w AS previous
              FROM inventory.image_events e
            WINDOW w AS (PARTITION BY e.region_id, e.image_id ORDER BY e.event_id)
        )
        SELECT region_id || '/' || image_id,
               format('event %s %s after %s', event_id, event_type,
                      coalesce(previous, 'nothing'))
          FROM seq
         WHERE (previous IS NULL AND event_type <> 'created')
            OR (previous IS NOT NULL AND previous <> 'removed' AND event_type = 'created')
            OR (previous IS DISTINCT FROM 'removed' AND event_type = 'reappeared')
            OR (previous = 'removed' AND event_type NOT IN ('reappeared', 'created'))
         ORDER BY 1, event_id
        """,
    ),
    _Check(
        "run_liveness",
        "runs are 'running' but no live process holds their liveness lock "
        "(a crashed process; the next run marks them abandoned)",
        f"""
        SELECT 'run ' || r.run_id,
               format('started %s on %s pid %s', r.started_at, r.host, r.pid)
          FROM inventory.sync_runs r
         WHERE r.status = 'running' AND NOT {RUN_IS_LIVE}
         ORDER BY r.run_id
        """,
    ),
    _Check(
        "partition_counts",
        "events of a run's partition disagree with its sync_partitions record",
        """
        WITH ev AS (
            -- per partition identity: two accounts' partitions of one region and
            -- source are two records in one run
            SELECT sync_run_id AS run_id, region_id, image_source,
                   coalesce(account, '') AS identity,
                   count(*) FILTER (WHERE event_type = 'created') AS created,
                   count(*) FILTER (WHERE event_type = 'updated') AS updated,
                   count(*) FILTER (WHERE event_type = 'went_offline') AS went_offline,
                   count(*) FILTER (WHERE event_type = 'came_online') AS came_online,
                   count(*) FILTER (WHERE event_type = 'removed') AS removed,
                   count(*) FILTER (WHERE event_type = 'reappeared') AS reappeared
              FROM inventory.image_events
             WHERE event_type NOT IN ('access_granted', 'access_revoked')
             GROUP BY 1, 2, 3, 4
        ), rec AS (
            SELECT run_id, region_id, image_source, coalesce(account, '') AS identity,
                   created, updated, went_offline,
                   came_online, removed, reappeared
              FROM inventory.sync_partitions
             WHERE status IN ('succeeded', 'incomplete')
        )
        SELECT format('run %s %s%s/%s', coalesce(e.run_id, p.run_id),
                      nullif(coalesce(e.identity, p.identity) || ':', ':'),
                      coalesce(e.region_id, p.region_id), coalesce(e.image_source, p.image_source)),
               CASE WHEN p.run_id IS NULL THEN 'events without a succeeded/incomplete record'
                    ELSE format('recorded %s, events %s',
                                ARRAY[p.created, p.updated, p.went_offline, p.came_online,
                                      p.removed, p.reappeared],
                                ARRAY[coalesce(e.created, 0), coalesce(e.updated, 0),
                                      coalesce(e.went_offline, 0), coalesce(e.came_online, 0),
                                      coalesce(e.removed, 0), coalesce(e.reappeared, 0)])
               END
          FROM ev e
          FULL JOIN rec p USING (run_id, region_id, image_source, identity)
         WHERE p.run_id IS NULL
            OR ARRAY[p.created, p.updated, p.went_offline, p.came_online, p.removed,
                     p.reappeared]::bigint[]
               IS DISTINCT FROM
               ARRAY[coalesce(e.created, 0), coalesce(e.updated, 0),
                     coalesce(e.went_offline, 0), coalesce(e.came_online, 0),
                     coalesce(e.removed, 0), coalesce(e.reappeared, 0)]::bigint[]
         ORDER BY 1
        """,
    ),
)

CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in _CHECKS)
DATA_CHECKS: tuple[str, ...] = tuple(n for n in CHECK_NAMES if n != "run_liveness")
"""The checks about the inventory's contents: they hold even right after a crash, before
the next run has marked the crashed run abandoned."""


async def check_invariants(engine: AsyncEngine, *, only: Sequence[str] = ()) -> list[str]:
    """One line per broken invariant (empty when all hold); ``only`` limits the checks.

    Each line is ``name: description: N offender(s), e.g. key (detail); ...``.
    """
    unknown = set(only) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECK_NAMES)}")
    chosen = [check for check in _CHECKS if not only or check.name in only]
    lines: dict[str, str | None] = {}
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            for check in chosen:
                if check.name != "run_liveness":
                    lines[check.name] = await _run(conn, check)
    for check in chosen:
        if check.name == "run_liveness":
            lines[check.name] = await _run_liveness(engine, check)
    return [line for check in chosen if (line := lines[check.name])]


async def _run_liveness(engine: AsyncEngine, check: _Check) -> str | None:
    """The liveness check, outside the data checks' snapshot: ``pg_locks`` is live state,
    so against an older snapshot a run that finished meanwhile (status committed, then
    its lock released) would look crashed. Each statement here takes its snapshot after
    the previous one, and only runs offending in two of them in a row are reported:
    one statement's snapshot still predates its own read of ``pg_locks`` by a moment."""
    async with engine.connect() as conn:
        first = {key for key, _ in (await conn.execute(sa.text(check.sql))).all()}
        await conn.commit()
        if not first:
            return None
        rows = [r for r in (await conn.execute(sa.text(check.sql))).all() if r[0] in first]
    return _line(check, rows)


async def _run(conn: AsyncConnection, check: _Check) -> str | None:
    return _line(check, (await conn.execute(sa.text(check.sql))).all())


def _line(check: _Check, rows: Sequence[Any]) -> str | None:
    if not rows:
        return None
    examples = "; ".join(f"{key} ({detail})" for key, detail in rows[:EXAMPLES])
    more = f"; and {len(rows) - EXAMPLES} more" if len(rows) > EXAMPLES else ""
    noun = "offender" if len(rows) == 1 else "offenders"
    return f"{check.name}: {check.description}: {len(rows)} {noun}, e.g. {examples}{more}"
