"""Sync progress for people: rich progress bars on a TTY, nothing extra otherwise.

Without a TTY the per-partition log lines (``service.sync``) are the progress.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import (
    Progress as RichBars,
)

from service.ingest import Progress
from service.jdcloud.listing import Listing, Partition
from service.store.runs import PartitionReport


class BarsProgress(Progress):
    """One bar for the partitions, one per partition for its pages."""

    def __init__(self, bars: RichBars, partitions: Sequence[Partition]) -> None:
        self._bars = bars
        self._overall = bars.add_task("partitions", total=len(partitions))
        self._tasks: dict[Partition, TaskID] = {}
        self._pages: dict[tuple[Partition, int], tuple[int, int]] = {}

    def partition_started(self, partition: Partition) -> None:
        self._tasks[partition] = self._bars.add_task(str(partition), total=None)

    def pages(self, partition: Partition, listing: Listing, done: int, total: int) -> None:
        self._pages[partition, listing.index] = (done, total)
        mine = [v for (p, _), v in self._pages.items() if p == partition]
        task = self._tasks.get(partition)
        if task is not None:
            self._bars.update(
                task, completed=sum(d for d, _ in mine), total=sum(t for _, t in mine)
            )

    def partition_finished(self, report: PartitionReport) -> None:
        task = self._tasks.pop(report.partition, None)
        if task is not None:
            self._bars.remove_task(task)
        self._bars.advance(self._overall)


@contextmanager
def progress_for_terminal(partitions: Sequence[Partition]) -> Iterator[Progress]:
    if not sys.stderr.isatty():
        yield Progress()
        return
    bars = RichBars(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bars:
        yield BarsProgress(bars, partitions)
