"""The daemon as operators run it: real ``image-sync run`` processes, a real PostgreSQL,
the project's simulator. Nothing is mocked; time is the only thing we wait on."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.listing import Partition
from service.simulator.server import Simulator, running_simulator
from service.store.runs import mark_abandoned

IMAGE_SYNC = str(Path(sys.executable).with_name("image-sync"))
# `image-sync` itself, with the shortest accepted interval lowered from 10 s so that a test
# sees several ticks in seconds (service.config.MIN_INTERVAL is read at validation).
IMAGE_SYNC_FAST = [
    sys.executable,
    "-c",
    "import sys, service.config as c; c.MIN_INTERVAL = 1.0; "
    "from service.cli import main; sys.exit(main(sys.argv[1:]))",
]
PARTITIONS = 20  # the simulator's and the service's defaults: 4 regions x 5 sources


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def replicas(
    count: int, env: dict[str, str], tmp_path: Path, *args: str
) -> AsyncIterator[list[Replica]]:
    """``count`` ``image-sync run`` processes; whatever is still running at the end is killed."""
    started: list[Replica] = []
    try:
        for i in range(count):
            log = tmp_path / f"replica-{i}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    *IMAGE_SYNC_FAST, "run", *args, env=env, stdout=out, stderr=out
                )
            started.append(Replica(process, log))
        yield started
    finally:
        for replica in started:
            if replica.process.returncode is None:
                replica.process.kill()
            await replica.process.wait()


def tcp_sockets_of(pid: int) -> set[str]:
    """``host:port`` of the local end of each IPv4 TCP socket process ``pid`` holds (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    local = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            address, port = fields[1].split(":")
            local.add(f"{socket.inet_ntoa(bytes.fromhex(address)[::-1])}:{int(port, 16)}")
    return local


async def replica_held_in_a_listing(
    engine: AsyncEngine, simulator: Simulator, daemons: list[Replica], since: float
) -> tuple[Replica, int] | None:
    """A replica with a describeImages call the simulator has held for under a second, made
    after ``since``, and its running run's id; None while there is none."""
    now = time.time()
    held = {
        entry["peer"]
        for entry in list(simulator.state.requests)
        if entry["status"] is None
        and entry["path"].endswith("/images")
        and entry["time"] >= max(since, now - 1.0)
    }
    for replica in daemons:
        if held & tcp_sockets_of(replica.pid):
            run = await rows(
                engine,
                "SELECT run_id FROM inventory.sync_runs WHERE pid = :pid AND status = 'running'",
                pid=replica.pid,
            )
            if run:
                return replica, run[0].run_id
    return None


async def wait_for(
    condition: Callable[[], Awaitable[Any]], within: float, what: str, step: float = 0.05
) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(step)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[sa.Row[Any]]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text(sql), params)).all())


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(sa.text(sql), params)


def daemon_env(cli_env: dict[str, str], simulator: Simulator, **extra: str) -> dict[str, str]:
    return {**cli_env, "JDCLOUD_ENDPOINT": simulator.url, **extra}


async def assert_inventory_matches(engine: AsyncEngine, simulator: Simulator) -> None:
    """The database lists exactly the simulator's images, and no event is doubled."""
    expected = {
        (region, image["imageId"], image.get("offline"))
        for (region, _source), images in simulator.catalogue.snapshot().items()
        for image in images.values()
    }
    listed = {
        (r.region_id, r.image_id, r.offline)
        for r in await rows(
            engine, "SELECT region_id, image_id, offline FROM inventory.current_images"
        )
    }
    assert listed == expected
    doubled = await rows(
        engine,
        """SELECT region_id, image_id, count(*) FROM inventory.image_events
            WHERE event_type = 'created' GROUP BY 1, 2 HAVING count(*) > 1""",
    )
    assert doubled == []
    without_created = await scalar(
        engine,
        """SELECT count(*) FROM inventory.images i WHERE NOT EXISTS (
               SELECT 1 FROM inventory.image_events e WHERE e.event_type = 'created'
                  AND (e.region_id, e.image_id) = (i.region_id, i.image_id))""",
    )
    assert without_created == 0


async def test_three_replicas_sync_each_partition_once_per_tick_and_survive_a_kill(
    engine: AsyncEngine, cli_env: dict[str, str], tmp_path: Path
) -> None:
    interval = 2.5
    regions = ["cn-north-1", "cn-east-1"]  # 10 partitions: a tick's work stays well under a tick
    count = len(regions) * 5
    began = time.monotonic()
    async with (
        running_simulator(seed=5, images=150, regions=regions) as simulator,
        replicas(
            3,
            daemon_env(
                cli_env,
                simulator,
                IMAGE_SYNC_INTERVAL=str(interval),
                IMAGE_SYNC_REGIONS=",".join(regions),
            ),
            tmp_path,
        ) as daemons,
    ):
        # Every replica has had its start-up tick, and no start-up run is still going.
        await wait_for(
            lambda: asyncio.sleep(0, all("tick: " in d.output() for d in daemons)),
            60,  # three interpreters importing the service: slow on a loaded 2-core machine
            "three daemons to start",
        )
        await wait_for(
            lambda: scalar(
                engine, "SELECT count(*) = 0 FROM inventory.sync_runs WHERE status = 'running'"
            ),
            15,
            "the start-up runs to finish",
        )
        print(f"\nthree daemons up in {time.monotonic() - began:.1f}s")
        # Ticks are aligned on multiples of the interval; count from the next boundary.
        first = math.floor(time.time() / interval) + 1
        windows = range(first, first + 3)
        await asyncio.sleep(windows.stop * interval + 0.5 - time.time())  # all recorded by then
        counts = await rows(
            engine,
            """SELECT region_id, image_source,
                      floor(extract(epoch FROM started_at) / :interval)::bigint AS window,
                      count(*) AS n
                 FROM inventory.sync_partitions WHERE status = 'succeeded'
                GROUP BY 1, 2, 3""",
            interval=interval,
        )
        per_window = {(r.region_id, r.image_source, r.window): r.n for r in counts}
        partitions = {(r.region_id, r.image_source) for r in counts}
        assert len(partitions) == count
        for window in windows:
            synced = [per_window.get((*p, window), 0) for p in sorted(partitions)]
            if synced != [1] * count:
                detail = await rows(
                    engine,
                    """SELECT p.region_id, p.image_source, r.pid, p.status,
                              round(extract(epoch FROM p.started_at) % 100, 2) AS s,
                              round(extract(epoch FROM p.finished_at) % 100, 2) AS f
                         FROM inventory.sync_partitions p JOIN inventory.sync_runs r USING (run_id)
                        ORDER BY p.started_at""",
                )
                print("\n".join(map(str, detail)))
            assert synced == [1] * count, f"window {window}: {synced}"
        workers = await scalar(
            engine,
            """SELECT count(DISTINCT r.pid) FROM inventory.sync_runs r
                 JOIN inventory.sync_partitions p USING (run_id) WHERE p.status = 'succeeded'""",
        )
        print(
            f"3 replicas: 1 sync per partition per tick over {len(windows)} ticks; "
            f"{workers} replicas did work"
        )

        # Change the catalogue, slow the API down, and kill a replica in the middle of a run.
        catalogue, rng = simulator.catalogue, random.Random(5)
        offline = [catalogue.random_image_id("cn-north-1", "public", rng, offline=False)]
        for image_id in offline:
            catalogue.take_offline("cn-north-1", image_id)
        added = catalogue.add("cn-east-1", "private")["imageId"]
        deleted = catalogue.random_image_id("cn-east-1", "community", rng)
        catalogue.delete("cn-east-1", deleted)
        # Each API call now takes 3 s. A replica whose describeImages call arrived less than
        # a second ago is inside a partition: its run cannot end before that answer comes.
        simulator.faults.update({"latency_ms": 3000})
        held_from = time.time()
        victim, victim_run_id = await wait_for(
            lambda: replica_held_in_a_listing(engine, simulator, daemons, since=held_from),
            3 * interval + 3,
            "a replica inside a partition",
            step=0.02,
        )
        victim_pid = victim.pid
        victim.process.kill()
        killed_at = time.time()
        print(f"killed a replica mid-run at {time.monotonic() - began:.1f}s")
        await victim.process.wait()
        survivors = [d for d in daemons if d is not victim]
        simulator.faults.update({"latency_ms": 0})

        # The survivors sync every partition again, what the victim held included.
        await wait_for(
            lambda: scalar(
                engine,
                """SELECT count(DISTINCT (region_id, image_source)) = :n
                     FROM inventory.sync_partitions
                    WHERE status = 'succeeded' AND started_at > to_timestamp(:t)""",
                n=count,
                t=killed_at,
            ),
            4 * interval + 3,  # the survivors' calls held at 3 s included
            "every partition synced after the kill",
        )
        print(f"every partition synced again {time.time() - killed_at:.1f}s after the kill")
        # A run is marked abandoned when a run starts after it died (sync_once), and the
        # survivors' runs that synced its partitions again may have started before the
        # kill: the next tick's run marks it.
        await wait_for(
            lambda: scalar(
                engine,
                "SELECT status = 'abandoned' FROM inventory.sync_runs WHERE run_id = :r",
                r=victim_run_id,
            ),
            interval + 3,
            "the killed replica's run marked abandoned",
        )
        dead_runs = await rows(
            engine,
            "SELECT run_id, status FROM inventory.sync_runs WHERE pid = :pid ORDER BY run_id",
            pid=victim_pid,
        )
        assert dead_runs[-1] == (victim_run_id, "abandoned")
        assert all(r.status != "running" for r in dead_runs)

        for replica in survivors:
            replica.process.send_signal(signal.SIGTERM)
        codes = await asyncio.wait_for(asyncio.gather(*(r.process.wait() for r in survivors)), 10)
        assert codes == [0, 0], [r.output()[-2000:] for r in survivors]
        print(f"survivors stopped at {time.monotonic() - began:.1f}s")

    await assert_inventory_matches(engine, simulator)
    events = {
        (r.event_type, r.image_id): r.n
        for r in await rows(
            engine,
            """SELECT event_type, image_id, count(*) AS n FROM inventory.image_events
                WHERE event_type <> 'created' GROUP BY 1, 2""",
        )
    }
    assert events == {
        **{("went_offline", image_id): 1 for image_id in offline},
        ("removed", deleted): 1,
    }
    assert (
        await scalar(
            engine,
            "SELECT count(*) FROM inventory.image_events WHERE event_type = 'created' AND image_id = :i",
            i=added,
        )
        == 1
    )
    assert (
        await scalar(engine, "SELECT count(*) FROM inventory.sync_runs WHERE status = 'running'")
        == 0
    )


async def test_a_second_signal_exits_at_once(
    engine: AsyncEngine, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with (
        running_simulator(seed=9, images=200, faults={"latency_ms": 5000}) as simulator,
        replicas(1, daemon_env(cli_env, simulator, IMAGE_SYNC_INTERVAL="600"), tmp_path) as (
            daemon,
        ),
    ):
        await wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM inventory.sync_runs"),
            15,
            "the first run to start",
        )
        # A partition is in hand only once its first (5 s) API call is in flight;
        # before that a stopping daemon has nothing to drain and is gone at once.
        await wait_for(
            lambda: asyncio.sleep(0, simulator.state.counters["requests"] > 0), 15, "an API call"
        )
        daemon.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: asyncio.sleep(0, "waiting up to" in daemon.output()), 5, "the drain")
        daemon.process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(daemon.process.wait(), 2)
    assert code == 128 + signal.SIGINT
    assert "second SIGINT: exiting at once" in daemon.output()
    # Its run stays 'running' until the next process sees its liveness lock gone.
    assert await mark_abandoned(engine) == 1


async def test_a_scheduled_run_cancelled_at_the_grace_is_no_error(
    engine: AsyncEngine, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM while a *scheduled* tick's run is in hand and the grace runs out: the drain
    cancels the job, which is the shutdown working, not a failure. It used to escape into
    APScheduler, which logged "Job ... raised an exception" (found by the soak)."""
    async with (
        running_simulator(seed=9, images=200) as simulator,
        replicas(
            1,
            daemon_env(cli_env, simulator, IMAGE_SYNC_INTERVAL="1", IMAGE_SYNC_GRACE_PERIOD="0.3"),
            tmp_path,
        ) as (daemon,),
    ):
        await wait_for(
            lambda: scalar(
                engine, "SELECT count(*) FROM inventory.sync_runs WHERE status = 'succeeded'"
            ),
            30,
            "the start-up tick's run",
        )
        simulator.faults.update({"latency_ms": 3000})
        await wait_for(
            lambda: scalar(
                engine, "SELECT count(*) FROM inventory.sync_runs WHERE status = 'running'"
            ),
            15,
            "a scheduled run",
            step=0.02,
        )
        await asyncio.sleep(0.2)  # its partitions are in hand
        daemon.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(daemon.process.wait(), 10)
    output = daemon.output()
    assert code == 0, output[-3000:]
    assert "grace period over" in output
    errors = [line for line in output.splitlines() if '"level":"error"' in line]
    assert errors == [], errors[0][:2000]


@pytest.mark.parametrize(
    ("grace", "latency_ms", "outcome"),
    [("30", 400, "succeeded"), ("0.5", 3000, "abandoned")],
    ids=["partitions-in-hand-finish", "grace-over-cancels"],
)
async def test_sigterm_during_a_sync_exits_0_and_leaves_nothing_half_applied(
    engine: AsyncEngine,
    cli_env: dict[str, str],
    tmp_path: Path,
    grace: str,
    latency_ms: int,
    outcome: str,
) -> None:
    async with (
        running_simulator(seed=9, images=200, faults={"latency_ms": latency_ms}) as simulator,
        replicas(
            1,
            daemon_env(
                cli_env, simulator, IMAGE_SYNC_INTERVAL="600", IMAGE_SYNC_GRACE_PERIOD=grace
            ),
            tmp_path,
        ) as (daemon,),
    ):
        run_id = await wait_for(
            lambda: scalar(
                engine, "SELECT run_id FROM inventory.sync_runs WHERE status = 'running'"
            ),
            15,
            "the first run to start",
            step=0.02,
        )
        await asyncio.sleep(0.2)  # partitions in hand: their first page is being fetched
        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.wait_for(daemon.process.wait(), float(grace) + 5)
        took = time.monotonic() - signalled
        assert code == 0, daemon.output()[-3000:]
        print(f"SIGTERM -> exit 0 in {took:.2f}s (grace {grace}s, run {outcome})")

    assert took < float(grace) + 2
    status = await scalar(
        engine, "SELECT status FROM inventory.sync_runs WHERE run_id = :r", r=run_id
    )
    assert status == outcome
    recorded = {
        (r.region_id, r.image_source): r.status
        for r in await rows(
            engine,
            "SELECT region_id, image_source, status FROM inventory.sync_partitions WHERE run_id = :r",
            r=run_id,
        )
    }
    if outcome == "succeeded":
        # The 8 partitions in hand finished; the other 12 were never started.
        assert 0 < len(recorded) < PARTITIONS
        assert set(recorded.values()) == {"succeeded"}
    else:
        assert recorded == {}
    # Applied partitions are complete; the others wrote nothing (not even an event).
    stored = {
        (r.region_id, r.image_source): r.n
        for r in await rows(
            engine,
            "SELECT region_id, image_source, count(*) AS n FROM inventory.images GROUP BY 1, 2",
        )
    }
    expected = {p: simulator.catalogue.count(*p) for p in recorded}
    assert stored == {p: n for p, n in expected.items() if n}
    events = {
        (r.region_id, r.image_source)
        for r in await rows(
            engine,
            """SELECT DISTINCT e.region_id, i.image_source FROM inventory.image_events e
                 JOIN inventory.images i USING (region_id, image_id)""",
        )
    }
    assert events <= set(recorded)
    assert "daemon stopped" in daemon.output()


async def test_run_refuses_a_database_that_is_not_migrated(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    url = make_url(database_url)
    name = f"{url.database}_empty"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        env = {
            **cli_env,
            "DATABASE_URL": url.set(database=name).render_as_string(hide_password=False),
            "JDCLOUD_ENDPOINT": "http://127.0.0.1:9",
        }
        process = await asyncio.create_subprocess_exec(
            IMAGE_SYNC,
            "run",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert process.returncode == 1
    lines = [line for line in err.decode().splitlines() if line.startswith("image-sync:")]
    assert len(lines) == 1
    assert "the database schema is at nothing" in lines[0]
    assert "image-sync migrate" in lines[0]


async def test_a_tick_syncs_only_the_due_partitions_of_each_source(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(seed=2, images=40, regions=["cn-north-1"]) as simulator:
        settings = make_settings(
            simulator.url,
            IMAGE_SYNC_REGIONS="cn-north-1",
            IMAGE_SYNC_SOURCES="public,private",
            IMAGE_SYNC_INTERVAL="60",
            IMAGE_SYNC_INTERVAL_PUBLIC="150",
        )
        async with open_runtime(settings) as runtime:
            daemon = runtime.daemon()
            public, private = (
                Partition("cn-north-1", "public"),
                Partition("cn-north-1", "private", "default"),
            )
            assert daemon.tick_interval == 60
            assert (daemon.ticks_per_sync(public), daemon.ticks_per_sync(private)) == (3, 1)
            boundary = 60.0 * 20_000_000
            now = boundary + 7
            # Aligned ticks: private is due unless synced since this tick's boundary,
            # public (150 s, rounded up to 3 ticks) unless synced in the last 3 ticks.
            assert daemon.due_after(private, now) == boundary
            assert daemon.due_after(public, now) == boundary - 120
            # The start-up tick: due when older than the interval itself.
            assert daemon.due_after(public, now, aligned=False) == now - 150

            first = await daemon.tick(aligned=False)
            assert first is not None and first.status == "succeeded"
            assert {r.partition for r in first.partitions} == {public, private}
            assert await daemon.tick(aligned=False) is None  # nothing is due yet

            synced = time.time()
            assert await daemon.due_partitions({public: synced - 10, private: synced - 10}) == []
            assert await daemon.due_partitions({public: synced - 10, private: synced + 1}) == [
                private
            ]
