"""The change feed's cursor: every event exactly once, in commit order, however the
partitions' transactions interleave (real PostgreSQL, several connections).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.normalize import normalize_image
from service.store.apply import PartitionWriter
from service.store.feed import CHANNEL, event_id_floor, read_changes, record_batch
from service.store.runs import release_run, start_run
from tests.fault_helpers import wait_until_blocked

SOURCE = "private"


def _items(region: str, names: list[str], version: int = 0) -> list[Any]:
    return [
        normalize_image(
            {"imageId": f"img-{name}", "name": f"{name} v{version}", "status": "ready"},
            region_id=region,
            image_source=SOURCE,
        )
        for name in names
    ]


async def _run(engine: AsyncEngine) -> tuple[AsyncConnection, int]:
    lock_conn = await engine.connect()
    await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
    return lock_conn, await start_run(lock_conn, trigger="cli")


async def _merge(engine: AsyncEngine, run_id: int, region: str, rows: list[Any]) -> None:
    async with engine.connect() as conn:
        await _merge_on(conn, run_id, region, rows)


async def _drain(conn: AsyncConnection, cursor: int, max_rows: int = 1000) -> tuple[list[int], int]:
    """Every event after ``cursor`` now, by repeated calls; (event ids, last cursor)."""
    seen: list[int] = []
    while page := await read_changes(conn, cursor, max_rows):
        seen += [c.event_id for c in page]
        cursor = page[-1].cursor
    return seen, cursor


async def test_out_of_order_commits_miss_naive_reader_not_the_feed(engine: AsyncEngine) -> None:
    """Partition A records its event (low event_id) and is held open by a row lock while
    partition B records and commits (higher ids): a reader polling ``event_id > last``
    passes A's event for ever; ``changes_since`` delivers each event exactly once."""
    lock_conn, run_id = await _run(engine)
    try:
        await _merge(engine, run_id, "cn-north-1", _items("cn-north-1", ["a1", "a2"]))
        await _merge(engine, run_id, "cn-east-1", _items("cn-east-1", ["b0"]))
        async with engine.connect() as reader, engine.connect() as blocker:
            await reader.execution_options(isolation_level="AUTOCOMMIT")
            start, cursor = await _drain(reader, 0)
            assert len(start) == 3
            naive_last = max(start)
            await blocker.begin()
            # A's merge writes its updated events, then waits for this lock to upsert.
            await blocker.execute(
                sa.text("SELECT 1 FROM inventory.images WHERE image_id = 'img-a1' FOR UPDATE")
            )
            async with engine.connect() as held:
                pid = await held.scalar(sa.text("SELECT pg_backend_pid()"))
                await held.rollback()
                task_a = asyncio.ensure_future(
                    _merge_on(held, run_id, "cn-north-1", _items("cn-north-1", ["a1", "a2"], 1))
                )
                await wait_until_blocked(reader, pid, "the held partition")
                await _merge(engine, run_id, "cn-east-1", _items("cn-east-1", ["b0", "b1"], 1))
                # The naive reader polls now: B's events are there, A's are not yet.
                naive = await _naive(reader, naive_last)
                naive_last = max(naive)
                fed, cursor = await _drain(reader, cursor)
                await blocker.rollback()
                await task_a
            naive += await _naive(reader, naive_last)
            more, cursor = await _drain(reader, cursor)
            fed += more
            all_new = await _naive(reader, max(start))
    finally:
        await release_run(lock_conn, run_id)
        await lock_conn.close()
    a_events = [e for e in all_new if e not in naive]
    assert len(all_new) == 4 and len(a_events) == 2, (all_new, naive)
    assert sorted(fed) == sorted(all_new) and len(set(fed)) == len(fed)
    # Commit order: B's batch (higher ids) before A's.
    assert fed[-2:] == a_events


async def _merge_on(conn: AsyncConnection, run_id: int, region: str, rows: list[Any]) -> None:
    async with conn.begin():
        writer = PartitionWriter(conn, region=region, source=SOURCE)
        await writer.open()
        await writer.stage(rows, 0)
        await writer.merge(run_id=run_id, remove_missing=True)


async def _naive(conn: AsyncConnection, last: int) -> list[int]:
    result = await conn.execute(
        sa.text(
            "SELECT event_id FROM inventory.image_events WHERE event_id > :last ORDER BY event_id"
        ),
        {"last": last},
    )
    return list(result.scalars())


async def test_no_change_writes_no_batch_and_notifies_per_commit(
    engine: AsyncEngine, database_url: str
) -> None:
    """A merge with events sends one NOTIFY on commit (payload of DESIGN.md), none before
    and none on rollback; a no-change merge files no batch and sends nothing."""
    import asyncpg

    listener = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    payloads: list[dict[str, Any]] = []
    await listener.add_listener(CHANNEL, lambda *args: payloads.append(json.loads(args[3])))
    lock_conn, run_id = await _run(engine)
    try:
        rows = _items("cn-north-1", ["n1", "n2", "n3"])
        async with engine.connect() as conn, conn.begin() as tx:
            writer = PartitionWriter(conn, region="cn-north-1", source=SOURCE)
            await writer.open()
            await writer.stage(rows, 0)
            await writer.merge(run_id=run_id, remove_missing=True)
            await asyncio.sleep(0.2)
            assert payloads == []
            await tx.rollback()
        await _merge(engine, run_id, "cn-north-1", rows)
        for _ in range(100):
            if payloads:
                break
            await asyncio.sleep(0.02)
        await _merge(engine, run_id, "cn-north-1", rows)  # nothing changed
        await asyncio.sleep(0.2)
        async with engine.connect() as conn:
            batches = (
                await conn.execute(
                    sa.text("SELECT batch, event_count FROM inventory.change_batches")
                )
            ).all()
            page = await read_changes(conn, 0)
    finally:
        await release_run(lock_conn, run_id)
        await lock_conn.close()
        await listener.close()
    assert [tuple(b) for b in batches] == [(1, 3)]
    assert payloads == [
        {
            "run_id": run_id,
            "account": None,
            "region_id": "cn-north-1",
            "image_source": SOURCE,
            "counts": {"created": 3},
            "cursor": page[-1].cursor,
        }
    ]
    assert [c.document["image_id"] for c in page] == ["img-n1", "img-n2", "img-n3"]
    assert page[0].payload()["cursor"] == page[0].cursor


# -- property: random interleavings ----------------------------------------------------

PARTITIONS = ("cn-north-1", "cn-east-1", "cn-east-2")

_INSERT = """
INSERT INTO inventory.image_events (occurred_at, sync_run_id, region_id, image_id,
                                    image_source, event_type)
SELECT now(), :run_id, :region, 'img-' || g, :source, 'created' FROM generate_series(1, :n) g
"""


@st.composite
def schedules(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Actions (kind, partition transaction, n): each transaction inserts events in one
    or more steps, takes its batch number ("clock"), then commits or rolls back; reader
    polls ("poll", max_rows) fall anywhere."""
    txs = draw(st.integers(min_value=2, max_value=5))
    queues = []
    for tx in range(txs):
        steps = [("insert", tx, draw(st.integers(1, 4))) for _ in range(draw(st.integers(1, 3)))]
        end = "commit" if draw(st.integers(0, 5)) else "rollback"
        queues.append([*steps, ("clock", tx, 0), (end, tx, 0)])
    out: list[tuple[str, int, int]] = []
    while any(queues):
        if draw(st.booleans()):
            out.append(("poll", -1, draw(st.integers(1, 5))))
        live = [q for q in queues if q]
        out.append(draw(st.sampled_from(live)).pop(0))
    return out


class _Interleaving:
    def __init__(self, engine: AsyncEngine, run_id: int) -> None:
        self.engine = engine
        self.run_id = run_id
        self.conns: dict[int, AsyncConnection] = {}
        self.clock: dict[int, asyncio.Task[int | None]] = {}
        self.inserted: dict[int, int] = {}
        self.floor: dict[int, int] = {}
        self.committed: list[list[int]] = []  # event ids per commit, in commit order

    async def open(self, tx: int) -> AsyncConnection:
        if tx not in self.conns:
            self.conns[tx] = await self.engine.connect()
            await self.conns[tx].begin()
            self.floor[tx] = await event_id_floor(self.conns[tx])
        return self.conns[tx]

    async def step(self, kind: str, tx: int, n: int) -> bool:
        """Run one action; False when it must wait (its clock is held by another)."""
        region = PARTITIONS[tx % len(PARTITIONS)] + f"-{tx}"
        if kind == "insert":
            conn = await self.open(tx)
            params = {"run_id": self.run_id, "region": region, "source": SOURCE, "n": n}
            await conn.execute(sa.text(_INSERT), params)
            self.inserted[tx] = self.inserted.get(tx, 0) + n
        elif kind == "clock":
            conn = self.conns[tx]
            counts = {"created": self.inserted[tx]}
            self.clock[tx] = asyncio.ensure_future(
                record_batch(
                    conn,
                    run_id=self.run_id,
                    region=region,
                    source=SOURCE,
                    counts=counts,
                    floor=self.floor[tx],
                )
            )
            await asyncio.sleep(0.01)
        else:
            task = self.clock[tx]
            await asyncio.wait({task}, timeout=0.05)
            if not task.done():
                return False
            task.result()
            conn = self.conns.pop(tx)
            ids = list(
                (
                    await conn.execute(
                        sa.text(
                            "SELECT event_id FROM inventory.image_events WHERE region_id = :r"
                            " ORDER BY event_id"
                        ),
                        {"r": region},
                    )
                ).scalars()
            )
            if kind == "commit":
                await conn.commit()
                self.committed.append(ids)
            else:
                await conn.rollback()
            await conn.close()
        return True

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()


@pytest.fixture
async def feed_run(engine: AsyncEngine) -> AsyncIterator[tuple[AsyncEngine, int]]:
    lock_conn, run_id = await _run(engine)
    yield engine, run_id
    await release_run(lock_conn, run_id)
    await lock_conn.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=schedules())
async def test_any_interleaving_delivers_each_event_once_in_commit_order(
    feed_run: tuple[AsyncEngine, int], schedule: list[tuple[str, int, int]]
) -> None:
    engine, run_id = feed_run
    await truncate_events(engine)
    run = _Interleaving(engine, run_id)
    seen: list[int] = []
    cursor = 0
    pending = list(schedule)
    try:
        async with engine.connect() as reader:
            await reader.execution_options(isolation_level="AUTOCOMMIT")
            while pending:
                kind, tx, n = pending.pop(0)
                if kind == "poll":
                    page = await read_changes(reader, cursor, n)
                    seen += [c.event_id for c in page]
                    cursor = page[-1].cursor if page else cursor
                elif not await run.step(kind, tx, n):
                    pending.append((kind, tx, n))  # after the holder's commit
            rest, _ = await _drain(reader, cursor, 3)
            seen += rest
    finally:
        await run.close()
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert seen == [event_id for ids in run.committed for event_id in ids]


async def truncate_events(engine: AsyncEngine) -> None:
    """Empty the events and batches between examples (the run row stays)."""
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE inventory.image_events, inventory.change_batches"))
        await conn.execute(sa.text("UPDATE inventory.feed_clock SET batch = 0"))


async def test_changes_follow_prints_a_commit_made_after_it_started(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    """``image-sync changes --follow`` (a subprocess) LISTENs, prints the event of a
    commit made after it started as a JSON line, and exits 0 on Ctrl-C."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "changes", "--follow", "--type", "created",
        env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lock_conn, run_id = await _run(engine)
    try:

        async def listening() -> bool:
            async with engine.connect() as conn:
                return bool(
                    await conn.scalar(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE query LIKE 'LISTEN%inventory_changes%'"
                            " AND datname = current_database()"
                        )
                    )
                )

        for _ in range(150):
            if await listening():
                break
            assert proc.returncode is None, await proc.communicate()
            await asyncio.sleep(0.1)
        await _merge(engine, run_id, "cn-north-1", _items("cn-north-1", ["f1"]))
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await release_run(lock_conn, run_id)
        await lock_conn.close()
    event = json.loads(line)
    assert (event["image_id"], event["event_type"], event["region_id"]) == (
        "img-f1",
        "created",
        "cn-north-1",
    )
    assert event["cursor"] > 0
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


async def test_changes_since_and_filters_and_usage(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    """--cursor 0 prints every event; --since bounds by commit time; filters; a bad
    --since is a usage error (exit 2, one line, no traceback)."""
    lock_conn, run_id = await _run(engine)
    try:
        await _merge(engine, run_id, "cn-north-1", _items("cn-north-1", ["s1", "s2"]))
        await _merge(engine, run_id, "cn-east-1", _items("cn-east-1", ["s3"]))
    finally:
        await release_run(lock_conn, run_id)
        await lock_conn.close()

    async def changes(*args: str) -> tuple[int, list[dict[str, Any]], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "changes", *args, env=cli_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, [json.loads(x) for x in out.splitlines()], err.decode()

    (
        (code, every, _),
        (code2, recent, _),
        (_, after, _),
        (code4, none, _),
        (code5, _, err),
    ) = await asyncio.gather(
        changes("--cursor", "0"),
        changes("--since", "1h", "--region", "cn-east-1"),
        changes("--cursor", "16777217", "--type", "created"),  # after batch 1's first
        changes("--type", "removed"),
        changes("--since", "yesterday"),
    )
    assert code == 0 and [e["image_id"] for e in every] == ["img-s1", "img-s2", "img-s3"]
    assert every[0]["cursor"] == 16777217
    assert code2 == 0 and [e["image_id"] for e in recent] == ["img-s3"]
    assert [e["image_id"] for e in after] == ["img-s2", "img-s3"]
    assert code4 == 0 and none == []
    assert code5 == 2 and "--since" in err and "Traceback" not in err
