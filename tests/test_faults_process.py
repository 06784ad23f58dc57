"""``image-sync sync --once`` killed with SIGKILL at many points, fetch and apply alike.

For each kill point the catalogue changes first (offline, online, rename, delete, add),
then a sync subprocess is started and killed:

- ``fetch@N``: once the simulator has served N requests (while pages stream into
  staging);
- ``apply@TABLE``: while its merge waits on a lock this test holds on TABLE, i.e. after
  staging and classification, before the events (``image_events``), the image upsert
  (``images``), the disk rewrite (``image_disks``) or the partition record
  (``sync_partitions``) are written;
- ``time@T``: T seconds after start, T drawn from a seeded RNG over a whole run's
  duration (some partitions committed, others in flight).

Right after each kill every data invariant holds (``image-sync check``; only the
liveness check may name the killed run), and one more sync converges to the exact
catalogue. At the end, every image's event sequence equals the one a fault-free run of
the same changes records: no duplicate and no missing event.

CI runs a sample of the points; ``-m slow`` runs all of them (at least 20).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.simulator import running_simulator
from service.sync import sync_once
from tests.fault_helpers import (
    assert_after_crash,
    assert_invariants,
    assert_same_history,
    history,
    mutate,
    truncate,
)
from tests.test_sync import assert_matches_catalogue

pytestmark = pytest.mark.db

SEED = 33
IMAGES = 800
PAGE_SIZE = "10"
LATENCY_MS = 8
"""Per request: a run spans ~100 pages over a second or so, so kills land mid-flight."""
LOCKED_TABLES = ("image_events", "images", "image_disks", "sync_partitions")


@dataclass(frozen=True)
class KillPoint:
    kind: str  # fetch | apply | time
    value: Any  # requests served | table | fraction of a run's duration

    def __str__(self) -> str:
        return f"{self.kind}@{self.value}"


def all_points() -> list[KillPoint]:
    rng = random.Random(20261126)
    fetch = [KillPoint("fetch", n) for n in (1, 3, 8, 15, 25, 40, 60, 80)]
    apply = [KillPoint("apply", t) for t in LOCKED_TABLES]
    timed = [KillPoint("time", round(rng.uniform(0.05, 1.0), 3)) for _ in range(10)]
    return fetch + apply + timed


ALL_POINTS = all_points()
CI_POINTS = (
    [ALL_POINTS[i] for i in (1, 5)]
    + [p for p in ALL_POINTS if p.kind == "apply"]
    + [ALL_POINTS[-1], ALL_POINTS[-4]]
)


async def _start(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "sync",
        "--once",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _sync_cli(env: dict[str, str]) -> float:
    started = time.monotonic()
    proc = await _start(env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out.decode(), err.decode()[-2000:])
    return time.monotonic() - started


async def _wait_for(predicate: Any, what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def _no_sync_backends(engine: AsyncEngine) -> bool:
    """No session of a (killed) sync is left: none holds an advisory lock."""
    async with engine.connect() as conn:
        held = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    return held == 0


@asynccontextmanager
async def _locked(engine: AsyncEngine, table: str) -> AsyncIterator[None]:
    async with engine.connect() as conn:
        trans = await conn.begin()
        await conn.execute(sa.text(f"LOCK TABLE inventory.{table} IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            await trans.rollback()


async def _waiting_on_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return bool(
            await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            )
        )


async def _kill_at(
    point: KillPoint, env: dict[str, str], engine: AsyncEngine, sim: Any, run_seconds: float
) -> None:
    served = sim.state.counters["requests"]
    proc = await _start(env)
    try:
        if point.kind == "fetch":

            async def reached() -> bool:
                return sim.state.counters["requests"] - served >= point.value or (
                    proc.returncode is not None
                )

            await _wait_for(reached, str(point))
        elif point.kind == "apply":
            async with _locked(engine, point.value):
                await _wait_for(lambda: _waiting_on_lock(engine), f"a merge blocked ({point})")
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        else:
            await asyncio.sleep(point.value * run_seconds)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.communicate()
    # The server notices the dead client and rolls its transactions back.
    await _wait_for(lambda: _no_sync_backends(engine), "the killed sync's sessions to end")


def _cli_env(cli_env: dict[str, str], url: str) -> dict[str, str]:
    return {
        **cli_env,
        "JDCLOUD_ENDPOINT": url,
        "IMAGE_SYNC_PAGE_SIZE": PAGE_SIZE,
        "IMAGE_SYNC_LOG_LEVEL": "warning",
    }


async def _reference(engine: AsyncEngine, make_settings: Any, steps: int) -> dict[str, Any]:
    """The same changes, synced in process without any fault."""
    await truncate(engine)
    async with (
        running_simulator(images=IMAGES, seed=SEED) as sim,
        open_runtime(make_settings(sim.url)) as rt,
    ):
        assert (await sync_once(engine, rt.client, rt.partitions(), page_size=10)).ok
        for step in range(steps):
            mutate(sim.catalogue, step)
            assert (await sync_once(engine, rt.client, rt.partitions(), page_size=10)).ok
    return await history(engine)


async def _kill_scenario(
    points: list[KillPoint], engine: AsyncEngine, make_settings: Any, cli_env: dict[str, str]
) -> None:
    reference = await _reference(engine, make_settings, len(points))
    await truncate(engine)
    crashed_runs = 0
    async with running_simulator(
        images=IMAGES, seed=SEED, faults={"latency_ms": LATENCY_MS}
    ) as sim:
        env = _cli_env(cli_env, sim.url)
        run_seconds = await _sync_cli(env)
        for step, point in enumerate(points):
            mutate(sim.catalogue, step)
            await _kill_at(point, env, engine, sim, run_seconds)
            await assert_after_crash(engine)
            async with engine.connect() as conn:
                running = await conn.scalar(
                    sa.text("SELECT count(*) FROM inventory.sync_runs WHERE status = 'running'")
                )
            assert running <= 1, point
            crashed_runs += running
            await _sync_cli(env)
            await assert_invariants(engine)
            await assert_matches_catalogue(engine, sim.catalogue)
    assert_same_history(await history(engine), reference)
    async with engine.connect() as conn:
        statuses = dict(
            (
                await conn.execute(
                    sa.text("SELECT status, count(*) FROM inventory.sync_runs GROUP BY 1")
                )
            ).all()
        )
    # Every killed run that got as far as starting was marked abandoned by the next one.
    assert "running" not in statuses
    assert statuses.get("abandoned", 0) == crashed_runs
    print(f"kill points survived: {len(points)} ({', '.join(map(str, points))})")


@pytest.mark.long
async def test_sigkill_sample(
    engine: AsyncEngine, make_settings: Any, cli_env: dict[str, str]
) -> None:
    await _kill_scenario(CI_POINTS, engine, make_settings, cli_env)


@pytest.mark.slow
async def test_sigkill_all_points(
    engine: AsyncEngine, make_settings: Any, cli_env: dict[str, str]
) -> None:
    assert len(ALL_POINTS) >= 20
    await _kill_scenario(ALL_POINTS, engine, make_settings, cli_env)


def test_points_cover_fetch_and_apply() -> None:
    kinds = {p.kind for p in ALL_POINTS}
    assert kinds == {"fetch", "apply", "time"} and len(ALL_POINTS) >= 20
    assert {p.kind for p in CI_POINTS} == kinds
    assert os.name == "posix"  # SIGKILL
