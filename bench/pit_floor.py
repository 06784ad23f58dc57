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
import re
import statistics
import sys
from typing import Any

import psycopg

from bench.history import as_of_columns
from bench.scenario import BIG_PARTITION

_TABLES = ("pit_floor_as_stored", "pit_floor_disks_last", "pit_floor_no_disks")
_ROWS = re.compile(r"actual [^)]*rows=(\d+)")


def breakdown(database_url: str, moment: str, runs: int) -> dict[str, dict[str, Any]]:
    """Each query's execution times (``ms``, ``runs`` rounds alternating) and the rows it
    returned (``rows``)."""
    region, source = BIG_PARTITION.split("/")
    with psycopg.connect(database_url, autocommit=True) as conn:
        # As PostgreSQL reads it back: a valid moment, safe to write into the queries.
        moment = conn.execute("SELECT CAST(%s AS timestamptz)::text", [moment]).fetchone()[0]  # type: ignore[index]
        columns = as_of_columns(conn)
        stored = [
            row[0]
            for row in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'inventory.image_versions'"
                "::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            )
        ]
        others = [c for c in stored if c != "disks"]
        where = f"region_id = '{region}' AND image_source = '{source}'"
        period = f"valid_to > '{moment}'::timestamptz AND valid_from <= '{moment}'::timestamptz"
        listed, without = ", ".join(columns), ", ".join(c for c in columns if c != "disks")
        queries = {
            "floor_scan_only": "SELECT * FROM public.pit_floor_as_stored",
            "floor_quals_only": f"SELECT * FROM public.pit_floor_as_stored WHERE {where} AND {period}",
            "form": f"SELECT * FROM inventory.images_as_of('{moment}'::timestamptz) WHERE {where}",
            "floor": f"SELECT {listed} FROM public.pit_floor_as_stored WHERE {where} AND {period}",
            "floor_disks_last": f"SELECT {listed} FROM public.pit_floor_disks_last"
            f" WHERE {where} AND {period}",
            "floor_no_disks": f"SELECT {without} FROM public.pit_floor_no_disks"
            f" WHERE {where} AND {period}",
        }
        measured: dict[str, dict[str, Any]] = {name: {"ms": []} for name in queries}
        try:
            for table, order in zip(_TABLES, (stored, [*others, "disks"], others), strict=True):
                conn.execute(f"DROP TABLE IF EXISTS public.{table}")
                conn.execute(
                    f"CREATE TABLE public.{table} AS SELECT {', '.join(order)}"
                    f" FROM inventory.image_versions WHERE {where} AND {period}"
                )
                conn.execute(f"VACUUM ANALYZE public.{table}")
            for _ in range(runs):
                for name, sql in queries.items():
                    plan = [r[0] for r in conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")]
                    measured[name]["ms"].append(
                        float(plan[-1].split("Execution Time:")[1].split()[0])
                    )
                    measured[name]["rows"] = int(_ROWS.search(plan[0]).group(1))  # type: ignore[union-attr]
        finally:
            for table in _TABLES:
                conn.execute(f"DROP TABLE IF EXISTS public.{table}")
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
