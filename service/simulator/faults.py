"""Fault injection for the simulator: latency, error responses, rate limits, drift.

A :class:`FaultConfig` is plain data (JSON in and out, for the admin endpoint and
the CLI). :class:`Faults` applies one to requests, drawing every random decision
from one RNG seeded by ``config.seed`` so a test sees the same faults every run.

Decision order for one API request (first match wins):

1. ``fail_partitions``: the partition always fails with the given kind or API status;
2. ``fail_first_n``: the first n requests matching a rule fail with its kind;
3. ``rate_limit``: more than that many accepted requests for the region within the
   last second gets 429 ``RATE_LIMIT``;
4. ``error_rates``: one uniform draw against the cumulative probabilities per kind.

Kinds (``KINDS``): ``rate_limit`` (429 RATE_LIMIT with Retry-After), ``quota``
(429 QUOTA_EXCEEDED), ``internal`` (500 INTERNAL), ``bad_gateway`` (502
SOURCE_UNAVAILABLE), ``unavailable`` (503 UNAVAILABLE), ``reset`` (connection
dropped before any response), ``truncated`` (200 whose body stops mid-way),
``malformed`` (200 with non-JSON bytes), ``html`` (200 text/html error page),
``error_200`` (200 whose JSON body is an ``error`` object).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "ERROR_KINDS",
    "KINDS",
    "STATUS_CODES",
    "FailFirst",
    "Fault",
    "FaultConfig",
    "Faults",
]

# JD Cloud's common error table: error.status -> HTTP code.
STATUS_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "HTTP_FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RATE_LIMIT": 429,
    "QUOTA_EXCEEDED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "NOT_IMPLEMENTED": 501,
    "SOURCE_UNAVAILABLE": 502,
    "UNAVAILABLE": 503,
}

# Kinds answered with a JSON error body: kind -> error.status.
ERROR_KINDS: dict[str, str] = {
    "rate_limit": "RATE_LIMIT",
    "quota": "QUOTA_EXCEEDED",
    "internal": "INTERNAL",
    "bad_gateway": "SOURCE_UNAVAILABLE",
    "unavailable": "UNAVAILABLE",
}
KINDS = (*ERROR_KINDS, "reset", "truncated", "malformed", "html", "error_200")


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do instead of answering normally.

    ``kind`` is one of KINDS, or ``"status"`` for an error response with the API
    status ``status`` (e.g. HTTP_FORBIDDEN); ``status`` is set for every error kind.
    """

    kind: str
    status: str | None = None

    @classmethod
    def parse(cls, value: str) -> Fault:
        """A kind (``reset``) or an API status (``INTERNAL``, ``QUOTA_EXCEEDED``)."""
        if value in ERROR_KINDS:
            return cls(value, ERROR_KINDS[value])
        if value in KINDS:
            return cls(value)
        if value.upper() in STATUS_CODES:
            return cls("status", value.upper())
        raise ValueError(
            f"unknown fault {value!r}: expected one of {', '.join(KINDS)} or an API status"
        )

    @property
    def http_code(self) -> int:
        return STATUS_CODES[self.status] if self.status else 200


@dataclass(slots=True)
class FailFirst:
    """The first ``n`` requests matching region/source (None: any) fail with ``kind``."""

    kind: str
    n: int
    region: str | None = None
    source: str | None = None


@dataclass(slots=True)
class FaultConfig:
    """Fault settings; every field has a harmless default (no faults)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0  # latency is uniform in [latency - jitter, latency + jitter]
    error_rates: dict[str, float] = field(default_factory=dict)  # kind -> probability
    rate_limit: float | None = None  # accepted requests per second per region; None: off
    retry_after_s: int = 1
    drift: float = 0.0  # probability, per listing request, of one insert or delete
    fail_partitions: dict[str, str] = field(default_factory=dict)  # "region/source" -> fault
    fail_first_n: list[FailFirst] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self.fail_first_n = [
            # from_dict/JSON gives plain mappings
            rule if isinstance(rule, FailFirst) else FailFirst(**rule)
            for rule in self.fail_first_n
        ]
        self.validate()

    def validate(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency_ms and jitter_ms must be >= 0")
        for kind, probability in self.error_rates.items():
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}: expected one of {', '.join(KINDS)}")
            if not 0 <= probability <= 1:
                raise ValueError(f"error rate for {kind} must be within 0..1, got {probability}")
        if sum(self.error_rates.values()) > 1:
            raise ValueError("error rates add up to more than 1")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 (or null for no limit)")
        if not 0 <= self.drift <= 1:
            raise ValueError(f"drift must be within 0..1, got {self.drift}")
        for partition, fault in self.fail_partitions.items():
            if partition.count("/") != 1:
                raise ValueError(f"fail_partitions key must be REGION/SOURCE, got {partition!r}")
            Fault.parse(fault)
        for rule in self.fail_first_n:
            Fault.parse(rule.kind)
            if rule.n < 0:
                raise ValueError("fail_first_n counts must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault setting {unknown[0]!r}")
        return cls(**data)


class Faults:
    """Applies a FaultConfig: latency, the fault for a request, drift draws, rate windows."""

    def __init__(self, config: FaultConfig | Mapping[str, Any] | None = None) -> None:
        self.config = FaultConfig()
        self._rng = random.Random(0)
        self._remaining: list[int] = []
        self._windows: dict[str, deque[float]] = {}
        self.replace(config if config is not None else FaultConfig())

    @property
    def rng(self) -> random.Random:
        """The seeded RNG all fault decisions (and drift choices) draw from."""
        return self._rng

    def replace(self, config: FaultConfig | Mapping[str, Any]) -> None:
        """Install a whole new configuration (resets the RNG and fail_first_n counters)."""
        if not isinstance(config, FaultConfig):
            config = FaultConfig.from_dict(config)
        self.config = config
        self._rng = random.Random(config.seed)
        self._remaining = [rule.n for rule in config.fail_first_n]
        self._windows.clear()

    def update(self, patch: Mapping[str, Any]) -> FaultConfig:
        """Change the given settings, keep the others (``{"reset": true}`` starts from none)."""
        patch = dict(patch)
        base = {} if patch.pop("reset", False) else self.config.to_dict()
        self.replace({**base, **patch})
        return self.config

    def to_dict(self) -> dict[str, Any]:
        data = self.config.to_dict()
        data["fail_first_n_remaining"] = list(self._remaining)
        return data

    def latency_s(self) -> float:
        latency, jitter = self.config.latency_ms, self.config.jitter_ms
        if jitter:
            latency += self._rng.uniform(-jitter, jitter)
        return max(latency, 0.0) / 1000

    def decide(self, region: str, source: str | None, *, now: float | None = None) -> Fault | None:
        """The fault for one API request to ``region`` listing ``source``, if any."""
        config = self.config
        if source is not None:
            persistent = config.fail_partitions.get(f"{region}/{source}")
            if persistent is not None:
                return Fault.parse(persistent)
        for index, rule in enumerate(config.fail_first_n):
            if (
                self._remaining[index] > 0
                and rule.region in (None, region)
                and rule.source in (None, source)
            ):
                self._remaining[index] -= 1
                return Fault.parse(rule.kind)
        if config.rate_limit is not None and not self._admit(region, now):
            return Fault.parse("rate_limit")
        if config.error_rates:
            draw = self._rng.random()
            for kind, probability in config.error_rates.items():
                if draw < probability:
                    return Fault.parse(kind)
                draw -= probability
        return None

    def should_drift(self) -> bool:
        return self.config.drift > 0 and self._rng.random() < self.config.drift

    def _admit(self, region: str, now: float | None) -> bool:
        """Sliding one-second window of accepted requests per region."""
        assert self.config.rate_limit is not None
        now = time.monotonic() if now is None else now
        window = self._windows.setdefault(region, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.config.rate_limit:
            return False
        window.append(now)
        return True
