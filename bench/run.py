"""``python -m bench [--small]``: run every phase against one simulator and one database.

Order: start the simulator process (its own CPU and GIL), create a fresh database and
migrate it, then measure in subprocesses: the floor, the full initial sync, a
no-change resync, a resync after ``change_fraction`` of the catalogue changed (through
the simulator's admin endpoints), and the SDK baseline. Rows written per table come
from ``pg_stat_user_tables`` deltas around each sync. Prints a table and writes JSON
under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.scenario import BIG_PARTITION, FULL, SMALL, Scenario

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SYSTEM_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = ("images", "image_disks", "image_events")
OFFLINE_SOURCES = ("public", "thirdparty")

TARGET_FLOOR_RATIO = 1.3
TARGET_BASELINE_SPEEDUP = 20.0
TARGET_RSS_MB = 250.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 images, 10 ms: seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL server's maintenance database (default: BENCH_DATABASE_URL, "
        "else 127.0.0.1:5432 when it answers, else an embedded PostgreSQL)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where JSON goes")
    parser.add_argument(
        "--profile", type=Path, help="write a pyinstrument profile of the full sync"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the SDK baseline")
    parser.add_argument(
        "--accounts",
        type=int,
        metavar="N",
        help="instead: the accounts scenario, one daemon tick over N accounts x 4 regions "
        "with 3 daemons and with 1 (bench/accounts.py)",
    )
    parser.add_argument(
        "--images",
        type=int,
        action="append",
        metavar="N",
        help="scale mode (bench/scale.py): N images without latency, load floor, full sync "
        "and no-change resync; repeat for several sizes",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="scale mode at 10,000, 100,000 and 1,000,000 images (make bench-scale)",
    )
    parser.add_argument(
        "--no-load-floor", action="store_true", help="scale mode: skip the load floor phase"
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="scale mode: synthesise a history on the largest size and time images_as_of",
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="scale mode: keep the largest size's database (its URL is printed) to query later",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="floor and full sync runs, median reported (default 3; 1 with --small)",
    )
    args = parser.parse_args(argv)
    if args.accounts is not None:
        return accounts_main(args.accounts, args.database_url, args.results_dir)
    if args.images or args.scale:
        return _main_scale(args)
    scenario = SMALL if args.small else FULL
    repeat = args.repeat or (1 if args.small else 3)
    result = run(
        scenario,
        server_url=args.database_url,
        profile=args.profile,
        baseline=not args.no_baseline,
        repeat=max(1, repeat),
    )
    print_table(result)
    write_results(result, args.results_dir)
    return 0 if result["completed"] else 1


def accounts_main(accounts: int, server_url: str | None, results_dir: Path) -> int:
    from bench.accounts import print_accounts, run_accounts, scenario_for, tick_problems

    if accounts < 1:
        raise SystemExit("python -m bench: --accounts must be at least 1")
    result = run_accounts(scenario_for(accounts), server_url=server_url)
    print_accounts(result)
    write_results(result, results_dir)
    problems = [p for t in result["ticks"].values() for p in tick_problems(t, result["expected"])]
    for problem in problems:
        print(f"MISS {problem}")
    return 1 if problems else 0


def _main_scale(args: argparse.Namespace) -> int:
    from bench.scale import SCALE_SIZES, print_scale, run_scale

    sizes = tuple(sorted(set(args.images or ()) | (set(SCALE_SIZES) if args.scale else set())))
    if any(n < 100 for n in sizes):
        raise SystemExit("python -m bench: --images must be at least 100")
    result = run_scale(
        sizes,
        server_url=args.database_url,
        history=args.history,
        load_floor=not args.no_load_floor,
        keep_database=args.keep_database,
    )
    print_scale(result)
    result["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["scenario"] = {"name": "scale"}
    write_results(result, args.results_dir)
    return 0


# --- orchestration -------------------------------------------------------------------------


def run(
    scenario: Scenario,
    *,
    server_url: str | None = None,
    profile: Path | None = None,
    baseline: bool = True,
    repeat: int = 1,
) -> dict[str, Any]:
    """Every phase once; the floor and the full sync ``repeat`` times (the median is
    reported, each on a fresh database), the resyncs on the last full sync's database."""
    log(f"scenario {scenario.name}: {scenario.images} images, {scenario.latency_ms} ms latency")
    floors: list[dict[str, Any]] = []
    fulls: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    phases: dict[str, Any] = {}
    with postgres_server(server_url) as server, simulator(scenario) as endpoint:
        for attempt in range(1, repeat + 1):
            with fresh_database(server) as database_url:
                config = {
                    "endpoint": endpoint,
                    "database_url": database_url,
                    "scenario": scenario.to_dict(),
                }
                with psycopg.connect(database_url, autocommit=True) as conn:
                    server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
                    migrate(database_url)
                    log(f"floor: fetch and decode every page ({attempt}/{repeat})")
                    floors.append(run_phase("floor", config))
                    log(
                        f"load floor: fetch, normalise, COPY into empty tables ({attempt}/{repeat})"
                    )
                    loads.append(measured_load_floor(conn, config))
                    log(f"full initial sync on a fresh schema ({attempt}/{repeat})")
                    fulls.append(measured_sync(conn, config, profile if attempt == 1 else None))
                    if attempt < repeat:
                        continue
                    phases["floor"] = _median(floors)
                    phases["load_floor"] = _median(loads)
                    phases["full_sync"] = _median(fulls)
                    log("no-change resync")
                    phases["no_change_resync"] = measured_sync(conn, config)
                    changes = change_catalogue(conn, endpoint, scenario)
                    log(f"resync after {sum(changes.values())} catalogue changes {changes}")
                    phases["changed_resync"] = measured_sync(conn, config)
                    phases["changed_resync"]["catalogue_changes"] = changes
                    if baseline:
                        log(
                            "baseline: SDK + one upsert per row (page 1 and every "
                            f"{scenario.baseline_stride}th page, scaled)"
                        )
                        with BackendCpu(conn.info.dbname) as backends:
                            phases["baseline"] = run_phase("baseline", config)
                        phases["baseline"]["postgres_cpu_seconds"] = backends.seconds
    return summarise(scenario, phases, server_version)


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median wall time, with every sample's wall time attached."""
    ordered = sorted(samples, key=lambda s: s["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["samples_seconds"] = [round(s["seconds"], 3) for s in samples]
    chosen["samples_peak_rss_mb"] = [round(s["peak_rss_mb"], 1) for s in samples]
    return chosen


def measured_sync(
    conn: psycopg.Connection, config: dict[str, Any], profile: Path | None = None
) -> dict[str, Any]:
    before = table_writes(conn)
    with BackendCpu(conn.info.dbname) as backends:
        result = run_phase("sync", {**config, "profile": str(profile) if profile else None})
    result["postgres_cpu_seconds"] = backends.seconds
    # The sync's backends have exited, which flushes their statistics; wait until the
    # cumulative counters stop moving to be sure we read them after the flush.
    after = settled_table_writes(conn)
    result["rows_written"] = {t: after[t] - before[t] for t in TABLES}
    return result


LOAD_FLOOR_TABLES = ("images", "image_disks", "image_events")


def create_load_floor(conn: psycopg.Connection) -> None:
    """Empty copies of the three tables in schema ``load_floor``: the same columns,
    defaults, keys, checks and indexes (``LIKE ... INCLUDING ALL``) and the same foreign
    keys (disks and events to their image, events to their run)."""
    conn.execute("DROP SCHEMA IF EXISTS load_floor CASCADE")
    conn.execute("CREATE SCHEMA load_floor")
    for table in LOAD_FLOOR_TABLES:
        conn.execute(f"CREATE TABLE load_floor.{table} (LIKE inventory.{table} INCLUDING ALL)")
    conn.execute(
        "ALTER TABLE load_floor.image_disks ADD FOREIGN KEY (region_id, image_id)"
        " REFERENCES load_floor.images ON DELETE CASCADE"
    )
    conn.execute(
        "ALTER TABLE load_floor.image_events ADD FOREIGN KEY (sync_run_id)"
        " REFERENCES inventory.sync_runs (run_id)"
    )


def measured_load_floor(conn: psycopg.Connection, config: dict[str, Any]) -> dict[str, Any]:
    """The load floor phase on fresh empty copies; the copies are dropped afterwards (so
    the sync that follows finds the database as a fresh one)."""
    create_load_floor(conn)
    with BackendCpu(conn.info.dbname) as backends:
        result = run_phase("load_floor", config)
    result["postgres_cpu_seconds"] = backends.seconds
    result["rows_written"] = {
        t: conn.execute(f"SELECT count(*) FROM load_floor.{t}").fetchone()[0]  # type: ignore[index]
        for t in LOAD_FLOOR_TABLES
    }
    conn.execute("DROP SCHEMA load_floor CASCADE")
    conn.execute("DELETE FROM inventory.sync_runs WHERE trigger = 'bench'")
    return result


CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(entry: Path) -> float:
    """User + system CPU seconds of the process whose ``/proc/<pid>`` is ``entry``
    (raises OSError once it has exited)."""
    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after the name
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class BackendCpu:
    """CPU seconds used by the PostgreSQL backends of one database while the block runs.

    Sampled from ``/proc`` every 0.1 s (Linux only; 0 elsewhere): a backend's last tenth
    of a second before it exits can be missed, and shared work (WAL writer, checkpointer)
    is not counted, so this is a lower bound.
    """

    def __init__(self, database: str) -> None:
        self._marker = f" {database} "
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-cpu", daemon=True)

    @property
    def seconds(self) -> float:
        return sum(self._last[pid] - self._first.get(pid, 0.0) for pid in self._last)

    def __enter__(self) -> BackendCpu:
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def _sample(self, *, initial: bool = False) -> None:
        proc = Path("/proc")
        if not proc.is_dir():
            return
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if not title.startswith("postgres: ") or self._marker not in title:
                    continue
                cpu = process_cpu_seconds(entry)
            except (OSError, UnicodeDecodeError, IndexError):
                continue
            pid = int(entry.name)
            if initial:
                self._first[pid] = cpu
            self._last[pid] = cpu


def run_phase(phase: str, config: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.phases", phase, json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
        env=_clean_env(),
        cwd=ROOT,  # `-m bench.phases` must find this package first, whatever the caller's cwd
    )
    if completed.returncode != 0:
        raise RuntimeError(f"phase {phase} failed ({completed.returncode}):\n{completed.stderr}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    log(f"  {phase}: {result['seconds']:.2f}s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def migrate(database_url: str) -> None:
    from service.store import migrate as migrations
    from service.store.engine import create_engine

    async def upgrade() -> None:
        engine = create_engine(database_url, pool_size=1)
        try:
            await migrations.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(upgrade())


def table_writes(conn: psycopg.Connection) -> dict[str, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables"
        " WHERE schemaname = 'inventory' AND relname = ANY(%s)",
        [list(TABLES)],
    ).fetchall()
    found = {name: int(count) for name, count in rows}
    return {t: found.get(t, 0) for t in TABLES}


def settled_table_writes(conn: psycopg.Connection, *, timeout: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    last = table_writes(conn)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = table_writes(conn)
        if current == last:
            return current
        last = current
    return last


def change_catalogue(conn: psycopg.Connection, endpoint: str, scenario: Scenario) -> dict[str, int]:
    """Change ``change_fraction`` of the catalogue: edits, offline flips, deletions, additions."""
    rng = random.Random(scenario.seed + 1)
    listed = conn.execute(
        'SELECT region_id, image_id, image_source, coalesce("offline", false)'
        " FROM inventory.images WHERE removed_at IS NULL ORDER BY region_id, image_id"
    ).fetchall()
    total = max(1, round(scenario.images * scenario.change_fraction))
    additions = total // 10
    operations: list[tuple[str, dict[str, Any]]] = []
    for i, (region, image_id, source, offline) in enumerate(rng.sample(listed, total - additions)):
        if source in OFFLINE_SOURCES and i % 3 == 0:
            op = "bring_online" if offline else "take_offline"
            operations.append((op, {"region": region, "image_id": image_id}))
        elif i % 9 == 1:
            operations.append(("delete", {"region": region, "image_id": image_id}))
        else:
            fields = {"desc": f"changed by the benchmark ({i})"}
            operations.append(
                ("modify", {"region": region, "image_id": image_id, "fields": fields})
            )
    partitions = sorted({(region, source) for region, _, source, _ in listed})
    for _ in range(additions):
        region, source = rng.choice(partitions)
        operations.append(("add", {"region": region, "source": source}))
    counts: dict[str, int] = {}
    for op, body in operations:
        request = urllib.request.Request(
            f"{endpoint}/__simulator__/catalogue/{op}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        counts[op] = counts.get(op, 0) + 1
    return counts


# --- the simulator and the database ------------------------------------------------------


@contextmanager
def simulator(scenario: Scenario, extra: Sequence[str] = ()) -> Iterator[str]:
    """The simulator as a separate process (``extra``: more of its options); yields its
    endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "service", "simulate",
        "--port", str(port),
        "--seed", str(scenario.seed),
        "--images", str(scenario.images),
        "--latency-ms", str(scenario.latency_ms),
        "--skew", f"{BIG_PARTITION}={scenario.skew}",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # It builds the whole catalogue first: ~2 minutes for 1,000,000 images on an idle
        # machine, over 3 on a busy one.
        patience = max(180.0, scenario.images / 2000)
        deadline = time.monotonic() + patience
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the simulator exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{endpoint}/__simulator__/stats", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the simulator did not answer within {patience:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]


@contextmanager
def postgres_server(url: str | None) -> Iterator[str]:
    """A server URL: the one given, the system PostgreSQL if it answers, else embedded."""
    if url:
        yield url
        return
    try:
        with psycopg.connect(SYSTEM_POSTGRES, connect_timeout=2):
            pass
    except psycopg.OperationalError:
        pass
    else:
        yield SYSTEM_POSTGRES
        return
    from service.embedded import throwaway_postgres

    with throwaway_postgres("image-sync-bench-pg-") as server:
        yield server.url


@contextmanager
def fresh_database(server_url: str, *, keep: bool = False) -> Iterator[str]:
    """A new, empty database on ``server_url``, dropped afterwards unless ``keep``."""
    from sqlalchemy.engine import make_url

    name = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = make_url(server_url).set(drivername="postgresql")
    admin_dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        if keep:
            log(f"kept database {url.render_as_string(hide_password=True)}")
        else:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point the service elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_")) and k != "DATABASE_URL"
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# --- report --------------------------------------------------------------------------------


def summarise(scenario: Scenario, phases: dict[str, Any], server_version: str) -> dict[str, Any]:
    floor = phases["floor"]["seconds"]
    load_floor = phases["load_floor"]["seconds"]
    baseline = phases.get("baseline", {}).get("seconds")
    for result in phases.values():
        result["x_floor"] = result["seconds"] / floor
        result["x_load_floor"] = result["seconds"] / load_floor
        result["baseline_speedup"] = baseline / result["seconds"] if baseline else None
    full = phases["full_sync"]
    syncs = [phases[k] for k in ("full_sync", "no_change_resync", "changed_resync")]
    peak_rss = max(
        max(s["peak_rss_mb"] for s in syncs), *full.get("samples_peak_rss_mb", [0.0])
    )  # every sync process, every repetition
    targets = {
        "full_sync_x_floor": {
            "value": full["x_floor"],
            "target": f"<= {TARGET_FLOOR_RATIO}",
            "met": full["x_floor"] <= TARGET_FLOOR_RATIO,
        },
        "full_sync_x_load_floor": {
            "value": full["x_load_floor"],
            "target": f"<= {TARGET_FLOOR_RATIO}",
            "met": full["x_load_floor"] <= TARGET_FLOOR_RATIO,
        },
        "baseline_speedup": {
            "value": full["baseline_speedup"],
            "target": f">= {TARGET_BASELINE_SPEEDUP}",
            "met": baseline is not None and full["baseline_speedup"] >= TARGET_BASELINE_SPEEDUP,
        },
        "no_change_rows_written": {
            "value": phases["no_change_resync"]["rows_written"],
            "target": "0 in each table",
            "met": not any(phases["no_change_resync"]["rows_written"].values()),
        },
        "peak_rss_mb": {
            "value": peak_rss,
            "target": f"<= {TARGET_RSS_MB}",
            "met": peak_rss <= TARGET_RSS_MB,
        },
    }
    return {
        "scenario": scenario.to_dict(),
        "repeat": len(phases["full_sync"].get("samples_seconds", [1])),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgresql": server_version,
            "platform": platform.platform(),
        },
        "phases": phases,
        "targets": targets,
        "completed": all(s["status"] == "succeeded" for s in syncs),
    }


def print_table(result: dict[str, Any]) -> None:
    s = result["scenario"]
    print(
        f"\n{s['name']}: {s['images']} images, {s['latency_ms']:g} ms latency, "
        f"concurrency {s['concurrency']}, page size {s['page_size']}, rate limit off, "
        f"{result['machine']['cpus']} CPUs, PostgreSQL {result['machine']['postgresql']}"
    )
    header = (
        f"{'phase':<18} {'wall s':>8} {'x floor':>8} {'x load floor':>13} {'x faster than baseline':>23} "
        f"{'rows written (images/disks/events)':>35} {'peak RSS MB':>12} {'CPU s (process/PG)':>19}"
    )
    print(header)
    print("-" * len(header))
    for name, p in result["phases"].items():
        rows = p.get("rows_written")
        written = "/".join(str(rows[t]) for t in TABLES) if rows else "-"
        speedup = f"{p['baseline_speedup']:.1f}" if p.get("baseline_speedup") else "-"
        cpu = f"{p['cpu_seconds']:.1f}"
        if "postgres_cpu_seconds" in p:
            cpu += f"/{p['postgres_cpu_seconds']:.1f}"
        print(
            f"{name:<18} {p['seconds']:>8.2f} {p['x_floor']:>8.2f} {p['x_load_floor']:>13.2f} "
            f"{speedup:>23} "
            f"{written:>35} {p['peak_rss_mb']:>12.0f} {cpu:>19}"
        )
    for name in ("floor", "load_floor", "full_sync"):
        samples = result["phases"][name].get("samples_seconds")
        if samples and len(samples) > 1:
            shown = ", ".join(f"{x:.2f}" for x in samples)
            print(f"{name}: median of {len(samples)} runs ({shown} s)")
    b = result["phases"].get("baseline")
    if b:
        print(
            f"baseline: {b['sampled_pages']} of {b['total_pages']} pages fetched and written in "
            f"{b['measured_seconds']:.2f}s, scaled x{b['scale']:.2f}"
        )
    print()
    if s["name"] != "full":
        print("(the targets are stated for the full scenario, `make bench`; shown for reference)")
    for name, t in result["targets"].items():
        value = t["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{'ok  ' if t['met'] else 'MISS'} {name}: {shown} (target {t['target']})")


def write_results(result: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = result["scenario"]["name"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = "" if name == "full" else f"{name}-"
    path = directory / f"{prefix}{stamp}.json"
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    path.write_text(text)
    (directory / f"latest{'' if name == 'full' else '-' + name}.json").write_text(text)
    log(f"wrote {path}")
    return path


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
