"""``image-sync changes``: the change feed on a terminal or as JSON lines.

Reads ``inventory.changes_since()`` from a cursor (``--cursor N``, or the first commit
of the last ``--since`` DURATION), filters by type, region and source, and prints a
table on a TTY (80 columns) or one JSON object per line otherwise (each the event's
``image_events`` columns plus ``cursor``, as webhooks send them). ``--follow`` then
waits on ``NOTIFY inventory_changes`` and prints each commit as it happens, until
SIGINT/SIGTERM (exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from service.store import feed
from service.store.engine import Engine, connect
from service.store.feed import Change

PAGE = 500
"""Events read per call of changes_since."""
FOLLOW_POLL = 30.0
"""Seconds: --follow also reads the feed this often, should a notification be lost."""

_DURATION = re.compile(r"^(\d{1,9})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``2d``, ``1w``; ValueError otherwise."""
    match = _DURATION.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 1h, 2d or 1w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True, slots=True)
class ChangesQuery:
    """What ``image-sync changes`` prints: where to start, filters, the output form."""

    cursor: int | None = None
    since: timedelta = timedelta(hours=1)
    types: frozenset[str] = frozenset()
    regions: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    follow: bool = False
    as_json: bool = False

    def wants(self, change: Change) -> bool:
        return (
            (not self.types or change.event_type in self.types)
            and (not self.regions or change.region_id in self.regions)
            and (not self.sources or change.image_source in self.sources)
        )


class _Printer:
    def __init__(self, query: ChangesQuery) -> None:
        self.query = query
        self.console = Console(width=80, highlight=False)

    def show(self, changes: Sequence[Change]) -> None:
        wanted = [c for c in changes if self.query.wants(c)]
        if not wanted:
            return
        if self.query.as_json:
            for change in wanted:
                sys.stdout.write(json.dumps(change.payload(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return
        table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
        for column in ("cursor", "UTC", "type", "region", "source", "image"):
            table.add_column(column, no_wrap=True)
        table.add_column("fields", overflow="fold")
        for c in wanted:
            fields = c.document.get("changed_fields") or []
            table.add_row(
                str(c.cursor),
                c.committed_at.astimezone(UTC).strftime("%H:%M:%S"),
                c.event_type,
                c.region_id,
                c.image_source,
                c.image_id,
                ",".join(fields),
            )
        self.console.print(table)


async def print_changes(engine: Engine, query: ChangesQuery) -> int:
    """Print the feed from the query's start; with ``follow``, keep printing until a
    signal (or the reader of the output goes away: ``| head``). Returns the exit code."""
    try:
        return await _print_changes(engine, query)
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _print_changes(engine: Engine, query: ChangesQuery) -> int:
    printer = _Printer(query)
    async with connect(engine) as conn:
        if query.cursor is not None:
            cursor = query.cursor
        else:
            cursor = await feed.cursor_at(conn, datetime.now(UTC) - query.since)
        await conn.rollback()
    if not query.follow:
        await _print_after(engine, cursor, printer)
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with feed.listen(engine) as queue:
            while not stop.is_set():
                cursor = await _print_after(engine, cursor, printer)
                await _next_notification(queue, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0


async def _print_after(engine: Engine, cursor: int, printer: _Printer) -> int:
    """Print every event after ``cursor``; the new cursor."""
    async with connect(engine) as conn:
        while page := await feed.read_changes(conn, cursor, PAGE):
            printer.show(page)
            cursor = page[-1].cursor
            await conn.rollback()  # a fresh snapshot for the next page
    return cursor


async def _next_notification(queue: asyncio.Queue[Any], stop: asyncio.Event) -> None:
    """Wait for a NOTIFY (or the poll interval, or the stop signal); drain the queue."""
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, timeout=FOLLOW_POLL, return_when="FIRST_COMPLETED")
    finally:
        for task in (getter, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    while not queue.empty():
        queue.get_nowait()
