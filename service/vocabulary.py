"""The words the schema, the sync and the metrics share: event types and statuses.

The lowest module of the package (it imports nothing of it), so that the metrics, the
CLI and the webhooks can name them without reaching up into the store; the store's
CHECK constraints are built from them.
"""

from __future__ import annotations

EVENT_TYPES = (
    "created",
    "updated",
    "went_offline",
    "came_online",
    "removed",
    "reappeared",
    "access_granted",
    "access_revoked",
)
"""``inventory.image_events.event_type``, in the order one image's events are recorded
(``access_granted``/``access_revoked``: an account gained or lost an image another
account lists too)."""
RUN_STATUSES = ("running", "succeeded", "partial", "failed", "abandoned")
"""``inventory.sync_runs.status``."""
PARTITION_STATUSES = ("succeeded", "incomplete", "failed", "skipped_locked")
"""``inventory.sync_partitions.status``: the outcomes of a partition that are recorded."""
NOT_RECORDED = {
    "skipped_fresh": "skipped: another process synced it moments ago",
    "not_started": "not started: shutting down",
}
"""Partition outcomes that leave no ``sync_partitions`` row, with their debug line."""
