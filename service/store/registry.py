"""The registry of configured partitions and accounts, ``inventory.partitions`` and
``inventory.accounts``.

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
       (account, region_id, image_source, configured, first_configured_at, last_configured_at)
SELECT c.account, c.region_id, c.image_source, true, now(), now()
  FROM unnest(CAST(:accounts AS text[]), CAST(:regions AS text[]), CAST(:sources AS text[]))
       AS c(account, region_id, image_source)
ON CONFLICT (region_id, image_source, coalesce(account, '')) DO UPDATE
   SET configured = true, last_configured_at = now(), unconfigured_at = NULL
"""
_UNCONFIGURE = """
UPDATE inventory.partitions p
   SET configured = false, unconfigured_at = now()
 WHERE p.configured
   AND (coalesce(p.account, ''), p.region_id, p.image_source) NOT IN (
        SELECT coalesce(c.account, ''), c.region_id, c.image_source
          FROM unnest(CAST(:accounts AS text[]), CAST(:regions AS text[]),
                      CAST(:sources AS text[])) AS c(account, region_id, image_source))
"""
_CONFIGURE_ACCOUNTS = """
INSERT INTO inventory.accounts
       (account, role_jrn, regions, configured, first_configured_at, last_configured_at)
SELECT c.account, c.role_jrn, string_to_array(c.regions, ','), true, now(), now()
  FROM unnest(CAST(:names AS text[]), CAST(:roles AS text[]), CAST(:regions AS text[]))
       AS c(account, role_jrn, regions)
ON CONFLICT (account) DO UPDATE
   SET role_jrn = EXCLUDED.role_jrn, regions = EXCLUDED.regions, configured = true,
       last_configured_at = now()
"""
_UNCONFIGURE_ACCOUNTS = """
UPDATE inventory.accounts SET configured = false
 WHERE configured AND account <> ALL (CAST(:names AS text[]))
"""

PartitionIdentity = tuple[str | None, str, str]
"""(account, region, source): the account is None for a catalogue partition."""


async def register_partitions(
    engine: AsyncEngine,
    partitions: Sequence[PartitionIdentity],
    accounts: Sequence[tuple[str, str | None, Sequence[str]]] = (),
) -> None:
    """Make ``partitions`` the configured ones and, when given, ``accounts`` ((name,
    role_jrn or None, regions)) the configured accounts, in one transaction; accounts and
    partitions left out are marked unconfigured and keep their rows.

    Raises :class:`DatabaseError` with one line when the database cannot be written.
    """
    params = {
        "accounts": [account for account, _, _ in partitions],
        "regions": [region for _, region, _ in partitions],
        "sources": [source for _, _, source in partitions],
    }
    async with transaction(engine, "cannot register the configured partitions") as conn:
        await conn.execute(sa.text(_CONFIGURE), params)
        await conn.execute(sa.text(_UNCONFIGURE), params)
        if accounts:
            names = {
                "names": [name for name, _, _ in accounts],
                "roles": [role for _, role, _ in accounts],
                "regions": [",".join(regions) for _, _, regions in accounts],
            }
            await conn.execute(sa.text(_CONFIGURE_ACCOUNTS), names)
            await conn.execute(sa.text(_UNCONFIGURE_ACCOUNTS), names)
