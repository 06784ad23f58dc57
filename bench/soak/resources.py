"""Resource samples every few seconds: each replica's RSS, open file descriptors and
database connections (from ``/proc``), the server's connections per application
(``pg_stat_activity``) and the size of the ``inventory`` schema."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.soak.fleet import Fleet
from service.app import PARTITION_CONCURRENCY
from service.store.engine import create_engine

RSS_BOUND_MB_PER_HOUR = 60.0
FD_BOUND_PER_HOUR = 60.0
MIN_JUDGED_SPAN_S = 300.0
"""A process is judged on its slope only with this much sampled life after warm-up:
over a shorter span the noise of one sync (tens of MB, a dozen sockets) dominates."""

CONNECTIONS_SQL = """
SELECT coalesce(nullif(application_name, ''), backend_type), count(*)
  FROM pg_stat_activity WHERE datname = current_database() GROUP BY 1
"""
SCHEMA_SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'inventory' AND c.relkind IN ('r', 'm')
"""


def pool_bound() -> int:
    """The most connections one replica's pool opens: pool size plus overflow, read from
    an engine built the way :func:`service.app.open_runtime` builds it."""
    engine = create_engine("postgresql://soak@127.0.0.1/soak", pool_size=PARTITION_CONCURRENCY + 2)
    pool: Any = engine.sync_engine.pool
    return int(pool.size() + pool._max_overflow)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> tuple[int, set[int]] | None:
    """(number of open descriptors, inodes of its sockets)."""
    try:
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        return None
    sockets = {int(link[8:-1]) for link in links if link.startswith("socket:[")}
    return len(links), sockets


def tcp_inodes_to_port(port: int) -> set[int]:
    """Inodes of established TCP sockets whose peer is 127.0.0.1:``port``."""
    out: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                out.add(inode)
    return out


@dataclass
class Sampler:
    fleet: Fleet
    engine: AsyncEngine
    pg_port: int
    every_s: float
    samples: list[dict[str, Any]]

    async def run(self) -> None:
        started = time.time()
        while True:
            self.samples.append(await self.sample(time.time() - started))
            await asyncio.sleep(self.every_s)

    async def sample(self, t: float) -> dict[str, Any]:
        to_pg = tcp_inodes_to_port(self.pg_port)
        replicas: dict[str, Any] = {}
        for replica in self.fleet.alive:
            fds = open_fds(replica.pid)
            rss = rss_mb(replica.pid)
            if fds is None or rss is None:
                continue
            replicas[replica.name] = {
                "pid": replica.pid,
                "rss_mb": round(rss, 1),
                "fds": fds[0],
                "db_connections": len(fds[1] & to_pg),
            }
        sample: dict[str, Any] = {"t": round(t, 1), "replicas": replicas}
        try:
            async with self.engine.connect() as conn:
                sample["connections"] = dict((await conn.execute(sa.text(CONNECTIONS_SQL))).all())
                sample["inventory_bytes"] = await conn.scalar(sa.text(SCHEMA_SIZE_SQL))
        except (OSError, sa.exc.SQLAlchemyError):
            sample["connections"], sample["inventory_bytes"] = None, None  # restarting
        return sample


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600


def series(samples: list[dict[str, Any]], name: str, metric: str) -> list[tuple[float, float]]:
    return [(s["t"], s["replicas"][name][metric]) for s in samples if name in s["replicas"]]


def judge(samples: list[dict[str, Any]], warmup_s: float) -> tuple[list[dict[str, Any]], int]:
    """Per replica: start/end and slope of RSS, FDs, DB connections; and the pool bound."""
    bound = pool_bound()
    names = sorted({n for s in samples for n in s["replicas"]}, key=lambda n: int(n[1:]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"replica": name}
        for metric in ("rss_mb", "fds", "db_connections"):
            points = series(samples, name, metric)
            born = points[0][0]
            steady = [p for p in points if p[0] >= born + warmup_s]
            row[metric] = {
                "start": points[0][1],
                "end": points[-1][1],
                "max": max(v for _, v in points),
                "slope_per_hour": slope_per_hour(steady),
                "judged_span_s": round(steady[-1][0] - steady[0][0], 1) if steady else 0.0,
            }
        row["ok"] = _replica_ok(row, bound)
        rows.append(row)
    return rows, bound


def _replica_ok(row: dict[str, Any], bound: int) -> bool:
    if row["db_connections"]["max"] > bound:
        return False
    for metric, limit in (("rss_mb", RSS_BOUND_MB_PER_HOUR), ("fds", FD_BOUND_PER_HOUR)):
        m = row[metric]
        if m["judged_span_s"] >= MIN_JUDGED_SPAN_S and (m["slope_per_hour"] or 0) > limit:
            return False
    return True
