"""Database faults in the middle of a sync: the partition rolls back whole, nothing is
lost or invented, and the next run converges to what a fault-free run records.

Scenarios (each followed by ``check_invariants`` and a comparison with a fault-free
reference run of the same catalogue and changes):

- PostgreSQL stopped (``pg_ctl stop -m immediate``) after the first page of a partition,
  and after its last page (just before the merge), then started again;
- every service backend terminated (``pg_terminate_backend``) mid-partition;
- the connection pool exhausted (a pool smaller than the partitions in flight);
- PostgreSQL's connection limit reached for the service's role;
- ``IMAGE_SYNC_STATEMENT_TIMEOUT`` expiring while another session holds a lock.

The stop/start scenarios use an embedded PostgreSQL of their own in a temporary
directory, so stopping it cannot disturb the session's database.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.errors import DatabaseError
from service.ingest import Progress
from service.jdcloud.listing import Partition
from service.normalize import ImageExtras, normalize_image
from service.simulator import running_simulator
from service.simulator.catalogue import Catalogue
from service.store import migrate
from service.store.apply import PARTITION_LOCK_SPACE, PartitionWriter
from service.store.engine import create_engine
from service.store.runs import PartitionReport
from service.sync import SyncReport, sync_once
from tests.fault_helpers import (
    KillablePostgres,
    assert_after_crash,
    assert_invariants,
    assert_same_history,
    history,
    killable_postgres,
    mutate,
    truncate,
)
from tests.local_api import local_api

pytestmark = pytest.mark.db

SEED = 21
IMAGES = 400
PAGE_SIZE = 10
TARGET = Partition("cn-east-1", "private", "default")  # mutate() changes it: a rollback is visible


@pytest.fixture(scope="module")
def killable_pg() -> Iterator[KillablePostgres]:
    with killable_postgres() as pg:
        yield pg


class At(Progress):
    """Runs ``action`` once, synchronously, when ``partition`` has fetched ``page`` pages
    of its first listing (``page=-1``: its last page, i.e. just before the merge)."""

    def __init__(self, partition: Partition, page: int, action: Callable[[], None]) -> None:
        self.partition, self.page, self.action = partition, page, action
        self.fired = False

    def pages(self, partition: Partition, listing: Any, done: int, total: int) -> None:
        if self.fired or partition != self.partition or listing.index != 0:
            return
        if done == (total if self.page == -1 else self.page):
            self.fired = True
            self.action()


@asynccontextmanager
async def scenario(make_settings: Any, url: str) -> AsyncIterator[Any]:
    """A simulator of the test catalogue, settings for it and ``url``."""
    async with running_simulator(images=IMAGES, seed=SEED) as sim:
        yield sim, make_settings(sim.url, DATABASE_URL=url)


async def run(engine: AsyncEngine, settings: Any, **kwargs: Any) -> SyncReport:
    async with open_runtime(settings) as rt:
        return await sync_once(engine, rt.client, rt.partitions(), page_size=PAGE_SIZE, **kwargs)


async def reference_history(engine: AsyncEngine, make_settings: Any, url: str) -> dict[str, Any]:
    """What the same two syncs record without any fault (the database is emptied first)."""
    await truncate(engine)
    async with scenario(make_settings, url) as (sim, settings):
        assert (await run(engine, settings)).ok
        mutate(sim.catalogue)
        assert (await run(engine, settings)).ok
    return await history(engine)


def target_report(report: SyncReport) -> PartitionReport:
    return next(p for p in report.partitions if p.partition == TARGET)


async def events_of_run(engine: AsyncEngine, run_id: int, partition: Partition) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM inventory.image_events WHERE sync_run_id = :r"
                    " AND region_id = :g AND image_source = :s"
                ),
                {"r": run_id, "g": partition.region, "s": partition.source},
            )
            or 0
        )


async def partition_rows(engine: AsyncEngine, partition: Partition) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT image_id, name, description, removed_at IS NULL AS listed"
                " FROM inventory.images WHERE region_id = :g AND image_source = :s"
            ),
            {"g": partition.region, "s": partition.source},
        )
        return {r[0]: tuple(r[1:]) for r in rows}


# --- PostgreSQL stopped / backends killed mid-partition ----------------------------------


@pytest.mark.parametrize(
    ("fault", "page"),
    [("stop", 1), ("stop", -1), ("terminate", 2)],
    ids=["stop-after-first-page", "stop-before-merge", "terminate-backends"],
)
async def test_database_lost_mid_partition(
    killable_pg: KillablePostgres, make_settings: Any, fault: str, page: int
) -> None:
    url = killable_pg.create_database()
    engine = create_engine(url)
    await migrate.upgrade(engine)
    try:
        reference = await reference_history(engine, make_settings, url)
        await truncate(engine)
        async with scenario(make_settings, url) as (sim, settings):
            assert (await run(engine, settings)).ok
            before = await partition_rows(engine, TARGET)
            mutate(sim.catalogue)

            def terminate() -> None:
                with psycopg.connect(killable_pg.server_url, autocommit=True) as admin:
                    killed = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE application_name = 'image-sync'"
                    ).fetchone()
                    assert killed and killed[0] >= 2  # the run's lock and the partition

            action = killable_pg.stop_immediate if fault == "stop" else terminate
            at = At(TARGET, page, action)
            outcome: SyncReport | BaseException
            try:
                outcome = await run(engine, settings, progress=at, partition_concurrency=1)
            except Exception as exc:  # the run cannot even be recorded as finished
                outcome = exc
            assert at.fired
            if fault == "stop":
                killable_pg.start()
            # The run failed cleanly: a one-line DatabaseError, or a report of failures.
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, DatabaseError), repr(outcome)
                assert "\n" not in str(outcome)
            else:
                assert not outcome.ok
                assert target_report(outcome).status == "failed"
                assert target_report(outcome).error_status == "DATABASE"
            # The partition rolled back whole: its rows are as before, no event of that run.
            assert await partition_rows(engine, TARGET) == before
            async with engine.connect() as conn:
                last_run = await conn.scalar(sa.text("SELECT max(run_id) FROM inventory.sync_runs"))
            assert await events_of_run(engine, last_run, TARGET) == 0
            # Data invariants hold; the dead run is still 'running' without its lock, and
            # the checker says so, until the next run marks it abandoned.
            await assert_after_crash(
                engine, crashed_runs=0 if isinstance(outcome, SyncReport) else 1
            )
            # The next run succeeds, and the result equals a fault-free history.
            report = await run(engine, settings)
            assert report.ok, [p for p in report.partitions if p.status != "succeeded"]
        await assert_invariants(engine)
        assert_same_history(await history(engine), reference)
        async with engine.connect() as conn:
            statuses = dict(
                (
                    await conn.execute(sa.text("SELECT run_id, status FROM inventory.sync_runs"))
                ).all()
            )
        assert "running" not in statuses.values()
    finally:
        await engine.dispose()


# --- pool exhaustion, connection limit, statement timeout ----------------------------------


async def _fault_then_recover(
    engine: AsyncEngine,
    faulty_engine: AsyncEngine,
    make_settings: Any,
    url: str,
    *,
    faulty_settings: dict[str, str] | None = None,
    during: Any = None,
    sim_faults: dict[str, Any] | None = None,
) -> SyncReport:
    """Sync, change the catalogue, sync with ``faulty_engine`` (expecting failures), then
    sync normally; return the faulty run's report after checking convergence."""
    reference = await reference_history(engine, make_settings, url)
    await truncate(engine)
    async with scenario(make_settings, url) as (sim, settings):
        assert (await run(engine, settings)).ok
        mutate(sim.catalogue)
        if sim_faults:
            sim.faults.update(sim_faults)
        faulty = make_settings(sim.url, DATABASE_URL=url, **(faulty_settings or {}))
        async with during() if during else _nothing():
            report = await run(faulty_engine, faulty)
        sim.faults.update({"reset": True})
        assert not report.ok
        bad = [p for p in report.partitions if p.status == "failed"]
        assert bad and all(p.error_status == "DATABASE" for p in bad), report
        await assert_invariants(engine)
        for p in bad:  # a failed partition wrote no event in that run
            assert await events_of_run(engine, report.run_id, p.partition) == 0
        recovered = await run(engine, settings)
        assert recovered.ok
    await assert_invariants(engine)
    assert_same_history(await history(engine), reference)
    return report


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


async def test_pool_exhaustion(engine: AsyncEngine, make_settings: Any, database_url: str) -> None:
    """A pool of 2 (one taken by the run's liveness lock) for 8 partitions in flight,
    with a short checkout timeout and slow API pages: partitions time out waiting."""
    small = create_engine(database_url, pool_size=2, max_overflow=0, pool_timeout=0.3)
    try:
        report = await _fault_then_recover(
            engine, small, make_settings, database_url, sim_faults={"latency_ms": 150}
        )
    finally:
        await small.dispose()
    assert any("QueuePool limit" in (p.error_message or "") for p in report.partitions)


async def test_connection_limit_reached(
    engine: AsyncEngine, make_settings: Any, database_url: str
) -> None:
    """The server refuses connections beyond the role's limit ("too many connections")."""
    role = f"limited_{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' CONNECTION LIMIT 2")
        conn.execute(f"GRANT ALL ON SCHEMA inventory TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA inventory TO {role}")
    limited_url = (
        make_url(database_url).set(username=role, password=password).render_as_string(False)
    )
    limited = create_engine(limited_url)
    try:
        await _fault_then_recover(
            engine, limited, make_settings, database_url, sim_faults={"latency_ms": 50}
        )
    finally:
        await limited.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_statement_timeout(
    engine: AsyncEngine, make_settings: Any, database_url: str
) -> None:
    """IMAGE_SYNC_STATEMENT_TIMEOUT=1 while another session locks image_events: every
    merge's event insert waits, times out, and its partition rolls back."""
    timed = make_settings("http://127.0.0.1:9", IMAGE_SYNC_STATEMENT_TIMEOUT="1")
    timed_engine = create_engine(database_url, statement_timeout=timed.statement_timeout)

    @asynccontextmanager
    async def lock_events() -> AsyncIterator[None]:
        async with engine.connect() as conn, conn.begin():
            await conn.execute(sa.text("LOCK TABLE inventory.image_events IN EXCLUSIVE MODE"))
            yield

    try:
        report = await _fault_then_recover(
            engine, timed_engine, make_settings, database_url, during=lock_events
        )
    finally:
        await timed_engine.dispose()
    assert all(p.status == "failed" for p in report.partitions)
    assert all("statement timeout" in (p.error_message or "") for p in report.partitions)


async def test_database_down_when_a_run_starts(
    killable_pg: KillablePostgres, make_settings: Any
) -> None:
    """A database that is down when a run starts: one clear DatabaseError, no run row."""

    url = killable_pg.create_database()
    engine = create_engine(url)
    await migrate.upgrade(engine)
    try:
        killable_pg.stop_immediate()
        try:
            async with scenario(make_settings, url) as (_sim, settings):
                with pytest.raises(DatabaseError) as caught:
                    await run(engine, settings)
            assert "\n" not in str(caught.value)
        finally:
            killable_pg.start()
        await assert_invariants(engine)
    finally:
        await engine.dispose()


async def test_database_lost_mid_sync_leaves_no_unretrieved_task_exception(
    killable_pg: KillablePostgres, make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Pages in flight when the database goes: each task's error is collected, none is
    left for asyncio's "Task exception was never retrieved" (six of them, before)."""
    import gc

    url = killable_pg.create_database()
    engine = create_engine(url)
    await migrate.upgrade(engine)
    try:
        # One region, many pages per listing: several pages are in flight at the stop.
        async with running_simulator(images=1500, seed=SEED, regions=["cn-north-1"]) as sim:
            settings = make_settings(sim.url, DATABASE_URL=url, IMAGE_SYNC_REGIONS="cn-north-1")
            at = At(Partition("cn-north-1", "private", "default"), 5, killable_pg.stop_immediate)
            try:
                await run(engine, settings, progress=at, partition_concurrency=5)
            except Exception as exc:  # the run cannot even be recorded as finished
                assert "\n" not in str(exc)
            finally:
                killable_pg.start()
            assert at.fired
        await engine.dispose()
        gc.collect()  # an unretrieved task exception is reported when its task is freed
        await asyncio.sleep(0)
    finally:
        await engine.dispose()
    unretrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unretrieved, unretrieved[0].getMessage()


async def test_a_staging_copy_cut_by_the_database_fails_its_partition(
    engine: AsyncEngine, make_settings: Any, database_url: str
) -> None:
    """The partition's backend is terminated while its pages are read, so the first
    statement to meet the dead connection is a page's binary COPY into staging, which
    goes through the driver directly: its asyncpg error must become the partition's
    DATABASE failure, not escape the run (found by the soak's PostgreSQL restart: the
    scheduled tick raised ``asyncpg.exceptions._base.InterfaceError``)."""

    images = Catalogue(seed=4, images=40, regions=("cn-north-1",), sources=("private",)).images(
        "cn-north-1", "private"
    )[:20]
    killed: list[int] = []

    async def listing(request: web.Request) -> web.Response:
        number = int(request.query.get("pageNumber", "1"))
        if number == 2 and not killed:
            async with engine.connect() as conn:
                killed.extend(
                    (
                        await conn.execute(
                            sa.text(
                                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                                " WHERE locktype = 'advisory' AND classid = :space"
                                # this test's database only: the server is shared
                                " AND database = (SELECT oid FROM pg_database"
                                "                  WHERE datname = current_database())"
                            ),
                            {"space": PARTITION_LOCK_SPACE},
                        )
                    ).scalars()
                )
            await asyncio.sleep(0.1)  # the backend is gone before the page is staged
        page = images[(number - 1) * 10 : number * 10]
        return web.json_response(
            {"requestId": "r", "result": {"images": page, "totalCount": len(images)}}
        )

    async with local_api(listing) as url:
        settings = make_settings(url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="private")
        async with open_runtime(settings) as rt:
            report = await sync_once(engine, rt.client, rt.partitions(), page_size=10)
            assert killed == [True]
            (failed,) = report.partitions
            assert (failed.status, failed.error_status) == ("failed", "DATABASE"), failed
            assert failed.error_message and "\n" not in failed.error_message
            assert (await sync_once(engine, rt.client, rt.partitions(), page_size=10)).ok
    async with engine.connect() as conn:
        statuses = (await conn.execute(sa.text("SELECT status FROM inventory.sync_runs"))).all()
        assert [s for (s,) in statuses] == ["failed", "succeeded"]
        assert await conn.scalar(sa.text("SELECT count(*) FROM inventory.images")) == 20


async def test_staging_copies_raise_the_projects_database_error(engine: AsyncEngine) -> None:
    """The staging COPYs use the driver connection directly; a connection lost under them
    raises :class:`DatabaseError` (one line, its cause kept), not asyncpg's InterfaceError,
    which no handler of a partition expects."""

    item = Catalogue(seed=5, images=40, regions=("cn-north-1",), sources=("public",)).images(
        "cn-north-1", "public"
    )[0]
    row = normalize_image(item, region_id="cn-north-1", image_source="public")
    calls = {
        "stage": lambda w: w.stage([row], 0),
        "stage_unchanged": lambda w: w.stage_unchanged([row.image_id], 0),
        "stage_extras": lambda w: w.stage_extras([ImageExtras(row.image_id, ("jd_a",))]),
    }
    for name, call in calls.items():
        async with engine.connect() as conn:
            writer = PartitionWriter(conn, region="cn-north-1", source="public")
            await writer.open()
            pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
            async with engine.connect() as admin:
                await admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            await asyncio.sleep(0.1)
            with pytest.raises(DatabaseError) as raised:
                await call(writer)
            assert raised.value.__cause__ is not None, name
            assert "\n" not in str(raised.value), name
            await conn.invalidate()
