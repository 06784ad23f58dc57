"""``image-sync``: the command line. Parses, builds settings, calls one function, exits.

Exit codes: 0 success; 1 a sync failed or was incomplete, or a runtime failure
(database unreachable, credentials refused, invariants broken); 2 bad configuration
or usage. Expected failures print one line on stderr, never a traceback.

Each command's handler imports the modules of that command when it runs (the only
function-local imports of the package, tests/test_architecture.py): ``--help``, a
configuration error or ``status`` do not pay for the daemon's imports (about 0.2 s
against 3 s or more on a loaded 2-core machine), and only ``simulate`` and ``demo``
load the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

from service import __version__
from service.config import FILE_VARIABLES, SOURCES, VARIABLES, Settings, load_settings, region_id
from service.dburl import parse_database_url
from service.errors import AuthError, ConfigError, DatabaseError, ImageSyncError
from service.logs import setup_logging
from service.vocabulary import EVENT_TYPES

log = logging.getLogger("service.cli")

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

_ENV_HELP = (
    "environment variables (a --config TOML file may set the same keys):\n  "
    + "\n  ".join(VARIABLES)
    + f"\n{', '.join(FILE_VARIABLES)} may be read from a file named by <NAME>_FILE instead."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-sync",
        description="Keep a PostgreSQL copy of JD Cloud's VM image catalogue (describeImages) "
        "and a history of its changes.",
        epilog=_ENV_HELP + "\n\nDocs: README.md, docs/operations.md, docs/schema.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"image-sync {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with settings (env wins) and [[accounts]]; default IMAGE_SYNC_CONFIG",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_sync_commands(sub)
    _add_reading_commands(sub)
    _add_demo_commands(sub)
    return parser


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_sync_commands(sub: Subparsers) -> None:
    """sync, run, migrate: the commands that write."""
    p = sub.add_parser("sync", help="run one sync (--once) and exit 0 (all good) or 1")
    p.add_argument("--once", action="store_true", required=True, help="one run, then exit")
    p.add_argument(
        "--region",
        action="append",
        metavar="R",
        type=_region_argument,
        help="only this region (repeatable)",
    )
    p.add_argument(
        "--source",
        action="append",
        metavar="S",
        choices=SOURCES,
        help="only this source (repeatable)",
    )
    p.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    p.set_defaults(handler=_sync)

    p = sub.add_parser("run", help="the daemon: scheduled syncs and the status server")
    p.add_argument("--migrate", action="store_true", help="apply pending migrations at start")
    p.set_defaults(handler=_run)

    p = sub.add_parser("migrate", help="upgrade the database schema to head")
    p.set_defaults(handler=_migrate)


def _add_reading_commands(sub: Subparsers) -> None:
    """status, changes, check, schema-doc: the commands that only read."""
    p = sub.add_parser("status", help="partition health and recent runs as a table")
    p.add_argument(
        "--runs", type=_count_argument, default=10, help="how many recent runs to show (>= 0)"
    )
    p.add_argument("--json", action="store_true", help="one JSON document (keys: README.md)")
    p.set_defaults(handler=_status)

    p = sub.add_parser(
        "changes",
        help="the change feed: events in commit order (a table on a TTY, else JSON lines)",
        description="Print image events in commit order from the change feed "
        "(inventory.changes_since). Default start: the commits of the last hour.",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--since",
        type=_duration_argument,
        metavar="DURATION",
        help="events committed in the last DURATION: 30s, 15m, 1h (default), 2d, 1w",
    )
    start.add_argument(
        "--cursor", type=_cursor_argument, metavar="N", help="events after feed cursor N (0: all)"
    )
    p.add_argument("--follow", action="store_true", help="keep printing commits as they happen")
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p.add_argument("--type", action="append", metavar="T", choices=EVENT_TYPES,
                   help="only this event type (repeatable)")  # fmt: skip
    p.add_argument("--region", action="append", metavar="R", type=_region_argument,
                   help="only this region (repeatable)")  # fmt: skip
    p.add_argument("--source", action="append", metavar="S", choices=SOURCES,
                   help="only this source (repeatable)")  # fmt: skip
    p.set_defaults(handler=_changes)

    p = sub.add_parser("check", help="verify the database invariants; exit 1 on any failure")
    p.add_argument("--json", action="store_true", help='{"ok": bool, "problems": [...]}')
    p.set_defaults(handler=_check)

    p = sub.add_parser("schema-doc", help="write docs/schema.md from the live database comments")
    p.add_argument(
        "--output", type=Path, default=Path("docs/schema.md"), help="file, or - for stdout"
    )
    p.set_defaults(handler=_schema_doc)


def _add_demo_commands(sub: Subparsers) -> None:
    """simulate, demo: the commands that run the simulator."""
    # Options of `simulate` belong to the simulator (see simulate_parser); listed here for help.
    sub.add_parser(
        "simulate", help="serve the describeImages simulator until stopped", add_help=False
    )

    p = sub.add_parser(
        "demo",
        help="simulator + embedded PostgreSQL: sync, change the catalogue, sync, show history",
    )
    p.add_argument("--images", type=int, default=2000, help="simulated catalogue size")
    p.add_argument("--seed", type=int, default=7, help="catalogue seed")
    p.set_defaults(handler=_demo)


def simulate_parser() -> argparse.ArgumentParser:
    """``image-sync simulate``: imported only for that command (production code never
    imports the simulator)."""
    from service.simulator import cli as simulator_cli

    parser = argparse.ArgumentParser(
        prog="image-sync simulate",
        description="Serve the describeImages simulator until SIGINT/SIGTERM. It accepts the key "
        "pair in JDCLOUD_ACCESS_KEY/JDCLOUD_SECRET_KEY, or the fixed demo pair when unset.",
        epilog=simulator_cli.admin_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    simulator_cli.add_arguments(parser)
    parser.set_defaults(run=simulator_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        sim_args = simulate_parser().parse_args(argv[1:])
        return int(sim_args.run(sim_args))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if args.command == "demo":
            # The demo brings its own simulator and throwaway embedded database.
            overrides = {"endpoint": "http://127.0.0.1:1", "database_url": ""}
        needs_api = args.command in ("sync", "run", "demo")
        settings = load_settings(
            os.environ, args.config, needs_api=needs_api, warn=_warn, **overrides
        )
    except ConfigError as exc:
        print(f"image-sync: configuration error: {exc}", file=sys.stderr)
        return 2
    secrets = settings.secret_values()
    if settings.database_url:
        # The password however given: user-info, ?password=, or inside DATABASE_URL_FILE.
        secrets.append(parse_database_url(settings.database_url.get_secret_value()).password)
    if settings.webhook_secret:
        secrets.append(settings.webhook_secret.get_secret_value())
    secrets += [h.secret.get_secret_value() for h in settings.webhooks if h.secret]
    redactor = setup_logging(
        log_format=settings.log_format, level=settings.log_level, secrets=secrets
    )
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args, settings))
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"image-sync: configuration error: {exc}", file=sys.stderr)
        return 2
    except AuthError as exc:
        refused = exc.by_account or {}
        if len(refused) <= 1 and not settings.accounts:
            refused = {"": exc}
        for account, error in refused.items():
            where = "check JDCLOUD_ACCESS_KEY and JDCLOUD_SECRET_KEY"
            if settings.accounts:
                where = f"check the credentials of account {account} ([[accounts]])"
            print(
                redactor.redact(f"image-sync: the API refused the credentials ({error}); {where}"),
                file=sys.stderr,
            )
        return 1
    except DatabaseError as exc:
        print(redactor.redact(f"image-sync: database: {exc}"), file=sys.stderr)
        return 1
    except ImageSyncError as exc:
        print(redactor.redact(f"image-sync: {exc}"), file=sys.stderr)
        return 1


def _count_argument(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative; give 0 or more")
    return count


def _warn(line: str) -> None:
    print(f"image-sync: warning: {line}", file=sys.stderr)


def _duration_argument(value: str) -> timedelta:
    from service.changes import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cursor_argument(value: str) -> int:
    if not value.isdigit() or len(value) > 19 or int(value) >= 2**63:
        raise argparse.ArgumentTypeError(f"{value!r} is not a feed cursor (0 or more)")
    return int(value)


def _region_argument(value: str) -> str:
    try:
        return region_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _sync(args: argparse.Namespace, settings: Settings) -> int:
    from service.app import open_runtime
    from service.progress import progress_for_terminal
    from service.sync import sync_once

    async with open_runtime(settings, apply_migrations=args.migrate) as rt:
        partitions = rt.partitions(args.region, args.source)
        if not args.region and not args.source:
            # The configured partitions; a --region/--source run is a one-off and leaves
            # the registry (what health shows) alone.
            await rt.register(partitions)
        with progress_for_terminal(partitions) as progress:
            report = await sync_once(
                rt.database.engine,
                rt.client,
                partitions,
                page_size=settings.page_size,
                trigger="cli",
                metrics=rt.metrics,
                progress=progress,
                accounts=rt.accounts,
            )
    bad = [p for p in report.partitions if p.status in ("failed", "incomplete")]
    synced = sum(p.status == "succeeded" for p in report.partitions)
    locked = sum(p.status == "skipped_locked" for p in report.partitions)
    # skipped_locked partitions were synced by another process, not by this run.
    skipped = f", {locked} skipped_locked (another process held them)" if locked else ""
    print(
        f"run {report.run_id} {report.status} in {report.seconds:.1f}s: "
        f"{synced}/{len(report.partitions)} partitions synced{skipped}, "
        f"{report.total('images_seen')} images seen, {report.total('created')} created, "
        f"{report.total('updated')} updated, {report.total('went_offline')} went offline, "
        f"{report.total('came_online')} came online, {report.total('removed')} removed, "
        f"{report.total('reappeared')} reappeared"
    )
    for p in bad:
        print(f"  {p.partition}: {p.status}: {p.error_status}: {p.error_message}", file=sys.stderr)
    return 0 if report.ok else 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from service.app import run_daemon

    return await run_daemon(settings, apply_migrations=args.migrate)


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.store import migrate
    from service.store.engine import open_database

    async with open_database(settings, pool_size=1) as database:
        before = await migrate.current_revision(database.engine)
        await migrate.upgrade(database.engine)
        after = await migrate.current_revision(database.engine)
    print(f"schema at {after} (was {before or 'empty'}) in {database.display_url}")
    return 0


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from service.report import print_status, status_document
    from service.store import migrate
    from service.store.engine import open_database

    async with open_database(settings, pool_size=1) as database:
        await migrate.ensure_current(database.engine)
        if args.json:
            document = await status_document(database.engine, runs=args.runs)
            print(json.dumps(document, indent=2))
        else:
            await print_status(database.engine, runs=args.runs)
    return 0


async def _changes(args: argparse.Namespace, settings: Settings) -> int:
    from service.changes import ChangesQuery, print_changes
    from service.store import migrate
    from service.store.engine import open_database

    query = ChangesQuery(
        cursor=args.cursor,
        since=args.since or timedelta(hours=1),
        types=frozenset(args.type or ()),
        regions=frozenset(args.region or ()),
        sources=frozenset(args.source or ()),
        follow=args.follow,
        as_json=args.json or not sys.stdout.isatty(),
    )
    async with open_database(settings, pool_size=2) as database:
        await migrate.ensure_current(database.engine)
        return await print_changes(database.engine, query)


async def _check(args: argparse.Namespace, settings: Settings) -> int:
    from service.check import check_invariants
    from service.store import migrate
    from service.store.engine import open_database

    async with open_database(settings, pool_size=1) as database:
        await migrate.ensure_current(database.engine)
        problems = await check_invariants(database.engine)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
        return 1 if problems else 0
    if problems:
        print(f"{len(problems)} invariant(s) broken:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("all invariants hold")
    return 0


async def _schema_doc(args: argparse.Namespace, settings: Settings) -> int:
    from service.schema_doc import render_schema_doc
    from service.store import migrate
    from service.store.engine import open_database

    async with open_database(settings, pool_size=1) as database:
        await migrate.ensure_current(database.engine)
        text = await render_schema_doc(database.engine)
    if str(args.output) == "-":
        sys.stdout.write(text)
    else:
        try:
            args.output.write_text(text, encoding="utf-8")
        except OSError as exc:  # e.g. run outside the repository: no docs/ here
            raise ConfigError(
                "--output", f"cannot write {args.output}: {exc.strerror or exc} (use --output -)"
            ) from exc
        print(f"wrote {args.output}")
    return 0


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from service.demo import run_demo

    return await run_demo(settings, images=args.images, seed=args.seed)
