"""``image-sync simulate``: serve the simulator until SIGINT/SIGTERM.

The main CLI owns the parser; it calls :func:`add_arguments` on its ``simulate``
sub-parser and :func:`run` with the parsed namespace.

Credentials: the simulator accepts the pair in JDCLOUD_ACCESS_KEY and
JDCLOUD_SECRET_KEY, or the fixed demo pair when both are unset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator.catalogue import DEFAULT_REGIONS, DEFAULT_SOURCES, Catalogue
from service.simulator.faults import KINDS, FailFirst, Fault, FaultConfig
from service.simulator.server import admin_operations, build_app, running_simulator

__all__ = ["add_arguments", "admin_help", "faults_from_args", "run"]


def admin_help() -> str:
    """The admin operations for ``--help``, from the router of an empty simulator (so any
    route added to the simulator is listed)."""
    lines = [
        f"  {op['method']:<7} {op['path']:<34} {op['doc']}"
        for op in admin_operations(build_app(Catalogue(images=0)))
    ]
    return "admin operations (JSON, unsigned; GET /__simulator__/ lists them too):\n" + "\n".join(
        lines
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (0: any free)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the catalogue and faults")
    parser.add_argument("--images", type=int, default=2000, help="images over all partitions")
    parser.add_argument("--regions", default=",".join(DEFAULT_REGIONS), help="comma list")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma list")
    parser.add_argument(
        "--skew",
        action="append",
        default=[],
        metavar="REGION/SOURCE=WEIGHT",
        help="relative weight of a partition (default 1 each); repeatable. "
        "cn-north-1/private=13 puts ~40%% of the images there with the default partitions",
    )
    parser.add_argument(
        "--sts-lifetime",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of the temporary credentials STS assumeRole issues (default 3600); "
        "accounts and roles are added through the admin operations",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every API call")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="latency +- uniform jitter")
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="requests/second per region, 429 above"
    )
    parser.add_argument(
        "--error-rate",
        action="append",
        default=[],
        metavar="KIND=P",
        help=f"probability of a fault per request; repeatable. Kinds: {', '.join(KINDS)}",
    )
    parser.add_argument(
        "--drift", type=float, default=0.0, help="probability of an insert/delete per listing call"
    )
    parser.add_argument(
        "--fail-partition",
        action="append",
        default=[],
        metavar="REGION/SOURCE[=STATUS]",
        help="always fail this partition (default INTERNAL; a kind or an API status); repeatable",
    )
    parser.add_argument(
        "--fail-first",
        action="append",
        default=[],
        metavar="KIND=N[@REGION/SOURCE]",
        help="the first N matching requests fail with KIND; repeatable",
    )


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    """The FaultConfig the options describe; ValueError names the bad option."""
    error_rates = {}
    for item in args.error_rate:
        kind, probability = _split(item, "=", "--error-rate", "KIND=P")
        error_rates[kind] = _float(probability, "--error-rate")
    fail_partitions = {}
    for item in args.fail_partition:
        partition, _, status = item.partition("=")
        fail_partitions[partition] = status or "INTERNAL"
    fail_first = []
    for item in args.fail_first:
        spec, _, where = item.partition("@")
        kind, count = _split(spec, "=", "--fail-first", "KIND=N[@REGION/SOURCE]")
        Fault.parse(kind)
        region, _, source = where.partition("/")
        fail_first.append(FailFirst(kind, int(count), region or None, source or None))
    return FaultConfig(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        error_rates=error_rates,
        rate_limit=args.rate_limit,
        drift=args.drift,
        fail_partitions=fail_partitions,
        fail_first_n=fail_first,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad options."""
    try:
        if not 0 < args.sts_lifetime <= 86400:
            raise ValueError(f"--sts-lifetime must be within (0, 86400], got {args.sts_lifetime}")
        faults = faults_from_args(args)
        catalogue = Catalogue(seed=args.seed, images=args.images, **_catalogue_options(args))
    except ValueError as exc:
        print(f"image-sync simulate: {exc}", file=sys.stderr)
        return 2
    access_key = os.environ.get("JDCLOUD_ACCESS_KEY") or DEMO_ACCESS_KEY
    secret_key = os.environ.get("JDCLOUD_SECRET_KEY") or DEMO_SECRET_KEY
    asyncio.run(_serve(args, catalogue, faults, access_key, secret_key))
    return 0


def _catalogue_options(args: argparse.Namespace) -> dict[str, Any]:
    skew = {}
    for item in args.skew:
        partition, weight = _split(item, "=", "--skew", "REGION/SOURCE=WEIGHT")
        region, _, source = partition.partition("/")
        skew[region, source] = _float(weight, "--skew")
    return {
        "regions": [region.strip() for region in args.regions.split(",") if region.strip()],
        "sources": [source.strip() for source in args.sources.split(",") if source.strip()],
        "skew": skew,
    }


async def _serve(
    args: argparse.Namespace,
    catalogue: Catalogue,
    faults: FaultConfig,
    access_key: str,
    secret_key: str,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_simulator(
        catalogue,
        host=args.host,
        port=args.port,
        faults=faults,
        access_key=access_key,
        secret_key=secret_key,
        sts_lifetime=args.sts_lifetime,
    ) as simulator:
        print(
            f"describeImages simulator at {simulator.url} "
            f"({len(catalogue)} images, seed {args.seed}; admin at {simulator.url}/__simulator__/)",
            flush=True,
        )
        await stop.wait()


def _split(item: str, separator: str, option: str, form: str) -> tuple[str, str]:
    left, found, right = item.partition(separator)
    if not found or not left or not right:
        raise ValueError(f"{option} expects {form}, got {item!r}")
    return left, right


def _float(value: str, option: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{option}: {value!r} is not a number") from None
