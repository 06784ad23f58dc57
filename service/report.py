"""Human-readable reports from the database: ``image-sync status`` and the demo summary."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.feed import subscriber_statuses

HEALTH_SQL = """
SELECT region_id, image_source, last_status, last_success_at, age_seconds,
       last_error_status, last_error_message
  FROM inventory.sync_health ORDER BY region_id, image_source
"""
RUNS_SQL = """
SELECT run_id, started_at, finished_at, status, trigger, host, partitions, partitions_failed,
       api_requests, retries, images_seen, created, updated, went_offline, came_online,
       removed, reappeared
  FROM inventory.sync_runs ORDER BY run_id DESC LIMIT :n
"""
SUMMARY_SQL = """
SELECT region_id, image_source, sum(images)::bigint AS images,
       coalesce(sum(images) FILTER (WHERE offline), 0)::bigint AS offline
  FROM inventory.inventory_summary GROUP BY region_id, image_source ORDER BY 1, 2
"""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


async def fetch(engine: AsyncEngine, sql: str, **params: Any) -> list[sa.Row[Any]]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text(sql), params)).all())


async def print_status(
    engine: AsyncEngine, *, runs: int = 10, console: Console | None = None
) -> None:
    console = console or Console()
    health = Table(title="Partition health", title_justify="left")
    for column in ("region", "source", "last outcome", "last success", "age", "error"):
        health.add_column(column)
    for r in await fetch(engine, HEALTH_SQL):
        error = f"{r.last_error_status}: {r.last_error_message}" if r.last_error_status else ""
        success = r.last_success_at.isoformat(timespec="seconds") if r.last_success_at else "never"
        health.add_row(
            r.region_id, r.image_source, r.last_status, success, _age(r.age_seconds), error
        )
    console.print(health)

    table = Table(title=f"Last {runs} runs", title_justify="left")
    for column in (
        "run",
        "started",
        "status",
        "trigger",
        "host",
        "partitions",
        "failed",
        "requests",
        "retries",
        "seen",
        "created",
        "updated",
        "offline",
        "online",
        "removed",
        "back",
    ):
        table.add_column(
            column, justify="right" if column not in ("status", "trigger", "host") else "left"
        )
    for r in await fetch(engine, RUNS_SQL, n=runs):
        table.add_row(
            str(r.run_id),
            r.started_at.isoformat(timespec="seconds"),
            r.status,
            r.trigger,
            r.host,
            str(r.partitions),
            str(r.partitions_failed),
            str(r.api_requests),
            str(r.retries),
            str(r.images_seen),
            str(r.created),
            str(r.updated),
            str(r.went_offline),
            str(r.came_online),
            str(r.removed),
            str(r.reappeared),
        )
    console.print(table)
    await _print_webhooks(engine, console)


async def _print_webhooks(engine: AsyncEngine, console: Console) -> None:
    """Webhook subscribers, when any are stored: failing ones first catch the eye."""
    async with engine.connect() as conn:
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
