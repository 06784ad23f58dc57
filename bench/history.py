"""A synthesised history on a synced benchmark database, and the point-in-time reads on it.

:func:`synthesise` runs ``rounds`` resyncs through the service's own merge
(:class:`service.store.apply.PartitionWriter`), without the API: for each partition
it stages two thirds of the listed images (a different two thirds each round) with a
changed description, so each round records an ``updated`` event and a new version for
each of them. After the initial sync (one ``created`` event per image) three rounds
give three events per image on average (1,000,000 images: 3,000,000 events).

:func:`measure_history` then times ``images_as_of(ts)`` as readers write it: whole,
filtered to one partition (the big one and a small one) and to one image, at the
latest moment and at a moment between the first and second round, with
``EXPLAIN (ANALYZE)``; the whole form is also read out completely (``COPY ... TO
STDOUT``, rows decoded and dropped by the client). Each query runs twice and the
faster run is reported (the first warms the cache). The big partition's form runs
:data:`FLOOR_RUNS` times, alternating with its floor: the same versions alone in a
packed table of their own, read into the same columns (what the form costs at best on
this machine); both report their median too.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.run import log
from bench.scenario import BIG_PARTITION
from service.normalize import EXTRA_COLUMNS, IMAGE_COLUMNS

TARGETS_MS = {"whole": 3000.0, "partition": 300.0, "image": 20.0}

_CHANGED = {
    "description": "coalesce(i.description, '') || ' (round ' || CAST(:round AS text) || ')'",
    "content_hash": "sha256(i.content_hash || convert_to(CAST(:round AS text), 'UTF8'))",
}
# What autovacuum does between a deployment's syncs (measure_history).
_VACUUM_VERSIONS = "VACUUM inventory.image_versions"

_STAGE = f"""
INSERT INTO stage_images ({", ".join(IMAGE_COLUMNS)}, {", ".join(EXTRA_COLUMNS)}, raw, listing)
SELECT {", ".join(_CHANGED.get(c, "i." + c) for c in IMAGE_COLUMNS)},
       {", ".join("i." + c for c in EXTRA_COLUMNS)},
       jsonb_set(i.raw, '{{desc}}',
                 to_jsonb(coalesce(i.description, '') || ' (round ' || CAST(:round AS text) || ')')),
       0
  FROM inventory.images i
 WHERE i.region_id = :region AND i.image_source = :source AND i.removed_at IS NULL
   AND abs(hashtext(i.image_id)) % 3 <> CAST(:round AS integer) % 3
"""
_STAGE_DISKS = """
INSERT INTO stage_disks
SELECT d.image_id, d.position, d.role, d.device_name, d.disk_category, d.auto_delete,
       d.cloud_disk_type, d.cloud_disk_size_gb, d.cloud_iops, d.cloud_snapshot_id,
       d.cloud_encrypted, d.local_disk_type, d.local_disk_size_gb, 0
  FROM stage_images s JOIN inventory.image_disks d
    ON d.region_id = :region AND d.image_id = s.image_id
"""


async def synthesise(
    database_url: str, rounds: int = 3, between: Callable[[], object] | None = None
) -> list[str]:
    """``rounds`` merges of two thirds of every partition, ``between()`` after each;
    returns the moment (text) after each round."""
    import sqlalchemy as sa

    from service.store.apply import PartitionWriter
    from service.store.engine import create_engine

    engine = create_engine(database_url, pool_size=1)
    moments: list[str] = []
    try:
        async with engine.connect() as conn:
            partitions = (
                await conn.execute(
                    sa.text(
                        "SELECT DISTINCT region_id, image_source FROM inventory.images ORDER BY 1, 2"
                    )
                )
            ).all()
        for round_ in range(1, rounds + 1):
            started = time.perf_counter()
            async with engine.begin() as conn:
                run_id = await conn.scalar(
                    sa.text(
                        "INSERT INTO inventory.sync_runs (started_at, finished_at, status,"
                        " trigger, host, pid) VALUES (now(), now(), 'succeeded', 'bench',"
                        " 'bench-history', pg_backend_pid()) RETURNING run_id"
                    )
                )
            updated = 0
            for region, source in partitions:
                params = {"region": region, "source": source, "round": str(round_)}
                async with engine.begin() as conn:
                    writer = PartitionWriter(conn, region=region, source=source)
                    await writer.open()
                    await conn.execute(sa.text(_STAGE), params)
                    await conn.execute(sa.text(_STAGE_DISKS), params)
                    merged = await writer.merge(run_id=run_id, remove_missing=False)
                    updated += merged.updated
            async with engine.connect() as conn:
                moments.append(str(await conn.scalar(sa.text("SELECT clock_timestamp()::text"))))
            log(
                f"  history round {round_}: {updated} updated in "
                f"{time.perf_counter() - started:.1f}s"
            )
            if between is not None:
                between()
    finally:
        await engine.dispose()
    return moments


def measure_history(conn: psycopg.Connection, database_url: str, rounds: int = 3) -> dict[str, Any]:
    """Synthesise the history, then time the point-in-time forms on it.

    Between rounds the versions are vacuumed, as autovacuum does between a deployment's
    syncs: each round closes two thirds of the current versions (a row moved out of
    ``image_versions_current``), and with nothing reclaiming them the rounds, run back
    to back, left that partition three times its live size (on a server with
    autovacuum off, as the system PostgreSQL of this machine kind is, at 1,000,000
    images: 336,310 pages for 1,000,000 rows, 113,441 after ``VACUUM FULL``)."""
    autovacuum = conn.execute("SHOW autovacuum").fetchone()
    started = time.perf_counter()
    moments = asyncio.run(
        synthesise(database_url, rounds, between=lambda: conn.execute(_VACUUM_VERSIONS))
    )
    return {
        "synthesis_seconds": time.perf_counter() - started,
        "server_autovacuum": autovacuum[0] if autovacuum else None,
        **time_reads(conn, moments),
    }


def time_reads(conn: psycopg.Connection, moments: list[str]) -> dict[str, Any]:
    """The point-in-time forms at the last of ``moments`` and at the first."""
    result: dict[str, Any] = {}
    conn.execute("VACUUM ANALYZE inventory.image_versions")
    conn.execute("VACUUM ANALYZE inventory.image_events")
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM inventory.images),"
        " (SELECT count(*) FROM inventory.image_events),"
        " (SELECT count(*) FROM inventory.image_versions)"
    ).fetchone()
    assert counts is not None
    result["images"], result["events"], result["versions"] = counts
    big_region, big_source = BIG_PARTITION.split("/")
    image = conn.execute(
        "SELECT region_id, image_id FROM inventory.images"
        " WHERE region_id = %s AND image_source = %s ORDER BY image_id LIMIT 1",
        [big_region, big_source],
    ).fetchone()
    assert image is not None
    small = ("cn-east-2", "community")
    forms = {
        "whole": ("", []),
        "partition": (" WHERE region_id = %s AND image_source = %s", [big_region, big_source]),
        "small_partition": (" WHERE region_id = %s AND image_source = %s", list(small)),
        "image": (" WHERE region_id = %s AND image_id = %s", list(image)),
    }
    result["moments"] = {"latest": moments[-1], "between_rounds_1_and_2": moments[0]}
    result["queries"] = {}
    for label, ts in result["moments"].items():
        for form, (where, args) in forms.items():
            if form == "partition":
                continue  # below, alternating with its floor
            sql = f"SELECT * FROM inventory.images_as_of(%s::timestamptz){where}"
            runs = [explain(conn, sql, [ts, *args]) for _ in range(2)]
            best = min(runs, key=lambda r: r["ms"])
            result["queries"][f"{form}@{label}"] = best
        result["queries"].update(
            _partition_and_floor(conn, label, ts, big_region, big_source, FLOOR_RUNS)
        )
        with conn.cursor() as cur:
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                rows = 0
                with cur.copy(
                    "COPY (SELECT * FROM inventory.images_as_of(%s::timestamptz)) TO STDOUT",
                    [ts],
                ) as copy:
                    for _row in copy:
                        rows += 1
                seconds.append(time.perf_counter() - t0)
            result["queries"][f"whole_read_out@{label}"] = {"ms": 1000 * min(seconds), "rows": rows}
    # The fold of the events for one image, as images_as_of was before migration 0007.
    sql = "SELECT * FROM inventory.images_as_of_events(%s::timestamptz) WHERE region_id = %s AND image_id = %s"
    result["queries"]["events_fold_image@latest"] = explain(conn, sql, [moments[-1], *image])
    return result


FLOOR_RUNS = 5
"""Runs of the big partition's form and of its floor, alternating (this VM's speed moves
by tens of percent from one minute to the next: each pair is measured side by side)."""

_FLOOR_TABLE = "public.bench_partition_floor"
PARTITION = "region_id = %s AND image_source = %s"
"""The partition form's filter (parameters: region, source)."""
PERIOD = "valid_to > %s::timestamptz AND valid_from <= %s::timestamptz"
"""images_as_of's period filter on image_versions (parameters: the moment, twice)."""


def as_of_columns(conn: psycopg.Connection) -> list[str]:
    """images_as_of's result columns, in order (its OUT arguments)."""
    row = conn.execute(
        "SELECT proargnames[2:] FROM pg_proc"
        " WHERE oid = 'inventory.images_as_of(timestamptz)'::regprocedure"
    ).fetchone()
    assert row is not None
    return list(row[0])


def copy_versions(
    conn: psycopg.Connection, table: str, columns: list[str], region: str, source: str, ts: str
) -> None:
    """``table``, new and packed: the ``columns`` (in that order) of the versions of the
    partition ``region``/``source`` that ``images_as_of(ts)`` returns."""
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(
        f"CREATE TABLE {table} AS SELECT {', '.join(columns)} FROM inventory.image_versions"
        f" WHERE {PARTITION} AND {PERIOD}",
        [region, source, ts, ts],
    )
    conn.execute(f"VACUUM ANALYZE {table}")


def stored_columns(conn: psycopg.Connection) -> list[str]:
    """image_versions' columns, in their stored order."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'inventory.image_versions'"
            "::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    ]


def _partition_and_floor(
    conn: psycopg.Connection, label: str, ts: str, region: str, source: str, runs: int
) -> dict[str, Any]:
    """The big partition's form at ``ts`` and its floor, ``runs`` times each, alternating.

    The floor is what the form can at best cost: the versions it returns, alone in a
    packed table of their own (no other moment's versions, no dead space, no second
    table to append), read with the same filters into the same columns (so PostgreSQL
    deforms and projects every row as it does for the form)."""
    columns = ", ".join(as_of_columns(conn))
    copy_versions(conn, _FLOOR_TABLE, stored_columns(conn), region, source, ts)
    forms = {
        f"partition@{label}": (
            f"SELECT * FROM inventory.images_as_of(%s::timestamptz) WHERE {PARTITION}",
            [ts, region, source],
        ),
        f"partition_floor@{label}": (
            f"SELECT {columns} FROM {_FLOOR_TABLE} WHERE {PARTITION} AND {PERIOD}",
            [region, source, ts, ts],
        ),
    }
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in forms}
    try:
        for _ in range(runs):
            for name, (sql, args) in forms.items():
                measured[name].append(explain(conn, sql, args))
    finally:
        conn.execute(f"DROP TABLE {_FLOOR_TABLE}")
    result = {}
    for name, explained in measured.items():
        result[name] = {
            **min(explained, key=lambda r: r["ms"]),
            "runs_ms": [r["ms"] for r in explained],
            "median_ms": statistics.median(r["ms"] for r in explained),
        }
    return result


_ACTUAL_ROWS = re.compile(r"actual [^)]*rows=(\d+)")


def explain(conn: psycopg.Connection, sql: str, args: list[Any]) -> dict[str, Any]:
    """``sql`` run under ``EXPLAIN (ANALYZE, BUFFERS)``: its execution time (``ms``), the
    plan, its top line and the rows that node returned."""
    rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, SUMMARY ON) {sql}", args).fetchall()
    plan = "\n".join(r[0] for r in rows)
    ms = next(
        float(line.split(":")[1].split()[0])
        for line in reversed(plan.splitlines())
        if line.strip().startswith("Execution Time")
    )
    actual = plan.splitlines()[0]
    found = _ACTUAL_ROWS.search(actual)
    return {"ms": ms, "plan": plan, "top": actual, "rows": int(found.group(1)) if found else None}


def print_history(images: int, history: dict[str, Any]) -> None:
    print(
        f"\npoint-in-time reads on {history['images']} images, {history['events']} events, "
        f"{history['versions']} versions (history synthesised in "
        f"{history.get('synthesis_seconds', 0):.0f}s)"
    )
    for name, q in history["queries"].items():
        form = name.split("@")[0]
        target = TARGETS_MS.get(form)
        # Judged by the median where there are several runs (the big partition's).
        ms = q.get("median_ms", q["ms"])
        verdict = "" if target is None else ("ok  " if ms <= target else "MISS")
        shown = f"(target {target:.0f} ms)" if target else ""
        if "runs_ms" in q:
            shown = f"median of {len(q['runs_ms'])}, best {q['ms']:.1f} ms {shown}"
        print(f"{verdict:<4} {name:<45} {ms:>10.1f} ms {shown}")
