"""``image-sync demo``: the whole service in one command, on throwaway parts.

Starts the simulator and an embedded PostgreSQL in a temporary directory, migrates,
syncs, changes the simulated catalogue (images go offline, come back, appear,
disappear, are renamed), syncs again, prints what the database recorded, and removes
the temporary database. Exit 0 when both syncs succeeded and the history recorded
exactly the changes that were made.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from service.app import open_runtime
from service.config import Settings
from service.report import SUMMARY_SQL, fetch
from service.sync import sync_once


def change_catalogue(catalogue: object, rng: random.Random) -> Counter[str]:
    """Apply a mixed batch of changes; returns the events they should produce."""
    from service.simulator import Catalogue

    assert isinstance(catalogue, Catalogue)
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
    from service.simulator import running_simulator

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
                partitions = rt.partitions()
                engine = rt.database.engine

                first = await sync_once(
                    engine, rt.client, partitions, trigger="demo", page_size=demo.page_size
                )
                console.print(
                    f"[bold]sync 1[/] run {first.run_id} {first.status} in {first.seconds:.1f}s: "
                    f"{first.total('created')} images created from {sum(p.api_requests for p in first.partitions)} requests"
                )
                expected = change_catalogue(sim.catalogue, random.Random(seed))
                console.print(
                    "[bold]catalogue changed[/] "
                    + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(expected.items()))
                )
                second = await sync_once(
                    engine, rt.client, partitions, trigger="demo", page_size=demo.page_size
                )
                console.print(
                    f"[bold]sync 2[/] run {second.run_id} {second.status} in {second.seconds:.1f}s"
                )

                recorded = Counter(
                    {
                        r.event_type: r.n
                        for r in await fetch(
                            engine,
                            "SELECT event_type, count(*) AS n FROM inventory.image_events "
                            "WHERE sync_run_id = :run GROUP BY event_type",
                            run=second.run_id,
                        )
                    }
                )
                events = Table(
                    title=f"Events recorded by run {second.run_id}", title_justify="left"
                )
                for column in ("event", "expected", "recorded"):
                    events.add_column(column)
                for name in sorted(set(expected) | set(recorded)):
                    events.add_row(name, str(expected[name]), str(recorded[name]))
                console.print(events)

                sample = await fetch(
                    engine,
                    "SELECT e.event_type, e.region_id, e.image_id, e.changed_fields, e.after "
                    "FROM inventory.image_events e WHERE e.sync_run_id = :run "
                    "ORDER BY e.event_id LIMIT 8",
                    run=second.run_id,
                )
                for row in sample:
                    detail = ", ".join(row.changed_fields) if row.changed_fields else ""
                    console.print(f"  {row.event_type:<12} {row.region_id}/{row.image_id} {detail}")

                summary = Table(title="Images in the database", title_justify="left")
                for column in ("region", "source", "images", "offline"):
                    summary.add_column(
                        column, justify="left" if column in ("region", "source") else "right"
                    )
                for row in await fetch(engine, SUMMARY_SQL):
                    summary.add_row(
                        row.region_id, row.image_source, str(row.images), str(row.offline)
                    )
                console.print(summary)
                async with engine.connect() as conn:
                    listed = await conn.scalar(
                        sa.text("SELECT count(*) FROM inventory.current_images")
                    )
                console.print(f"listed now: {listed} (simulator: {len(sim.catalogue)})")

    ok = first.ok and second.ok and recorded == expected and listed == len(sim.catalogue)
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo found a mismatch[/]")
    return 0 if ok else 1
