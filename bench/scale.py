"""``python -m bench --images N`` / ``make bench-scale``: the sync at catalogue sizes.

For each size: the simulator without latency (one partition holding ~40% of the images,
as in ``make bench``), a fresh database, then in subprocesses the load floor, the full
sync and a no-change resync. Reported per size: wall time, CPU per image of the sync
process, of the database's PostgreSQL backends and of the simulator (the API side, on
the same cores), peak RSS of each sync process, and
the database's bytes per image (``pg_total_relation_size`` of each table over the
images). With ``--history`` the last size also gets a synthesised history and the
point-in-time reads are timed on it (:mod:`bench.history`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.run import (
    SYSTEM_POSTGRES,
    TARGET_FLOOR_RATIO,
    TARGET_RSS_MB,
    fresh_database,
    log,
    measured_load_floor,
    measured_sync,
    migrate,
    postgres_server,
    process_cpu_seconds,
    simulator,
)
from bench.scenario import Scenario

SCALE_SIZES = (10_000, 100_000, 1_000_000)
TARGET_CPU_GROWTH = 1.2
"""CPU per image at the largest size within this factor of the 100,000-image one."""

SIZE_TABLES = ("images", "image_disks", "image_events", "image_versions", "change_batches")


def scale_scenario(images: int) -> Scenario:
    return Scenario(f"scale-{images}", images=images, latency_ms=0, skew=13)


def run_scale(
    sizes: tuple[int, ...],
    *,
    server_url: str | None = None,
    history: bool = False,
    load_floor: bool = True,
    keep_database: bool = False,
) -> dict[str, Any]:
    """Every size in turn (one simulator and one database each; with ``keep_database``
    the largest size's database is left on the server)."""
    results: dict[str, Any] = {"sizes": {}, "load": os.getloadavg()}
    with postgres_server(server_url) as server:
        if keep_database and server_url is None and server != SYSTEM_POSTGRES:
            log(
                "--keep-database ignored: the embedded server is removed at the end (use --database-url)"
            )
            keep_database = False
        for images in sizes:
            largest = images == sizes[-1]
            results["sizes"][str(images)] = run_size(
                scale_scenario(images),
                server,
                history=history and largest,
                load_floor=load_floor,
                keep_database=keep_database and largest,
            )
    results["load_after"] = os.getloadavg()
    results["targets"] = scale_targets(results["sizes"])
    return results


def simulator_cpu(endpoint: str) -> Callable[[], float]:
    """A reader of the CPU seconds the simulator serving ``endpoint`` has used so far
    (found by its ``--port`` in ``/proc``; Linux only, 0 elsewhere or if not found)."""
    port = endpoint.rsplit(":", 1)[1]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"simulate" in args and _option(args, b"--port") == port.encode():
            return lambda: _cpu_seconds(entry)
    return lambda: 0.0


def _option(args: list[bytes], name: bytes) -> bytes | None:
    """The value after option ``name`` in a command line, if it has one."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def _cpu_seconds(entry: Path) -> float:
    try:
        return process_cpu_seconds(entry)
    except OSError:  # it has exited
        return 0.0


def run_size(
    scenario: Scenario, server: str, *, history: bool, load_floor: bool, keep_database: bool
) -> dict[str, Any]:
    log(f"scale: {scenario.images} images, no latency")
    size: dict[str, Any] = {"images": scenario.images}
    with (
        fresh_database(server, keep=keep_database) as database_url,
        simulator(scenario) as endpoint,
    ):
        config = {
            "endpoint": endpoint,
            "database_url": database_url,
            "scenario": scenario.to_dict(),
        }
        api_cpu = simulator_cpu(endpoint)
        if keep_database:  # its name, to query it afterwards (bench.pit_floor)
            size["kept_database"] = make_url(database_url).database
        with psycopg.connect(database_url, autocommit=True) as conn:
            size["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            migrate(database_url)
            if load_floor:
                log("  load floor")
                before = api_cpu()
                size["load_floor"] = measured_load_floor(conn, config)
                size["load_floor"]["simulator_cpu_seconds"] = api_cpu() - before
            for name, title in (
                ("full_sync", "full sync"),
                ("no_change_resync", "no-change resync"),
            ):
                log(f"  {title}")
                before = api_cpu()
                size[name] = measured_sync(conn, config)
                size[name]["simulator_cpu_seconds"] = api_cpu() - before
            size["bytes_per_image"] = bytes_per_image(conn, scenario.images)
            for name in ("load_floor", "full_sync", "no_change_resync"):
                phase = size.get(name)
                if phase:
                    phase["cpu_us_per_image"] = 1e6 * phase["cpu_seconds"] / scenario.images
                    phase["postgres_cpu_us_per_image"] = (
                        1e6 * phase["postgres_cpu_seconds"] / scenario.images
                    )
                    phase["simulator_cpu_us_per_image"] = (
                        1e6 * phase["simulator_cpu_seconds"] / scenario.images
                    )
            if load_floor:
                size["full_sync"]["x_load_floor"] = (
                    size["full_sync"]["seconds"] / size["load_floor"]["seconds"]
                )
            if history:
                from bench.history import measure_history

                size["history"] = measure_history(conn, database_url)
    return size


def bytes_per_image(conn: psycopg.Connection, images: int) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for table in SIZE_TABLES:
        found = conn.execute("SELECT to_regclass(%s)", [f"inventory.{table}"]).fetchone()
        if found and found[0]:
            name = f"inventory.{table}"
            total = conn.execute(  # a partitioned table's size is its partitions'
                "SELECT coalesce((SELECT sum(pg_total_relation_size(relid))::bigint"
                " FROM pg_partition_tree(%s)), pg_total_relation_size(%s))",
                [name, name],
            ).fetchone()[0]  # type: ignore[index]
            sizes[table] = total / images
    sizes["total"] = sum(sizes.values())
    return sizes


def scale_targets(sizes: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    rss = {
        f"{n}/{phase}": s[phase]["peak_rss_mb"]
        for n, s in sizes.items()
        for phase in ("full_sync", "no_change_resync")
    }
    largest = max(sizes, key=int)
    targets["peak_rss_mb_largest"] = {
        "value": max(rss[f"{largest}/{p}"] for p in ("full_sync", "no_change_resync")),
        "target": f"<= {TARGET_RSS_MB}",
    }
    if "100000" in sizes and largest != "100000":

        def per_image(n: str) -> float:
            p = sizes[n]["full_sync"]
            return float(p["cpu_us_per_image"] + p["postgres_cpu_us_per_image"])

        targets["cpu_per_image_growth"] = {
            "value": per_image(largest) / per_image("100000"),
            "target": f"<= {TARGET_CPU_GROWTH}",
        }
    for n, s in sizes.items():
        if "x_load_floor" in s["full_sync"]:
            targets[f"full_sync_x_load_floor_{n}"] = {
                "value": s["full_sync"]["x_load_floor"],
                "target": f"<= {TARGET_FLOOR_RATIO}",
            }
    for t in targets.values():
        limit = float(t["target"].split()[-1])
        t["met"] = t["value"] <= limit
    return targets


def print_scale(result: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.1f}" for x in result["load"])
    print(f"\nscale: simulator without latency, 1-minute/5/15 load average at start {load}")
    header = (
        f"{'images':>9} {'phase':<17} {'wall s':>8} {'x load fl':>9} {'CPU us/img':>16} "
        f"{'peak RSS MB':>11} {'rows (img/disk/ev)':>22}"
    )
    print(header)
    print("-" * len(header))
    for n, size in result["sizes"].items():
        for name in ("load_floor", "full_sync", "no_change_resync"):
            p = size.get(name)
            if not p:
                continue
            rows = p.get("rows_written") or {}
            written = "/".join(str(v) for v in rows.values()) if rows else "-"
            cpu = f"{p['cpu_us_per_image']:.0f}/{p['postgres_cpu_us_per_image']:.0f}"
            if "simulator_cpu_us_per_image" in p:  # absent in results written before it
                cpu += f"/{p['simulator_cpu_us_per_image']:.0f}"
            ratio = f"{p['x_load_floor']:.2f}" if "x_load_floor" in p else "-"
            print(
                f"{int(n):>9} {name:<17} {p['seconds']:>8.2f} {ratio:>9} {cpu:>16} "
                f"{p['peak_rss_mb']:>11.0f} {written:>22}"
            )
        b = size["bytes_per_image"]
        shown = ", ".join(f"{t} {v:.0f}" for t, v in b.items())
        print(f"{'':>9} database bytes per image: {shown}")
    print("(CPU us/img: the sync process / the PostgreSQL backends / the simulator, per image)")
    for name, t in result["targets"].items():
        print(f"{'ok  ' if t['met'] else 'MISS'} {name}: {t['value']:.2f} (target {t['target']})")
    for n, size in result["sizes"].items():
        if "history" in size:
            from bench.history import print_history

            print_history(int(n), size["history"])
