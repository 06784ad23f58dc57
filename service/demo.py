"""``image-sync demo``: the whole service in one command, on throwaway parts.

Starts the simulator and an embedded PostgreSQL in a temporary directory, migrates,
syncs, changes the simulated catalogue (images go offline, come back, appear,
disappear, are renamed), syncs again, prints what the database recorded, and removes
the temporary database. Exit 0 when both syncs succeeded and the history recorded
exactly the changes that were made.

With ``image-sync simulate``, the one command that runs the simulator: only the CLI
imports this module (when ``demo`` runs), so no other command loads the simulator.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from service.app import Runtime, open_runtime
from service.config import Settings
from service.simulator import Catalogue, running_simulator
from service.store import status
from service.sync import SyncReport, sync_once


def change_catalogue(catalogue: Catalogue, rng: random.Random) -> Counter[str]:
    """Apply a mixed batch of changes; returns the events they should produce."""
    expected: Counter[str] = Counter()
    regions = catalogue.regions
    for _ in range(5):
        region = rng.choice(regions)
        image_id = catalogue.random_image_id(region, "public", rng, offline=False)
        if image_id:
            catalogue.take_offline(region, image_id)
            expected["went_offline"] += 1
    for _ in range(3):
        region = rng.choice(regions)
        image_id = catalogue.random_image_id(region, "thirdparty", rng, offline=True)
        if image_id:
            catalogue.bring_online(region, image_id)
            expected["came_online"] += 1
    for i in range(4):
        catalogue.add(rng.choice(regions), "private", name=f"demo-image-{i}")
        expected["created"] += 1
    for _ in range(3):
        region = rng.choice(regions)
        image_id = catalogue.random_image_id(region, "shared", rng)
        if image_id:
            catalogue.delete(region, image_id)
            expected["removed"] += 1
    for _ in range(4):
        region = rng.choice(regions)
        image_id = catalogue.random_image_id(region, "community", rng)
        if image_id:
            old = catalogue.get(region, image_id) or {}
            catalogue.modify(region, image_id, name=f"{old.get('name', 'image')} (v2)")
            expected["updated"] += 1
    return expected


async def run_demo(settings: Settings, *, images: int = 2000, seed: int = 7) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="image-sync-demo-") as tmp:
        async with running_simulator(images=images, seed=seed) as sim:
            demo = settings.model_copy(
                update={
                    "endpoint": sim.url,
                    "data_dir": Path(tmp),
                    "database_url": None,
                    "rate_limit": 0,
                }
            )
            console.print(f"[bold]simulator[/] {sim.url} with {len(sim.catalogue)} images")
            async with open_runtime(demo, apply_migrations=True) as rt:
                console.print(f"[bold]database[/] embedded PostgreSQL in {tmp}, schema migrated")
                first = await _sync(console, rt, "sync 1")
                expected = change_catalogue(sim.catalogue, random.Random(seed))
                console.print(
                    "[bold]catalogue changed[/] "
                    + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(expected.items()))
                )
                second = await _sync(console, rt, "sync 2")
                recorded = await _print_events(console, rt, second.run_id, expected)
                listed = await _print_summary(console, rt)
                console.print(f"listed now: {listed} (simulator: {len(sim.catalogue)})")

    ok = first.ok and second.ok and recorded == expected and listed == len(sim.catalogue)
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo found a mismatch[/]")
    return 0 if ok else 1


async def _sync(console: Console, rt: Runtime, label: str) -> SyncReport:
    report = await sync_once(
        rt.database.engine,
        rt.client,
        rt.partitions(),
        trigger="demo",
        page_size=rt.settings.page_size,
    )
    requests = sum(p.api_requests for p in report.partitions)
    console.print(
        f"[bold]{label}[/] run {report.run_id} {report.status} in {report.seconds:.1f}s: "
        f"{report.total('created')} images created from {requests} requests"
    )
    return report


async def _print_events(
    console: Console, rt: Runtime, run_id: int, expected: Counter[str]
) -> Counter[str]:
    """The events the run recorded, beside those expected, and a sample; the counts."""
    engine = rt.database.engine
    recorded = Counter(await status.events_by_type(engine, run_id))
    events = Table(title=f"Events recorded by run {run_id}", title_justify="left")
    for column in ("event", "expected", "recorded"):
        events.add_column(column)
    for name in sorted(set(expected) | set(recorded)):
        events.add_row(name, str(expected[name]), str(recorded[name]))
    console.print(events)
    for event in await status.event_sample(engine, run_id, 8):
        detail = ", ".join(event.changed_fields)
        console.print(f"  {event.event_type:<12} {event.region_id}/{event.image_id} {detail}")
    return recorded


async def _print_summary(console: Console, rt: Runtime) -> int:
    """The images by region and source; how many are listed now."""
    summary = Table(title="Images in the database", title_justify="left")
    for column in ("region", "source", "images", "offline"):
        summary.add_column(column, justify="left" if column in ("region", "source") else "right")
    rows, listed = await status.summary_and_listed(rt.database.engine)
    for row in rows:
        summary.add_row(row.region_id, row.image_source, str(row.images), str(row.offline))
    console.print(summary)
    return listed
