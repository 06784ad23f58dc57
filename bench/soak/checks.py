"""The checker: after a quiet tick, the inventory equals the catalogue and its history
equals the change log (:mod:`bench.soak.truth`); ``image-sync check`` passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.soak.fleet import Fleet, SimulatorProcess
from bench.soak.truth import GroundTruth, Key
from service.store.engine import create_engine
from tests.test_sync import assert_matches_catalogue

QUIET_TIMEOUT_S = 120.0
PARTITIONS_SYNCED_SINCE = """
SELECT count(DISTINCT (region_id, image_source)) FROM inventory.sync_partitions
 WHERE status = 'succeeded' AND started_at > to_timestamp(:since)
"""


def checker_engine(url: str) -> AsyncEngine:
    """The checker's own small pool, under its own application_name (not counted as a
    replica's), surviving the database restart (pre-ping)."""
    separator = "&" if "?" in url else "?"
    return create_engine(
        f"{url}{separator}application_name=soak-checker", pool_size=2, max_overflow=0
    )


class SnapshotCatalogue:
    """The simulator's ``GET /__simulator__/catalogue`` answer, shaped like a
    :class:`~service.simulator.catalogue.Catalogue` for ``assert_matches_catalogue``."""

    def __init__(self, data: Mapping[str, list[dict[str, Any]]]) -> None:
        self._data = {tuple(k.split("/", 1)): v for k, v in data.items()}

    def partitions(self) -> list[tuple[str, str]]:
        return list(self._data)  # type: ignore[arg-type]

    def images(self, region: str, source: str) -> list[dict[str, Any]]:
        return self._data[region, source]

    def by_key(self) -> dict[Key, dict[str, Any]]:
        return {(r, i["imageId"]): i for (r, _), images in self._data.items() for i in images}


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "at": self.at}


async def wait_quiet_tick(engine: AsyncEngine, since: float, partitions: int) -> float | None:
    """Seconds until every partition had a success that started after ``since``."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_TIMEOUT_S:
        try:
            async with engine.connect() as conn:
                done = await conn.scalar(sa.text(PARTITIONS_SYNCED_SINCE), {"since": since})
            if done >= partitions:
                return time.monotonic() - started
        except (OSError, sa.exc.SQLAlchemyError):
            pass
        await asyncio.sleep(1)
    return None


async def window_events(engine: AsyncEngine, after: int) -> tuple[dict[Key, list[str]], int]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT region_id, image_id, event_type, event_id FROM inventory.image_events"
                    " WHERE event_id > :after ORDER BY event_id"
                ),
                {"after": after},
            )
        ).all()
    events: dict[Key, list[str]] = {}
    for region, image_id, event_type, _ in rows:
        events.setdefault((region, image_id), []).append(event_type)
    return events, max((r[3] for r in rows), default=after)


class Checker:
    """Checkpoints: each judges the window since the previous one."""

    def __init__(self, engine: AsyncEngine, sim: SimulatorProcess, fleet: Fleet) -> None:
        self.engine = engine
        self.sim = sim
        self.fleet = fleet
        self.truth = GroundTruth()
        self.event_mark = 0
        self.results: list[CheckResult] = []
        self.windows: list[dict[str, Any]] = []

    def record(self, name: str, ok: bool, detail: str) -> CheckResult:
        result = CheckResult(name, ok, detail)
        self.results.append(result)
        print(f"[soak] check {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return result

    async def checkpoint(self, label: str, quiet_since: float, partitions: int) -> bool:
        waited = await wait_quiet_tick(self.engine, quiet_since, partitions)
        if waited is None:
            self.record(f"{label}: quiet tick", False, f"no quiet tick in {QUIET_TIMEOUT_S:g} s")
            return False
        self.record(f"{label}: quiet tick", True, f"every partition synced {waited:.0f} s later")
        catalogue = SnapshotCatalogue(await self.sim.admin("GET", "catalogue"))
        log = await self.sim.admin("GET", f"changes?since={self.truth.last_seq}")
        ok = await self._matches(label, catalogue)
        events, mark = await window_events(self.engine, self.event_mark)
        verdict = self.truth.judge(log["changes"], events, catalogue.by_key())
        self.event_mark = mark
        total = sum(map(len, events.values()))
        detail = (
            f"{len(log['changes'])} changes to {verdict.images_changed} images "
            f"({verdict.strict} with one possible event), {total} events"
        )
        if verdict.problems:
            detail += f"; {len(verdict.problems)} wrong: " + "; ".join(verdict.problems[:5])
        ok &= self.record(f"{label}: events = change log", not verdict.problems, detail).ok
        self.windows.append(
            {"label": label, "changes": len(log["changes"]), "events": total,
             "images_changed": verdict.images_changed, "strict": verdict.strict}
        )  # fmt: skip
        return await self.cli_check(label) and ok

    async def _matches(self, label: str, catalogue: SnapshotCatalogue) -> bool:
        try:
            await assert_matches_catalogue(self.engine, catalogue)
        except AssertionError as exc:
            return self.record(f"{label}: images = catalogue", False, str(exc)[:500]).ok
        n = sum(len(catalogue.images(*p)) for p in catalogue.partitions())
        return self.record(f"{label}: images = catalogue", True, f"{n} images and disks").ok

    async def cli_check(self, label: str) -> bool:
        code, out = await self.fleet.command("check")
        lines = " | ".join(line.strip() for line in out.strip().splitlines()[-6:])
        return self.record(f"{label}: image-sync check", code == 0, lines).ok

    async def no_run_running(self) -> bool:
        async with self.engine.connect() as conn:
            rows = dict(
                (
                    await conn.execute(
                        sa.text("SELECT status, count(*) FROM inventory.sync_runs GROUP BY 1")
                    )
                ).all()
            )
        running = rows.get("running", 0)
        return self.record("end: no run left running", not running, f"runs by status {rows}").ok
