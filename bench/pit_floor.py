"""The big partition's point-in-time read against its floor, taken apart.

``python -m bench.pit_floor DATABASE_URL MOMENT [--runs N]`` on a database a scale run
kept (``python -m bench --images 1000000 --history --keep-database``; its JSON has the
moments). It copies the versions the partition form returns at ``MOMENT`` into tables
of their own (as they are stored, with ``disks`` as the last column, without ``disks``),
packs them, then runs these queries ``N`` times each, alternating, and prints min,
median and max of their ``EXPLAIN (ANALYZE, BUFFERS)`` execution times:

- ``floor_scan_only``: the floor's table, ``SELECT *``, no filter: the pages are walked,
  no row is taken apart;
- ``floor_quals_only``: the same with the form's four filters (columns 1-5 deformed);
- ``form``: ``images_as_of`` with the partition's filters, as readers write it;
- ``floor``: the floor's table with the same filters into the same 31 columns;
- ``floor_disks_last``, ``floor_no_disks``: what the row's layout and width change.

The tables (``public.pit_floor_*``) are dropped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import psycopg

from bench.history import PARTITION, PERIOD, as_of_columns, copy_versions, explain, stored_columns
from bench.scenario import BIG_PARTITION

_TABLES = ("public.pit_floor_as_stored", "public.pit_floor_disks_last", "public.pit_floor_no_disks")


def breakdown(database_url: str, moment: str, runs: int) -> dict[str, dict[str, Any]]:
    """Each query's execution times (``ms``, ``runs`` rounds alternating) and the rows it
    returned (``rows``)."""
    region, source = BIG_PARTITION.split("/")
    with psycopg.connect(database_url, autocommit=True) as conn:
        columns, stored = as_of_columns(conn), stored_columns(conn)
        others = [c for c in stored if c != "disks"]
        listed, without = ", ".join(columns), ", ".join(c for c in columns if c != "disks")
        on_floor = [region, source, moment, moment]  # PARTITION, then PERIOD
        as_stored, disks_last, no_disks = _TABLES
        queries = {
            "floor_scan_only": (f"SELECT * FROM {as_stored}", []),
            "floor_quals_only": (
                f"SELECT * FROM {as_stored} WHERE {PARTITION} AND {PERIOD}",
                on_floor,
            ),
            "form": (
                f"SELECT * FROM inventory.images_as_of(%s::timestamptz) WHERE {PARTITION}",
                [moment, region, source],
            ),
            "floor": (f"SELECT {listed} FROM {as_stored} WHERE {PARTITION} AND {PERIOD}", on_floor),
            "floor_disks_last": (
                f"SELECT {listed} FROM {disks_last} WHERE {PARTITION} AND {PERIOD}",
                on_floor,
            ),
            "floor_no_disks": (
                f"SELECT {without} FROM {no_disks} WHERE {PARTITION} AND {PERIOD}",
                on_floor,
            ),
        }
        measured: dict[str, dict[str, Any]] = {name: {"ms": []} for name in queries}
        try:
            for table, order in zip(_TABLES, (stored, [*others, "disks"], others), strict=True):
                copy_versions(conn, table, order, region, source, moment)
            for _ in range(runs):
                for name, (sql, args) in queries.items():
                    explained = explain(conn, sql, args)
                    measured[name]["ms"].append(explained["ms"])
                    measured[name]["rows"] = explained["rows"]
        finally:
            for table in _TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pit_floor", description=__doc__)
    parser.add_argument("database_url", help="a database a scale run kept (--keep-database)")
    parser.add_argument("moment", help="a moment of its history, e.g. the JSON's 'latest'")
    parser.add_argument("--runs", type=int, default=8, help="rounds, alternating (default 8)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        measured = breakdown(args.database_url, args.moment, args.runs)
    except psycopg.Error as error:  # a wrong URL or moment, a database with no history
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        sys.exit(f"python -m bench.pit_floor: {message}")
    for name, q in measured.items():
        ms = q["ms"]
        print(
            f"{name:<18} min {min(ms):7.1f}  median {statistics.median(ms):7.1f}"
            f"  max {max(ms):7.1f}  ms  ({q['rows']} rows)"
        )


if __name__ == "__main__":
    main()
