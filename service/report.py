"""Human-readable reports from the database: ``image-sync status`` and the demo summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from service.store import status
from service.store.engine import Engine, connect
from service.store.feed import subscriber_statuses


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    # A success recorded while the clock read the age (or a clock a little behind the
    # database's) gives a tiny negative age: show 0s, never "-0s".
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


RUN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, RunRow field, where: "all" widths, "wide" only, "narrow" only)
    ("run", "run_id", "all"),
    ("started", "started_at", "all"),
    ("status", "status", "all"),
    ("trigger", "trigger", "all"),
    ("host", "host", "wide"),
    ("parts", "partitions", "all"),
    ("failed", "partitions_failed", "all"),
    ("requests", "api_requests", "wide"),
    ("retries", "retries", "wide"),
    ("seen", "images_seen", "all"),
    ("events", "events", "narrow"),
    ("created", "created", "wide"),
    ("updated", "updated", "wide"),
    ("offline", "went_offline", "wide"),
    ("online", "came_online", "wide"),
    ("removed", "removed", "wide"),
    ("back", "reappeared", "wide"),
)
WIDE_CONSOLE = 140
"""Columns from which ``image-sync status`` shows every run column; narrower consoles
(80 columns, a phone's terminal) get the essential ones, and long errors wrap."""
STATUS_JSON_KEYS = {
    "partitions": (
        "region_id",
        "image_source",
        "last_status",
        "last_success_at",
        "age_seconds",
        "last_error_status",
        "last_error_message",
        "configured",
        "account",
    ),
    "runs": (*(column for _, column, _ in RUN_COLUMNS), "finished_at", "error_message"),
}
"""The keys of ``image-sync status --json`` (documented in README.md; stable)."""


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


async def status_document(engine: Engine, *, runs: int = 10) -> dict[str, Any]:
    """``image-sync status --json``: the configured partitions' health and recent runs."""
    health, recent = await status.status_tables(engine, runs)
    return {
        "partitions": [
            {k: _json_value(getattr(r, k)) for k in STATUS_JSON_KEYS["partitions"]} for r in health
        ],
        "runs": [{k: _json_value(getattr(r, k)) for k in STATUS_JSON_KEYS["runs"]} for r in recent],
    }


async def print_status(engine: Engine, *, runs: int = 10, console: Console | None = None) -> None:
    console = console or Console()
    health_rows, run_rows = await status.status_tables(engine, runs)
    wide = console.width >= WIDE_CONSOLE
    health = Table(title="Partition health", title_justify="left", box=box.SIMPLE_HEAD)
    health.add_column("partition", no_wrap=True)
    health.add_column("last", no_wrap=True)
    if wide:
        health.add_column("last success", no_wrap=True)
    health.add_column("age", justify="right", no_wrap=True)
    health.add_column("error", overflow="fold")
    # Partitions name their account once there are several (the one-account form's
    # table stays as it was).
    named = len({r.account for r in health_rows if r.account}) > 1
    for r in health_rows:
        error = f"{r.last_error_status}: {r.last_error_message}" if r.last_error_status else ""
        success = r.last_success_at.isoformat(timespec="seconds") if r.last_success_at else "never"
        where = f"{r.region_id}/{r.image_source}"
        if named and r.account:
            where = f"{r.account}:{where}"
        cells = [where, r.last_status or "not synced"]
        if wide:
            cells.append(success)
        health.add_row(*cells, _age(r.age_seconds), error)
    console.print(health)

    table = Table(title=f"Last {runs} runs", title_justify="left", box=box.SIMPLE_HEAD)
    shown = [
        (h, c) for h, c, where in RUN_COLUMNS if where in ("all", "wide" if wide else "narrow")
    ]
    for header, column in shown:
        table.add_column(
            header,
            justify="left" if column in ("status", "trigger", "host", "started_at") else "right",
            no_wrap=column != "host",
        )
    for run in run_rows:
        table.add_row(*(_run_cell(run, column, wide) for _, column in shown))
    console.print(table)
    await _print_webhooks(engine, console)


def _run_cell(row: status.RunRow, column: str, wide: bool) -> str:
    value = getattr(row, column)
    if column == "started_at":
        return str(value.isoformat(timespec="seconds") if wide else value.strftime("%m-%d %H:%M"))
    return str(value)


async def _print_webhooks(engine: Engine, console: Console) -> None:
    """Webhook subscribers, when any are stored: failing ones first catch the eye."""
    async with connect(engine, "cannot read the webhook subscribers") as conn:
        statuses = await subscriber_statuses(conn)
    if not statuses:
        return
    table = Table(title="Webhook subscribers", title_justify="left")
    for column in ("subscriber", "state", "lag", "age", "last delivery", "error"):
        table.add_column(column, justify="right" if column in ("lag", "age") else "left")
    for w in statuses:
        st = w.state
        table.add_row(
            st.subscriber,
            "[red]failing[/red]" if st.failing else "ok",
            str(w.lag.events),
            _age(w.lag.seconds),
            st.delivered_at.isoformat(timespec="seconds") if st.delivered_at else "never",
            st.last_error or "",
        )
    console.print(table)
