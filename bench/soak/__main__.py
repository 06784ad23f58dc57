"""``python -m bench.soak``: see :mod:`bench.soak`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.run import RESULTS
from bench.soak import report
from bench.soak.run import Options, soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description="soak: churn, faults, restarts, flat resources"
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="run length (default 20)")
    parser.add_argument("--images", type=int, default=3000, help="catalogue size (default 3000)")
    parser.add_argument("--seed", type=int, default=18, help="seed of the catalogue and driver")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="resource sampling")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where JSON/SVG go")
    parser.add_argument(
        "--print", type=Path, metavar="JSON", help="print a saved report, run nothing"
    )
    args = parser.parse_args(argv)
    if args.print:
        saved = json.loads(args.print.read_text())
        report.print_table(saved)
        return 0 if saved["ok"] else 1
    if args.minutes < 1 or args.images < 100 or args.sample_seconds <= 0:
        parser.error("--minutes must be >= 1, --images >= 100, --sample-seconds > 0")
    options = Options(
        minutes=args.minutes, images=args.images, seed=args.seed, sample_s=args.sample_seconds
    )
    started = time.time()
    result = asyncio.run(soak(options))
    result["started_at"] = started
    report.print_table(result)
    report.write(result, args.results_dir)
    return 0 if result["ok"] else 1


raise SystemExit(main())
