"""Prometheus metrics, on a registry owned by one :class:`Metrics` object (no globals).

The names are a contract with ``deploy/grafana`` and ``deploy/prometheus/alerts.yaml``.
Counters are incremented where things happen (API client, sync); gauges that describe
the database (images by region/source/offline, last success per partition) are
refreshed from PostgreSQL when the status server is scraped.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.vocabulary import EVENT_TYPES, PARTITION_STATUSES

_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

RETRY_REASONS = (
    "RATE_LIMIT", "INTERNAL", "UNKNOWN", "SOURCE_UNAVAILABLE", "UNAVAILABLE",
    "TIMEOUT", "NETWORK", "MALFORMED",
)  # fmt: skip
"""Retry reasons known in advance (the API's error.status, or our kind of failure)."""


class Metrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._api_and_sync_metrics(self.registry)
        self._database_gauges(self.registry)
        self._webhook_metrics(self.registry)

    def _api_and_sync_metrics(self, r: CollectorRegistry) -> None:
        """Counted where things happen: the API client and the sync."""
        self.api_requests = Counter(
            "image_sync_api_requests",
            "describeImages requests by region and HTTP status ('error' for network failures).",
            ["region", "status"],
            registry=r,
        )
        self.api_retries = Counter(
            "image_sync_api_retries",
            "describeImages requests retried, by region and reason.",
            ["region", "reason"],
            registry=r,
        )
        self.api_throttled = Counter(
            "image_sync_api_throttled",
            "429 RATE_LIMIT answers by region.",
            ["region"],
            registry=r,
        )
        self.run_duration = Histogram(
            "image_sync_run_duration_seconds",
            "Wall time of a whole sync run.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.partition_duration = Histogram(
            "image_sync_partition_duration_seconds",
            "Wall time of one partition (account empty for a catalogue partition).",
            ["region", "source", "account"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.partitions = Counter(
            "image_sync_partitions",
            "Partition outcomes by region, source, status and account (empty for a "
            "catalogue partition).",
            ["region", "source", "status", "account"],
            registry=r,
        )
        self.events = Counter(
            "image_sync_events",
            "Image events recorded by this process, by type.",
            ["type"],
            registry=r,
        )
        self.up = Gauge("image_sync_up", "1 while the daemon runs.", registry=r)

    def _database_gauges(self, r: CollectorRegistry) -> None:
        """Read from the database when the status server is scraped."""
        self.images = Gauge(
            "image_sync_images",
            "Listed images in the database by region, source and offline state.",
            ["region", "source", "offline"],
            registry=r,
        )
        self.last_success = Gauge(
            "image_sync_partition_last_success_timestamp_seconds",
            "Unix time of the last successful sync of each partition (from the database; "
            "account empty for a catalogue partition).",
            ["region", "source", "account"],
            registry=r,
        )
        self.partition_failing = Gauge(
            "image_sync_partition_failing",
            "1 while the latest attempt of a configured partition failed or was incomplete "
            "(from inventory.sync_health), else 0; account empty for a catalogue partition.",
            ["region", "source", "account"],
            registry=r,
        )

    def _webhook_metrics(self, r: CollectorRegistry) -> None:
        """Delivery of the change feed to webhook subscribers."""
        self.webhook_deliveries = Counter(
            "image_sync_webhook_deliveries",
            "Webhook batches acknowledged (2xx), by subscriber.",
            ["subscriber"],
            registry=r,
        )
        self.webhook_events = Counter(
            "image_sync_webhook_events",
            "Events in acknowledged webhook batches, by subscriber.",
            ["subscriber"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "image_sync_webhook_failures",
            "Failed webhook POST attempts by subscriber and reason "
            "(http_<status>, timeout, connection).",
            ["subscriber", "reason"],
            registry=r,
        )
        self.webhook_failing = Gauge(
            "image_sync_webhook_failing",
            "1 while a subscriber's last delivery failed all its attempts.",
            ["subscriber"],
            registry=r,
        )
        self.webhook_lag_events = Gauge(
            "image_sync_webhook_lag_events",
            "Events committed after the subscriber's cursor (not yet acknowledged).",
            ["subscriber"],
            registry=r,
        )
        self.webhook_lag_seconds = Gauge(
            "image_sync_webhook_lag_seconds",
            "Age of the oldest event the subscriber has not acknowledged (0 when caught up).",
            ["subscriber"],
            registry=r,
        )

    def initialise(
        self,
        regions: Iterable[str],
        sources: Iterable[str],
        partitions: Iterable[tuple[str, str, str]] | None = None,
    ) -> None:
        """Create the labelled counters at 0 for the configured partitions ((region,
        source, account) identities; default every region x source, no account), so that
        dashboards and alerts (``rate(...)``) see a series before its first event."""
        sources = tuple(sources)
        regions = tuple(regions)
        for region in regions:
            self.api_throttled.labels(region)
            for reason in RETRY_REASONS:
                self.api_retries.labels(region, reason)
        if partitions is None:
            partitions = ((region, source, "") for region in regions for source in sources)
        for region, source, account in partitions:
            for status in PARTITION_STATUSES:
                self.partitions.labels(region, source, status, account)
        for event_type in EVENT_TYPES:
            self.events.labels(event_type)

    def initialise_webhook(self, subscriber: str) -> None:
        """Create a subscriber's series at 0 (alerts see them before the first failure)."""
        for metric in (
            self.webhook_deliveries,
            self.webhook_events,
            self.webhook_failing,
            self.webhook_lag_events,
            self.webhook_lag_seconds,
        ):
            metric.labels(subscriber)
        for reason in ("timeout", "connection"):
            self.webhook_failures.labels(subscriber, reason)
