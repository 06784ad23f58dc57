"""Migration 0006 (accounts) on a database written by the one-account release: every
row kept, the one account's image_access rows created, its partitions and events named;
that release, run against the migrated schema, stops with one line; and the migration
runs while that release is syncing.

"The one-account release" is the code just before migration 0006 was added, exported with
``git archive`` and run from the same virtualenv (its entry point unchanged), so these
tests exercise the real previous sync, not a re-creation of what it wrote."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.string import TextLoader
from sqlalchemy.engine import make_url

from service.simulator import Simulator, simulator_in_thread
from service.store.migrate import head_revision
from tests.sim_admin import admin_ok

ROOT = Path(__file__).resolve().parents[1]
OLD_HEAD = "0005"
HEAD = head_revision()
ACCOUNT_SOURCES = ("private", "shared")


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's code (the parent of the commit that added migration 0006:
    the newest state of the history whose schema ends at 0005) in a directory of its own."""
    added = subprocess.run(
        [
            "git",
            "log",
            "--diff-filter=A",
            "--format=%H",
            "--",
            "migrations/versions/0006_accounts.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    commits = added.stdout.split()
    if added.returncode != 0 or not commits:
        pytest.fail(
            f"cannot find the commit that added migration 0006 (git history needed): {added.stderr}"
        )
    base = subprocess.run(
        ["git", "rev-parse", f"{commits[-1]}^"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    archive = subprocess.run(
        ["git", "archive", base.stdout.strip(), "service", "migrations"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = tmp_path_factory.mktemp("old-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    heads = sorted(p.name for p in (target / "migrations" / "versions").glob("0*.py"))
    assert heads[-1].startswith(OLD_HEAD), heads  # the release this test is about
    return target


def _env(database: str, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_"))}
    env.update(
        DATABASE_URL=database,
        JDCLOUD_ENDPOINT=endpoint,
        IMAGE_SYNC_HTTP="off",
        IMAGE_SYNC_LOG_FORMAT="json",
        IMAGE_SYNC_RATE_LIMIT="0",
        IMAGE_SYNC_REGIONS="cn-north-1,cn-east-2",
        **extra,
    )
    return env


def _cli(code: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=code,
        env={**env, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every inventory table, as text, sorted (column order as stored)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(_libpq(url)) as conn:
        # As PostgreSQL prints them: image_versions holds 'infinity', which datetime cannot.
        conn.adapters.register_loader("timestamptz", TextLoader)
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'inventory'"
                " AND tablename <> 'alembic_version' ORDER BY 1"
            )
        ]
        for table in tables:
            out[table] = sorted(
                tuple(str(v) for v in row)
                for row in conn.execute(f"SELECT * FROM inventory.{table}")
            )
    return out


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(_libpq(url)) as conn:
        return list(conn.execute(sql))


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator_in_thread(seed=31, images=300, regions=["cn-north-1", "cn-east-2"]) as sim:
        yield sim


def _populate(old_release: Path, url: str, sim: Simulator) -> None:
    env = _env(url, sim.url)
    for args in (["migrate"], ["sync", "--once"]):
        done = _cli(old_release, env, *args)
        assert done.returncode == 0, done.stderr
    # Some history: an image deleted, one taken offline, one added.
    region = "cn-north-1"
    catalogue = admin_ok(sim, "GET", "catalogue")
    shared = catalogue[f"{region}/shared"][0]["imageId"]
    public = next(i for i in catalogue[f"{region}/public"] if not i.get("offline"))["imageId"]
    admin_ok(sim, "POST", "catalogue/delete", {"region": region, "image_id": shared})
    admin_ok(sim, "POST", "catalogue/take_offline", {"region": region, "image_id": public})
    admin_ok(sim, "POST", "catalogue/add", {"region": region, "source": "private"})
    done = _cli(old_release, env, "sync", "--once")
    assert done.returncode == 0, done.stderr


def test_upgrade_keeps_every_row_and_names_the_one_account(
    old_release: Path, scratch_url: str, sim: Simulator
) -> None:
    _populate(old_release, scratch_url, sim)
    before = _rows(scratch_url)
    assert before["images"] and before["image_events"]
    migrated = _cli(ROOT, _env(scratch_url, sim.url, IMAGE_SYNC_ACCOUNT="prod"), "migrate")
    assert migrated.returncode == 0, migrated.stderr
    after = _rows(scratch_url)
    # Every old row is still there, each old column unchanged (new columns are appended).
    for table, rows in before.items():
        width = len(rows[0]) if rows else 0
        kept = sorted(row[:width] for row in after[table])
        assert kept == rows, table
    # The one account's private and shared images have its access rows.
    expected = _query(
        scratch_url,
        "SELECT region_id, image_id, image_source, first_seen_at, removed_at"
        " FROM inventory.images WHERE image_source IN ('private', 'shared') ORDER BY 1, 2",
    )
    access = _query(
        scratch_url,
        "SELECT region_id, image_id, image_source, first_seen_at, removed_at"
        " FROM inventory.image_access WHERE account = 'prod' ORDER BY 1, 2",
    )
    assert access == expected and len(access) > 10
    assert any(row[4] is not None for row in access)  # the deleted shared image
    assert _query(scratch_url, "SELECT account, role_jrn, configured FROM inventory.accounts") == [
        ("prod", None, True)
    ]
    for table in ("image_events", "sync_partitions", "partitions"):
        wrong = _query(
            scratch_url,
            f"SELECT count(*) FROM inventory.{table} WHERE account IS DISTINCT FROM"
            " (CASE WHEN image_source IN ('private', 'shared') THEN 'prod' END)",
        )
        assert wrong == [(0,)], table
    health = _query(
        scratch_url,
        "SELECT account, region_id, image_source, last_status FROM inventory.sync_health",
    )
    assert len(health) == 10 and {row[3] for row in health} == {"succeeded"}
    assert {row[0] for row in health if row[2] in ACCOUNT_SOURCES} == {"prod"}
    # The previous release on the migrated schema stops with one line, changing nothing.
    old = _cli(old_release, _env(scratch_url, sim.url), "sync", "--once")
    assert old.returncode != 0
    lines = old.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in old.stderr, old.stderr
    assert HEAD in lines[0], lines[0]
    assert _rows(scratch_url) == after


def test_a_malformed_account_name_stops_the_migration_before_any_change(
    old_release: Path, scratch_url: str, sim: Simulator
) -> None:
    env = _env(scratch_url, sim.url)
    assert _cli(old_release, env, "migrate").returncode == 0
    bad = _cli(ROOT, {**env, "IMAGE_SYNC_ACCOUNT": "Prod Team"}, "migrate")
    assert bad.returncode == 2, bad.stderr
    assert "IMAGE_SYNC_ACCOUNT" in bad.stderr and "Traceback" not in bad.stderr
    assert _query(scratch_url, "SELECT version_num FROM inventory.alembic_version") == [(OLD_HEAD,)]


async def test_migrating_while_the_previous_release_syncs(
    old_release: Path, scratch_url: str
) -> None:
    """The old release syncs a slow catalogue while the migration runs: the migration
    waits for the sync's transactions (or the sync stops with one line); afterwards the
    schema is at head, every image has survived and every private/shared image of the
    one account has its access row."""
    with simulator_in_thread(seed=32, images=1500, regions=["cn-north-1", "cn-east-2"]) as sim:
        env = _env(scratch_url, sim.url)
        assert (await asyncio.to_thread(_cli, old_release, env, "migrate")).returncode == 0
        admin_ok(sim, "PUT", "faults", {"latency_ms": 20})
        code = str(old_release)
        sync = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "sync", "--once",
            cwd=code, env={**env, "PYTHONPATH": code, "IMAGE_SYNC_RATE_LIMIT": "15"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(2.5)  # the sync is paging and merging (about 5 s at 15/s)
        migration_began = datetime.now(UTC)
        migrated = await asyncio.to_thread(_cli, ROOT, env, "migrate")
        _, err = await asyncio.wait_for(sync.communicate(), 120)
    assert migrated.returncode == 0, migrated.stderr
    log = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert log and datetime.fromisoformat(log[-1]["time"]) > migration_began, (
        "the sync ended before the migration began: no overlap was tested"
    )
    if sync.returncode != 0:
        lines = err.decode().strip().splitlines()
        assert "Traceback" not in err.decode(), err.decode()
        assert lines, "the old sync failed without saying why"
    assert _query(scratch_url, "SELECT version_num FROM inventory.alembic_version") == [(HEAD,)]
    # Every private/shared image written before the migration has its access row. A
    # partition the old run committed after the migration (it checks the schema only when
    # it starts) has its sync_partitions row without an account, and its images have no
    # access row yet: the new release adopts them on its first sync of that partition.
    missing = _query(
        scratch_url,
        "SELECT DISTINCT i.region_id, i.image_source FROM inventory.images i"
        " WHERE i.image_source IN ('private', 'shared')"
        " AND NOT EXISTS (SELECT 1 FROM inventory.image_access x WHERE x.account = 'default'"
        " AND x.region_id = i.region_id AND x.image_id = i.image_id)",
    )
    after_migration = _query(
        scratch_url,
        "SELECT DISTINCT region_id, image_source FROM inventory.sync_partitions"
        " WHERE image_source IN ('private', 'shared') AND account IS NULL",
    )
    assert set(missing) <= set(after_migration), (missing, after_migration)
    # The new release's next sync adopts them (no event: nothing changed upstream).
    with simulator_in_thread(seed=32, images=1500, regions=["cn-north-1", "cn-east-2"]) as sim:
        resync = await asyncio.to_thread(_cli, ROOT, _env(scratch_url, sim.url), "sync", "--once")
    assert resync.returncode == 0, resync.stderr
    orphans = _query(
        scratch_url,
        "SELECT count(*) FROM inventory.images i"
        " WHERE i.image_source IN ('private', 'shared') AND i.removed_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM inventory.image_access x WHERE x.account = 'default'"
        " AND x.region_id = i.region_id AND x.image_id = i.image_id AND x.removed_at IS NULL)",
    )
    assert orphans == [(0,)]
    # Every promise holds, the versions too: what the old run wrote before the migration
    # was back-filled; a write of it after the migration was refused (migration 0007).
    checked = await asyncio.to_thread(_cli, ROOT, _env(scratch_url, sim.url), "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    news = _query(
        scratch_url,
        "SELECT count(*) FROM inventory.image_events"
        " WHERE sync_run_id = (SELECT max(run_id) FROM inventory.sync_runs)",
    )
    assert news == [(0,)]
    # What the old sync committed is there (it may have stopped at the schema check of a
    # later step, never half-way through a partition).
    partitions = _query(
        scratch_url, "SELECT image_source, status, images_seen FROM inventory.sync_partitions"
    )
    images = _query(scratch_url, "SELECT image_source, count(*) FROM inventory.images GROUP BY 1")
    succeeded = {source: seen for source, status, seen in partitions if status == "succeeded"}
    counted = dict(images)
    for source, seen in succeeded.items():
        assert counted.get(source, 0) >= seen, (source, succeeded, counted)
