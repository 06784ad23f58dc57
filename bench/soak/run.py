"""Orchestration: start everything, alternate churn windows and checkpoints, stop."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.soak.checks import Checker, checker_engine
from bench.soak.cluster import OwnedPostgres
from bench.soak.driver import Driver
from bench.soak.fleet import Fleet, SimulatorProcess, unexpected_errors
from bench.soak.resources import Sampler, judge
from service.config import DEFAULT_REGIONS, SOURCES

INTERVAL_S = 10
REPLICAS = 3
CHECKPOINT_ESTIMATE_S = 25.0
INCIDENTS = (("sigkill", 0.15, 0.3), ("pg_restart", 0.35, 0.5), ("sigterm", 0.6, 0.75))
"""Each incident happens once, at a random time within this fraction of the run."""


@dataclass(frozen=True)
class Options:
    minutes: float
    images: int = 3000
    seed: int = 18
    latency_ms: float = 15.0
    jitter_ms: float = 10.0
    sample_s: float = 10.0


@dataclass
class Soak:
    options: Options
    logs: Path
    rng: random.Random
    incidents: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0


def window_seconds(minutes: float) -> float:
    """A checkpoint every few minutes, at least two windows in any run."""
    return max(25.0, min(240.0, minutes * 60 / 5))


async def soak(options: Options) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="image-sync-soak-logs-"))
    state = Soak(options, logs, random.Random(options.seed))
    pg = OwnedPostgres()
    try:
        pg.start()
        url = pg.create_database("soak")
        sim = SimulatorProcess(logs, options.images, options.seed, options.latency_ms,
                               options.jitter_ms)  # fmt: skip
        try:
            await sim.start()
            return await _with_simulator(state, pg, url, sim)
        finally:
            await sim.close()
    finally:
        pg.close()


async def _with_simulator(
    state: Soak, pg: OwnedPostgres, url: str, sim: SimulatorProcess
) -> dict[str, Any]:
    fleet = Fleet(url, sim.url, state.logs, INTERVAL_S)
    code, out = await fleet.command("migrate")
    if code != 0:
        raise RuntimeError(f"image-sync migrate failed: {out}")
    engine = checker_engine(url)
    checker = Checker(engine, sim, fleet)
    samples: list[dict[str, Any]] = []
    sampler = Sampler(fleet, engine, pg.port, state.options.sample_s, samples)
    sampling = asyncio.ensure_future(sampler.run())
    started = time.time()
    try:
        for _ in range(REPLICAS):
            await fleet.start_one()
        result = await _windows(state, pg, fleet, sim, checker, started)
        await _finish(fleet, checker)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        for replica in fleet.alive:
            await fleet.sigterm(replica, "end")
        totals = await _totals(engine)
        await engine.dispose()
    result.update(totals)
    result["stats"] = await sim.admin("GET", "stats")
    result["samples"] = samples
    result["replicas"] = [
        {"name": r.name, "pid": r.pid, "ended": r.how_ended, "exit_code": r.exit_code}
        for r in fleet.replicas
    ]
    _judge_resources(result, checker, state.options)
    result["checks"] = [c.to_dict() for c in checker.results]
    result["windows"] = checker.windows
    result["ok"] = all(c.ok for c in checker.results)
    if result["ok"]:
        shutil.rmtree(state.logs, ignore_errors=True)
    else:
        result["logs"] = str(state.logs)
    return result


async def _windows(
    state: Soak, pg: OwnedPostgres, fleet: Fleet, sim: SimulatorProcess, checker: Checker,
    started: float,
) -> dict[str, Any]:  # fmt: skip
    partitions = len(DEFAULT_REGIONS.split(",")) * len(SOURCES)
    run_s = state.options.minutes * 60
    deadline = time.monotonic() + run_s
    due = {name: started + state.rng.uniform(lo, hi) * run_s for name, lo, hi in INCIDENTS}
    driver = Driver(sim, state.rng)
    await checker.checkpoint("initial", started, partitions)
    window = window_seconds(state.options.minutes)
    number = 0
    while deadline - time.monotonic() > CHECKPOINT_ESTIMATE_S + 10:
        number += 1
        driver.new_window()
        end = min(time.monotonic() + window, deadline - CHECKPOINT_ESTIMATE_S)
        while time.monotonic() < end:
            await driver.step()
            state.steps += 1
            if state.rng.random() < 0.4:
                await driver.toggle_faults()
            for name in [n for n, at in due.items() if at <= time.time()]:
                del due[name]
                await _incident(state, name, pg, fleet)
            await asyncio.sleep(min(state.rng.uniform(2, 8), max(0.0, end - time.monotonic())))
        await driver.faults_off()
        await checker.checkpoint(f"window {number}", time.time(), partitions)
    for name in list(due):  # a run too short for its schedule still has every incident
        await _incident(state, name, pg, fleet)
        await checker.checkpoint(f"after {name}", time.time(), partitions)
    return {
        "minutes": state.options.minutes,
        "options": state.options.__dict__,
        "wall_seconds": round(time.time() - started, 1),
        "driver_steps": state.steps,
        "changes": dict(driver.changes),
        "fault_toggles": driver.fault_toggles,
        "incidents": state.incidents,
    }


async def _incident(state: Soak, name: str, pg: OwnedPostgres, fleet: Fleet) -> None:
    """SIGKILL a replica and start a new one; restart PostgreSQL; SIGTERM and restart.
    The first replica is never the victim, so one process lives the whole run."""
    at = time.time()
    print(f"[soak] incident: {name}", flush=True)
    victims = [r for r in fleet.alive if r.name != "r1"] or fleet.alive
    record: dict[str, Any] = {"incident": name, "at": at}
    if name == "pg_restart":
        pg.stop("immediate")
        await asyncio.sleep(3)
        pg.start()
    else:
        victim = state.rng.choice(victims)
        record["replica"] = victim.name
        if name == "sigkill":
            await fleet.sigkill(victim)
        else:
            await fleet.sigterm(victim)
            record["exit_code"] = victim.exit_code
        record["replacement"] = (await fleet.start_one()).name
    record["seconds"] = round(time.time() - at, 1)
    state.incidents.append(record)


async def _finish(fleet: Fleet, checker: Checker) -> None:
    """Stop every replica with SIGTERM: each exits 0, no run is left running, and the
    logs hold no traceback."""
    await fleet.stop_all()
    codes = {r.name: r.exit_code for r in fleet.replicas if r.how_ended in ("sigterm", "end")}
    checker.record("SIGTERM exits 0", all(c == 0 for c in codes.values()), f"exit codes {codes}")
    await checker.no_run_running()
    await checker.cli_check("end")
    errors = [f"{r.name}: {line}" for r in fleet.replicas for line in unexpected_errors(r.log)]
    logs = f" (whole tracebacks in {fleet.logs})" if errors else ""
    checker.record(
        "no unexpected error in the replicas' logs",
        not errors,
        ("; ".join(errors[:3]) or "none") + logs,
    )


async def _totals(engine: Any) -> dict[str, Any]:
    async with engine.connect() as conn:
        runs = dict(
            (
                await conn.execute(
                    sa.text("SELECT status, count(*) FROM inventory.sync_runs GROUP BY 1")
                )
            ).all()
        )
        partitions = dict(
            (
                await conn.execute(
                    sa.text("SELECT status, count(*) FROM inventory.sync_partitions GROUP BY 1")
                )
            ).all()
        )
        events = dict(
            (
                await conn.execute(
                    sa.text("SELECT event_type, count(*) FROM inventory.image_events GROUP BY 1")
                )
            ).all()
        )
    return {"runs": runs, "partition_syncs": partitions, "events": events}  # fmt: skip


def _judge_resources(result: dict[str, Any], checker: Checker, options: Options) -> None:
    warmup = min(300.0, options.minutes * 60 * 0.25)
    rows, bound = judge(result["samples"], warmup)
    result["resources"] = {"warmup_s": warmup, "pool_bound": bound, "replicas": rows}
    for row in rows:
        rss, fds, conns = row["rss_mb"], row["fds"], row["db_connections"]
        checker.record(
            f"resources {row['replica']}",
            row["ok"],
            f"RSS {rss['start']:.0f}->{rss['end']:.0f} MB ({_slope(rss, 'MB')}), "
            f"FDs {fds['start']}->{fds['end']} ({_slope(fds, 'fds')}), "
            f"DB connections max {conns['max']} (pool bound {bound})",
        )


def _slope(metric: dict[str, Any], unit: str) -> str:
    if metric["slope_per_hour"] is None:
        return "no slope: too few samples after warm-up"
    judged = "" if metric["judged_span_s"] >= 300 else ", not judged: under 5 min after warm-up"
    return f"{metric['slope_per_hour']:+.1f} {unit}/h over {metric['judged_span_s']:.0f} s{judged}"
