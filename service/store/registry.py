"""The registry of configured partitions, ``inventory.partitions``.

``image-sync run`` and an unfiltered ``image-sync sync --once`` write it when they start:
the partitions of their configuration (``IMAGE_SYNC_REGIONS`` x ``IMAGE_SYNC_SOURCES``)
become ``configured``, every other one known to the registry is marked unconfigured.
A ``sync --once --region/--source`` is a one-off, not the configuration, and leaves the
registry alone. ``sync_health`` shows the configured partitions, so a partition that a
mistyped one-off run touched does not stay red. Replicas with different configurations
overwrite each other: the latest start wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.engine import transaction

_CONFIGURE = """
INSERT INTO inventory.partitions
       (region_id, image_source, configured, first_configured_at, last_configured_at)
SELECT c.region_id, c.image_source, true, now(), now()
  FROM unnest(CAST(:regions AS text[]), CAST(:sources AS text[])) AS c(region_id, image_source)
ON CONFLICT (region_id, image_source) DO UPDATE
   SET configured = true, last_configured_at = now(), unconfigured_at = NULL
"""
_UNCONFIGURE = """
UPDATE inventory.partitions p
   SET configured = false, unconfigured_at = now()
 WHERE p.configured
   AND (p.region_id, p.image_source) NOT IN (
        SELECT * FROM unnest(CAST(:regions AS text[]), CAST(:sources AS text[])))
"""


async def register_configuration(
    engine: AsyncEngine, partitions: Sequence[tuple[str, str]]
) -> None:
    """Make ``partitions`` ((region, source) pairs) the configured ones, in one transaction.

    Raises :class:`DatabaseError` with one line when the database cannot be written.
    """
    params = {
        "regions": [region for region, _ in partitions],
        "sources": [source for _, source in partitions],
    }
    async with transaction(engine, "cannot register the configured partitions") as conn:
        await conn.execute(sa.text(_CONFIGURE), params)
        await conn.execute(sa.text(_UNCONFIGURE), params)
