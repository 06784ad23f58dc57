"""The two benchmark scenarios: the one the targets are stated for, and a small one for CI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BIG_PARTITION = "cn-north-1/private"


@dataclass(frozen=True, slots=True)
class Scenario:
    """What the simulator serves and how the service is configured for one benchmark."""

    name: str
    images: int
    latency_ms: float
    skew: float
    """Weight of :data:`BIG_PARTITION` (1 for the others): 13 puts ~40% of the images there."""
    concurrency: int = 16
    page_size: int = 100
    baseline_stride: int = 10
    """The baseline fetches page 1 and every ``stride``-th page of each listing, then scales."""
    change_fraction: float = 0.01
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Scenario("full", images=100_000, latency_ms=50, skew=13)
SMALL = Scenario("small", images=2_000, latency_ms=10, skew=13, baseline_stride=5)
