"""Apply one partition: stream pages into staging, then one set-based merge.

A :class:`PartitionWriter` lives inside the partition's single transaction:

1. :meth:`PartitionWriter.try_lock` takes the partition's advisory lock (transaction
   scoped: released on commit, rollback or a dead connection), and
   :meth:`PartitionWriter.open` creates temporary staging tables that vanish at commit;
2. :meth:`PartitionWriter.stage` COPYs each page's rows into staging as it arrives,
   so a 40,000-image partition is never held in memory;
3. :meth:`PartitionWriter.merge` compares staging with ``inventory.images`` by content
   hash and, only for what changed, writes images, disks and events in a handful of
   statements. Unchanged images are not touched: a sync with no upstream change writes
   no image, disk or event row.

The event documents (``after``/``before``) use the fields of
:data:`service.normalize.TRACKED_FIELDS`; ``images_as_of()`` folds them back.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from service.normalize import (
    DISK_COLUMNS,
    EXTRA_COLUMNS,
    IMAGE_COLUMNS,
    KNOWN_FIELDS,
    TRACKED_FIELDS,
    ImageExtras,
    ImageRow,
    disk_record,
    image_record,
)
from service.store.engine import database_errors
from service.store.feed import event_id_floor, record_batch
from service.store.tables import image_disks, images
from service.vocabulary import EVENT_TYPES

WRITES_VERSIONS = "image_sync.writes_versions"
"""Set (``SET LOCAL``) by a writer of inventory.images that keeps image_versions in step:
migration 0007's statement trigger refuses any other writer (an older release)."""

PARTITION_LOCK_SPACE = 0x1D5C
"""First key of the two-key advisory locks taken on partitions."""

_STAGE_IMAGE_COLUMNS = (*IMAGE_COLUMNS, "raw", "listing")
_STAGE_DISK_COLUMNS = ("image_id", *DISK_COLUMNS, "listing")
_EXTRA_KEYS = "ARRAY[" + ", ".join(f"'{k}'" for k in sorted(KNOWN_FIELDS)) + "]::text[]"
_DOC_FIELDS = (
    *(c for c in IMAGE_COLUMNS if c not in ("region_id", "image_id", "content_hash")),
    *EXTRA_COLUMNS,
)


ACCOUNT_MERGE_LOCK_SPACE = 0x1D5D
"""First key of the advisory lock that orders the merges of one region's account
partitions: partitions of two accounts can hold the same image (private to one, shared
with the other), and two merges deciding at once whether it is new would both record
it."""


def partition_lock_key(region: str, source: str, account: str = "") -> int:
    """Second advisory-lock key of a partition: a stable signed 32-bit hash (a
    catalogue partition's is the one-account release's, so both exclude each other)."""
    value = zlib.crc32((f"{account}:" if account else "").encode() + f"{region}/{source}".encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def account_merge_lock_key(region: str) -> int:
    """Second key of the advisory lock ordering one region's account merges."""
    return _signed32(region)


def _signed32(text: str) -> int:
    value = zlib.crc32(text.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def _doc(alias: str, disks: str, extra: str = "") -> str:
    """SQL for an image's history document from a row alias, a disks jsonb expression
    and its ``extra`` (default: the row's ``raw`` less the known fields)."""
    pairs = [f"'{name}', {alias}.{name}" for name in _DOC_FIELDS]
    pairs.append(f"'disks', coalesce({disks}, '[]'::jsonb)")
    pairs.append(f"'extra', {extra or f'{alias}.raw - {_EXTRA_KEYS}'}")
    return "jsonb_build_object(" + ", ".join(pairs) + ")"


_DISK_DOC = (
    "jsonb_agg(jsonb_build_object("
    + ", ".join(f"'{c}', d.{c}" for c in DISK_COLUMNS)
    + ") ORDER BY d.position)"
)

_STAGE_EXTRA_COLUMNS = ("image_id", *EXTRA_COLUMNS)
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _staging_table(name: str, columns: Sequence[str], table: sa.Table, *, key: str = "") -> str:
    """``CREATE TEMP TABLE`` for a staging table of ``columns``, each typed as the column
    of that name in ``table`` (``listing`` is the listing's index); ``key`` its primary
    key. So staging cannot drift from :mod:`service.store.tables`."""
    quote = _PG.identifier_preparer.quote
    defs = [
        f"{quote(c)} "
        + ("smallint" if c == "listing" else table.c[c].type.compile(dialect=_PG).lower())
        + (" PRIMARY KEY" if c == key else "")
        for c in columns
    ]
    return f"CREATE TEMP TABLE {name} ({', '.join(defs)}) ON COMMIT DROP"


_CREATE_STAGING = [
    _staging_table("stage_images", (*_STAGE_IMAGE_COLUMNS, *EXTRA_COLUMNS), images),
    _staging_table("stage_extras", _STAGE_EXTRA_COLUMNS, images, key="image_id"),
    _staging_table("stage_seen", ("image_id", "listing"), images),
    _staging_table("stage_disks", _STAGE_DISK_COLUMNS, image_disks),
]
_CREATE_ADOPTED = "CREATE TEMP TABLE stage_adopted (image_id text PRIMARY KEY) ON COMMIT DROP"
"""Images an account's private listing takes over from shared access (account partitions
fill it, :data:`_ADOPTED`; _DIFF reads it for every partition)."""
_CREATE_TOUCHED = "CREATE TEMP TABLE stage_touched (image_id text PRIMARY KEY) ON COMMIT DROP"
"""Images whose row the merge wrote: their versions follow (:data:`_CLOSE_VERSIONS`)."""
_CREATE_INSERTED = "CREATE TEMP TABLE stage_inserted (image_id text PRIMARY KEY) ON COMMIT DROP"
"""New images whose row this merge inserted (:data:`_INSERT_NEW_IMAGES`): their first
version is written with their created event."""

_COLS = ", ".join((*IMAGE_COLUMNS, *EXTRA_COLUMNS))
_SET_COLS = ", ".join(
    f"{c} = EXCLUDED.{c}"
    for c in (*IMAGE_COLUMNS, *EXTRA_COLUMNS, "raw")
    if c not in ("region_id", "image_id")
)
_EXTRAS_DIFFER = " OR ".join(f"i.{c} IS DISTINCT FROM e.{c}" for c in EXTRA_COLUMNS)
_DISK_COLS = ", ".join(DISK_COLUMNS)

_DEDUPE_IMAGES = """
DELETE FROM stage_images a USING stage_images b
 WHERE a.image_id = b.image_id AND a.listing < b.listing
"""
_DEDUPE_UNCHANGED = """
DELETE FROM stage_images s USING stage_seen u
 WHERE s.image_id = u.image_id AND s.listing < u.listing
"""
_DEDUPE_DISKS = """
DELETE FROM stage_disks d
 WHERE NOT EXISTS (SELECT 1 FROM stage_images s
                    WHERE s.image_id = d.image_id AND s.listing = d.listing)
"""

# Extras (shares, constraints) come from other APIs and are not in the content hash:
# an image listed with its stored hash whose extras changed is staged in full again,
# from its stored row and disks, so the classification below sees it as changed.
_PROMOTE_SEEN = f"""
CREATE TEMP TABLE stage_promoted ON COMMIT DROP AS
SELECT DISTINCT ON (u.image_id) u.image_id, u.listing  -- seen in two listings: the later
  FROM stage_seen u
  JOIN inventory.images i ON i.region_id = :region AND i.image_id = u.image_id
  LEFT JOIN stage_extras x ON x.image_id = u.image_id
  CROSS JOIN LATERAL (SELECT {", ".join(f"x.{c}" for c in EXTRA_COLUMNS)}) e
 WHERE {_EXTRAS_DIFFER}
 ORDER BY u.image_id, u.listing DESC
"""
_PROMOTE_IMAGES = f"""
INSERT INTO stage_images ({", ".join(IMAGE_COLUMNS)}, raw, listing)
SELECT {", ".join("i." + c for c in IMAGE_COLUMNS)}, i.raw, p.listing
  FROM stage_promoted p
  JOIN inventory.images i ON i.region_id = :region AND i.image_id = p.image_id
"""
_PROMOTE_DISKS = f"""
INSERT INTO stage_disks (image_id, {", ".join(DISK_COLUMNS)}, listing)
SELECT d.image_id, {", ".join("d." + c for c in DISK_COLUMNS)}, p.listing
  FROM stage_promoted p
  JOIN inventory.image_disks d ON d.region_id = :region AND d.image_id = p.image_id
"""
_UNSEE_PROMOTED = "DELETE FROM stage_seen u USING stage_promoted p WHERE u.image_id = p.image_id"
_SET_EXTRAS = f"""
UPDATE stage_images s SET {", ".join(f"{c} = x.{c}" for c in EXTRA_COLUMNS)}
  FROM stage_extras x WHERE x.image_id = s.image_id
"""

# Classify staged images against the table. Unchanged ones (same hash, still listed)
# are not selected at all, so nothing below touches them. A new image's document is
# built once, by the statement that writes its created event, not stored here first.
# In key order (stage_diff keeps it), so the writes below that read staging through it
# reach the tables' (region_id, image_id) indexes in order, not at random.
_CLASSIFY = f"""
CREATE TEMP TABLE stage_changes ON COMMIT DROP AS
SELECT s.image_id,
       CASE WHEN i.image_id IS NULL THEN 'new'
            WHEN i.removed_at IS NOT NULL THEN 'back'
            ELSE 'changed' END AS kind,
       CASE WHEN i.image_id IS NOT NULL THEN {_doc("i", "od.disks")} END AS old_doc,
       CASE WHEN i.image_id IS NOT NULL THEN {_doc("s", "nd.disks")} END AS new_doc
  FROM stage_images s
  LEFT JOIN inventory.images i ON i.region_id = :region AND i.image_id = s.image_id
  LEFT JOIN LATERAL (
        SELECT {_DISK_DOC} AS disks FROM stage_disks d
         WHERE i.image_id IS NOT NULL AND d.image_id = s.image_id
  ) nd ON true
  LEFT JOIN LATERAL (
        SELECT {_DISK_DOC} AS disks FROM inventory.image_disks d
         WHERE i.image_id IS NOT NULL AND d.region_id = :region AND d.image_id = s.image_id
  ) od ON true
 WHERE i.image_id IS NULL OR i.removed_at IS NOT NULL OR i.content_hash <> s.content_hash
    OR {" OR ".join(f"i.{c} IS DISTINCT FROM s.{c}" for c in EXTRA_COLUMNS)}
 ORDER BY s.image_id
"""

_DIFF = """
CREATE TEMP TABLE stage_diff ON COMMIT DROP AS
SELECT c.image_id, c.kind, c.old_doc, c.new_doc,
       coalesce((c.old_doc -> 'offline') = 'true'::jsonb, false) AS was_offline,
       coalesce((c.new_doc -> 'offline') = 'true'::jsonb, false) AS is_offline,
       CASE WHEN c.kind = 'new' THEN '{}'::text[]  -- a created event lists no fields
            -- Listings that differ only in imageSource (an image private to one account,
            -- shared with another) are no change.
            -- Nor is the owner's first listing of an image known until then only as
            -- shared with another account, which cannot know its members.
            ELSE ARRAY(SELECT k FROM jsonb_object_keys(c.new_doc) k
                        WHERE k <> 'image_source'
                          AND NOT (k = 'shared_with' AND c.old_doc -> k = 'null'::jsonb
                                   AND EXISTS (SELECT 1 FROM stage_adopted a
                                                WHERE a.image_id = c.image_id))
                          AND c.old_doc -> k IS DISTINCT FROM c.new_doc -> k ORDER BY k)
       END AS changed
  FROM stage_changes c
"""

_SUCCEEDED = """
SELECT EXISTS (SELECT 1 FROM inventory.sync_partitions
                WHERE region_id = :region AND image_source = :source AND status = 'succeeded'
                  AND coalesce(account, '') = coalesce(CAST(:account AS text), ''))
"""
_COUNT_SEEN = """
SELECT count(*) FROM (SELECT image_id FROM stage_images UNION SELECT image_id FROM stage_seen) ids
"""

_EVENT_INSERT = """
INSERT INTO inventory.image_events
       (occurred_at, sync_run_id, region_id, image_id, image_source, event_type,
        changed_fields, before, after, baseline, account)
"""
_BASELINE = ":baseline, CAST(:account AS text)"
"""The last two values of every event row: its baseline flag and its account."""
_VERSION_INSERT = f"""
INSERT INTO inventory.image_versions (region_id, image_id, valid_from, valid_to,
                                      {", ".join(TRACKED_FIELDS)})"""


def _transition(event_type: str, condition: str) -> str:
    """The statement writing an offline transition: changed images meeting ``condition``."""
    return f"""{_EVENT_INSERT}
SELECT now(), :run_id, :region, d.image_id, :source, '{event_type}', '{{offline}}',
       jsonb_build_object('offline', d.old_doc -> 'offline'),
       jsonb_build_object('offline', d.new_doc -> 'offline'), {_BASELINE}
  FROM stage_diff d
 WHERE d.kind = 'changed' AND {condition} ORDER BY d.image_id"""


# One statement per event type, in the order they are recorded for one image.
_EVENTS = {
    # With its first version, from the same values, where this merge inserted the row:
    # the disks' document and `extra` are built once for both (the versions, built from
    # the rows as written, cost a first sync as much again: bench/README.md).
    "created": f"""
WITH new AS MATERIALIZED (
    SELECT s.image_id, {", ".join("s." + c for c in _DOC_FIELDS)},
           coalesce(nd.disks, '[]'::jsonb) AS disks, s.raw - {_EXTRA_KEYS} AS extra
      FROM stage_diff c JOIN stage_images s USING (image_id)
      LEFT JOIN LATERAL (
            SELECT {_DISK_DOC} AS disks FROM stage_disks d WHERE d.image_id = s.image_id
      ) nd ON true
     WHERE c.kind = 'new'
), opened AS ({_VERSION_INSERT}
    SELECT :region, n.image_id, now(), 'infinity', {", ".join("n." + f for f in TRACKED_FIELDS)}
      FROM new n JOIN stage_inserted USING (image_id)
){_EVENT_INSERT}
SELECT now(), :run_id, :region, n.image_id, :source, 'created', '{{}}', NULL,
       {_doc("n", "n.disks", "n.extra")}, {_BASELINE}
  FROM new n ORDER BY n.image_id""",
    "reappeared": f"""{_EVENT_INSERT}
SELECT now(), :run_id, :region, d.image_id, :source, 'reappeared', d.changed,
       (SELECT jsonb_object_agg(k, d.old_doc -> k) FROM unnest(d.changed) k), d.new_doc,
       {_BASELINE}
  FROM stage_diff d WHERE d.kind = 'back' ORDER BY d.image_id""",
    "went_offline": _transition("went_offline", "d.is_offline AND NOT d.was_offline"),
    "came_online": _transition("came_online", "d.was_offline AND NOT d.is_offline"),
    "updated": f"""{_EVENT_INSERT}
SELECT now(), :run_id, :region, u.image_id, :source, 'updated', u.fields,
       (SELECT jsonb_object_agg(k, u.old_doc -> k) FROM unnest(u.fields) k),
       (SELECT jsonb_object_agg(k, u.new_doc -> k) FROM unnest(u.fields) k), {_BASELINE}
  FROM (SELECT d.*,
               CASE WHEN d.was_offline <> d.is_offline
                    THEN array_remove(d.changed, 'offline') ELSE d.changed END AS fields
          FROM stage_diff d WHERE d.kind = 'changed') u
 WHERE cardinality(u.fields) > 0 ORDER BY u.image_id""",
}

_IMAGE_VALUES = f"""
SELECT {", ".join("s." + c for c in (*IMAGE_COLUMNS, *EXTRA_COLUMNS))}, s.raw, now(), now(), NULL
  FROM stage_images s JOIN stage_diff d USING (image_id)"""
# New images first. One another merge inserted since this one classified it (the same
# image in two partitions of a region, merged at once) is left to the upsert below,
# and its versions follow the row like a changed image's.
_INSERT_NEW_IMAGES = f"""
WITH inserted AS (
    INSERT INTO inventory.images ({_COLS}, raw, first_seen_at, last_changed_at, removed_at)
    {_IMAGE_VALUES} WHERE d.kind = 'new'
    ON CONFLICT (region_id, image_id) DO NOTHING
    RETURNING image_id
)
INSERT INTO stage_inserted SELECT image_id FROM inserted
"""
_NOT_INSERTED = "NOT EXISTS (SELECT 1 FROM stage_inserted n WHERE n.image_id = d.image_id)"
_UPSERT_IMAGES = f"""
INSERT INTO inventory.images ({_COLS}, raw, first_seen_at, last_changed_at, removed_at)
{_IMAGE_VALUES} WHERE {_NOT_INSERTED}
ON CONFLICT (region_id, image_id) DO UPDATE
   SET {_SET_COLS}, last_changed_at = now(), removed_at = NULL
"""

_DELETE_DISKS = f"""
DELETE FROM inventory.image_disks x
 USING stage_diff d
 WHERE x.region_id = :region AND x.image_id = d.image_id AND {_NOT_INSERTED}
"""

_INSERT_DISKS = f"""
INSERT INTO inventory.image_disks (region_id, image_id, {_DISK_COLS})
SELECT :region, s.image_id, {", ".join("s." + c for c in DISK_COLUMNS)}
  FROM stage_disks s JOIN stage_diff d USING (image_id)
"""

# Versions (SCD2, read by images_as_of) follow the images rows: every image this merge
# wrote (changed, removed, its source rewritten) is noted in stage_touched; at the end
# its current version closes and, unless removed, one opens from its row as written.
# (A new image's first version is written with its created event, above.)
# The moment is the transaction's (the events' occurred_at), or just after the version
# it closes when a merge of the same image that started later committed first.
_TOUCH_CHANGED = f"""
INSERT INTO stage_touched SELECT image_id FROM stage_diff d WHERE {_NOT_INSERTED}
ON CONFLICT DO NOTHING
"""
_CLOSE_VERSIONS = """
CREATE TEMP TABLE stage_moments ON COMMIT DROP AS
WITH closed AS (
    UPDATE inventory.image_versions v
       SET valid_to = greatest(now(), v.valid_from + interval '1 microsecond')
      FROM stage_touched t
     WHERE v.region_id = :region AND v.image_id = t.image_id AND v.valid_to = 'infinity'
    RETURNING v.image_id, v.valid_to
)
SELECT t.image_id, coalesce(c.valid_to, now()) AS moment
  FROM stage_touched t LEFT JOIN closed c USING (image_id)
"""
_VERSION_VALUES = {
    "disks": "coalesce((SELECT " + _DISK_DOC + " FROM inventory.image_disks d"
    " WHERE d.region_id = i.region_id AND d.image_id = i.image_id), '[]'::jsonb)",
    "extra": f"i.raw - {_EXTRA_KEYS}",
}
_OPEN_VERSIONS = f"""{_VERSION_INSERT}
SELECT i.region_id, i.image_id, m.moment, 'infinity',
       {", ".join(_VERSION_VALUES.get(f, "i." + f) for f in TRACKED_FIELDS)}
  FROM stage_moments m
  JOIN inventory.images i ON i.region_id = :region AND i.image_id = m.image_id
 WHERE i.removed_at IS NULL
"""

# Only after a complete partition: listed before, in neither listing now.
_GONE_FROM_CATALOGUE = """
    -- First the (usually few) missing ids, then their documents: built the other way
    -- round, every listed image's document was built and thrown away.
    SELECT i.image_id
      FROM inventory.images i
     WHERE i.region_id = :region AND i.image_source = :source AND i.removed_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM stage_images s WHERE s.image_id = i.image_id)
       AND NOT EXISTS (SELECT 1 FROM stage_seen u WHERE u.image_id = i.image_id)
       AND NOT i.image_id = ANY(CAST(:keep AS text[]))
"""


def _remove(gone_ids: str) -> str:
    """The statement marking the images ``gone_ids`` selects removed, with their events."""
    return f"""
WITH gone_ids AS MATERIALIZED ({gone_ids}), gone AS (
    SELECT i.image_id, {_doc("i", "od.disks")} AS doc
      FROM gone_ids g
      JOIN inventory.images i ON i.region_id = :region AND i.image_id = g.image_id
      LEFT JOIN LATERAL (
            SELECT {_DISK_DOC} AS disks FROM inventory.image_disks d
             WHERE d.region_id = i.region_id AND d.image_id = i.image_id
      ) od ON true
     WHERE i.removed_at IS NULL
), marked AS (
    UPDATE inventory.images i SET removed_at = now(), last_changed_at = now()
      FROM gone g
     WHERE i.region_id = :region AND i.image_id = g.image_id
    RETURNING i.image_id
), touched AS (
    INSERT INTO stage_touched SELECT image_id FROM marked ON CONFLICT DO NOTHING
)
{_EVENT_INSERT}
SELECT now(), :run_id, :region, g.image_id, :source, 'removed', '{{}}', g.doc, NULL, {_BASELINE}
  FROM gone g JOIN marked m USING (image_id) ORDER BY g.image_id
"""


_REMOVE = _remove(_GONE_FROM_CATALOGUE)

# -- account partitions (DESIGN.md, Accounts) ---------------------------------------------
# An image is one images row however many accounts see it; image_access says which
# account lists it. "Another account" below is one still configured (an account removed
# from the configuration keeps its rows, but no longer keeps an image listed).

_OTHER_ACCESS = """
SELECT 1 FROM inventory.image_access o
 WHERE o.region_id = :region AND o.image_id = {image_id} AND o.account <> :account
   AND o.removed_at IS NULL {extra}
   AND NOT EXISTS (SELECT 1 FROM inventory.accounts a
                    WHERE a.account = o.account AND NOT a.configured)
"""

# A shared listing of an image that another configured account owns (lists as private)
# says nothing about its content: the owner's listing does. It only grants access.
_ACCESS_ONLY = f"""
CREATE TEMP TABLE stage_access_only ON COMMIT DROP AS
SELECT s.image_id FROM (SELECT image_id FROM stage_images UNION SELECT image_id FROM stage_seen) s
 WHERE :source = 'shared'
   AND EXISTS ({_OTHER_ACCESS.format(image_id="s.image_id", extra="AND o.image_source = 'private'")})
"""
_ADOPTED = """
INSERT INTO stage_adopted (image_id)
SELECT s.image_id FROM stage_images s
 WHERE :source = 'private'
   AND EXISTS (SELECT 1 FROM inventory.images i
                WHERE i.region_id = :region AND i.image_id = s.image_id
                  AND i.removed_at IS NULL)
   AND NOT EXISTS (SELECT 1 FROM inventory.image_access x
                    WHERE x.region_id = :region AND x.image_id = s.image_id
                      AND x.image_source = 'private' AND x.removed_at IS NULL)
"""
_DROP_ACCESS_ONLY = (
    "DELETE FROM stage_images s USING stage_access_only a WHERE s.image_id = a.image_id",
    "DELETE FROM stage_disks s USING stage_access_only a WHERE s.image_id = a.image_id",
    "DELETE FROM stage_seen s USING stage_access_only a WHERE s.image_id = a.image_id",
)
# Keyed, and stage_diff indexed, before the statements below probe them:
# the driver's generic plans guess a handful of access rows and probe staging once per
# row, so without an index the anti-join of a 40,000-image partition against its
# 40,000 listed ids ran for over two minutes (make bench, full sync 85 s -> 200 s).
_LISTED = (
    "CREATE TEMP TABLE stage_listed (image_id text PRIMARY KEY) ON COMMIT DROP",
    """INSERT INTO stage_listed
SELECT image_id FROM stage_images UNION SELECT image_id FROM stage_seen
 UNION SELECT image_id FROM stage_access_only""",
    "CREATE INDEX ON stage_diff (image_id)",
    "ANALYZE stage_listed",
)
_ACCESS_GRANTED = f"""{_EVENT_INSERT}
SELECT now(), :run_id, :region, l.image_id, :source, 'access_granted', '{{}}', NULL, NULL,
       {_BASELINE}
  FROM stage_listed l
 WHERE NOT EXISTS (SELECT 1 FROM stage_diff d
                    WHERE d.image_id = l.image_id AND d.kind IN ('new', 'back'))
   AND NOT EXISTS (SELECT 1 FROM inventory.image_access x
                    WHERE x.account = :account AND x.region_id = :region
                      AND x.image_id = l.image_id AND x.removed_at IS NULL)
   AND EXISTS ({_OTHER_ACCESS.format(image_id="l.image_id", extra="")})
 ORDER BY l.image_id"""
# Only the rows that are new or differ: ON CONFLICT locks (writes) every conflicting row,
# even one its WHERE leaves alone, so a resync offering every listed id rewrote them all.
_UPSERT_ACCESS = """
INSERT INTO inventory.image_access
       (account, region_id, image_id, image_source, first_seen_at, removed_at)
SELECT :account, :region, l.image_id, :source, now(), NULL FROM stage_listed l
 WHERE NOT EXISTS (SELECT 1 FROM inventory.image_access x
                    WHERE x.account = :account AND x.region_id = :region
                      AND x.image_id = l.image_id AND x.removed_at IS NULL
                      AND x.image_source = :source)
ON CONFLICT (account, region_id, image_id) DO UPDATE
   SET image_source = EXCLUDED.image_source, removed_at = NULL
 WHERE image_access.removed_at IS NOT NULL
    OR image_access.image_source <> EXCLUDED.image_source
"""
# After a complete listing: the account's access to what it no longer lists ends; where
# another account still lists the image that is access_revoked, else the image is gone.
_GONE_FROM_ACCOUNT = f"""
CREATE TEMP TABLE stage_gone ON COMMIT DROP AS
SELECT x.image_id,
       EXISTS ({_OTHER_ACCESS.format(image_id="x.image_id", extra="")}) AS elsewhere
  FROM inventory.image_access x
 WHERE x.account = :account AND x.region_id = :region AND x.image_source = :source
   AND x.removed_at IS NULL
   AND NOT EXISTS (SELECT 1 FROM stage_listed l WHERE l.image_id = x.image_id)
   AND NOT x.image_id = ANY(CAST(:keep AS text[]))
"""
_END_ACCESS = """
UPDATE inventory.image_access x SET removed_at = now()
  FROM stage_gone g
 WHERE x.account = :account AND x.region_id = :region AND x.image_id = g.image_id
"""
_ACCESS_REVOKED = f"""{_EVENT_INSERT}
SELECT now(), :run_id, :region, g.image_id, :source, 'access_revoked', '{{}}', NULL, NULL,
       {_BASELINE}
  FROM stage_gone g WHERE g.elsewhere ORDER BY g.image_id"""
_REMOVE_LAST_ACCESS = _remove("SELECT image_id FROM stage_gone WHERE NOT elsewhere")
# images.image_source of an image seen through accounts: private while a configured
# account lists it as private, else shared. Rewritten only where it differs.
_SOURCE_BY_ACCESS = """
WITH moved AS (
UPDATE inventory.images i SET image_source = t.source
  FROM (SELECT l.image_id,
               CASE WHEN EXISTS (SELECT 1 FROM inventory.image_access p
                                  WHERE p.region_id = :region AND p.image_id = l.image_id
                                    AND p.image_source = 'private' AND p.removed_at IS NULL
                                    AND NOT EXISTS (SELECT 1 FROM inventory.accounts a
                                                     WHERE a.account = p.account
                                                       AND NOT a.configured))
                    THEN 'private' ELSE 'shared' END AS source
          FROM (SELECT image_id FROM stage_listed UNION SELECT image_id FROM stage_gone) l) t
 WHERE i.region_id = :region AND i.image_id = t.image_id AND i.removed_at IS NULL
   AND i.image_source IN ('private', 'shared') AND i.image_source <> t.source
RETURNING i.image_id
)
INSERT INTO stage_touched SELECT image_id FROM moved ON CONFLICT DO NOTHING
"""
_NOTHING_GONE = "CREATE TEMP TABLE stage_gone (image_id text, elsewhere boolean) ON COMMIT DROP"
_ACCOUNT_LISTED = """
SELECT x.image_id
  FROM inventory.image_access x
  JOIN inventory.images i ON i.region_id = x.region_id AND i.image_id = x.image_id
 WHERE x.account = :account AND x.region_id = :region AND x.image_source = :source
   AND x.removed_at IS NULL AND i.removed_at IS NULL
"""
# Of one page's (id, hash) pairs, those stored with that hash: one primary-key lookup per
# id, each a LATERAL with a LIMIT so the planner cannot flatten it. Flattened, the
# driver's generic plans scanned the partition (as a join: 80 ms a page at 400,000
# images) or hashed all the account's access rows of the region (as an EXISTS: 37 ms a
# page at 40,000, 31 s of PostgreSQL CPU in a no-change resync of make bench).
_UNCHANGED = """
SELECT u.image_id
  FROM unnest(CAST(:ids AS text[]), CAST(:hashes AS bytea[])) AS u(image_id, h)
 CROSS JOIN LATERAL (
       SELECT i.image_source, i.content_hash FROM inventory.images i
        WHERE i.region_id = :region AND i.image_id = u.image_id AND i.removed_at IS NULL
        LIMIT 1) i {access}
 WHERE i.content_hash = u.h {source}
"""
_CATALOGUE_UNCHANGED = _UNCHANGED.format(access="", source="AND i.image_source = :source")
_ACCOUNT_UNCHANGED = _UNCHANGED.format(
    access="""
 CROSS JOIN LATERAL (
       SELECT 1 FROM inventory.image_access x
        WHERE x.account = :account AND x.region_id = :region AND x.image_id = u.image_id
          AND x.image_source = :source AND x.removed_at IS NULL LIMIT 1) x""",
    source="",
)


@dataclass(frozen=True, slots=True)
class MergeCounts:
    """What one partition's merge wrote."""

    images_seen: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    went_offline: int = 0
    came_online: int = 0
    removed: int = 0
    reappeared: int = 0
    access_granted: int = 0
    access_revoked: int = 0

    def events(self) -> dict[str, int]:
        """Events written, by type."""
        return {name: getattr(self, name) for name in EVENT_TYPES}


class PartitionWriter:
    """Staging and merge of one partition, inside its caller's open transaction."""

    def __init__(
        self, conn: AsyncConnection, *, region: str, source: str, account: str = ""
    ) -> None:
        self._conn = conn
        self.region = region
        self.source = source
        self.account = account
        """The account of an account partition; ``""``: a catalogue partition (or a
        caller that names no account), merged by the image's source alone."""
        self._driver: Any = None
        self._listings: set[int] = set()  # listings that staged anything
        self._extras = False  # stage_extras called: the partition's extras were fetched

    async def try_lock(self) -> bool:
        """Take the partition's transaction-scoped advisory lock; False if another holds it."""
        locked = await self._conn.scalar(
            sa.text("SELECT pg_try_advisory_xact_lock(:space, :key)"),
            {
                "space": PARTITION_LOCK_SPACE,
                "key": partition_lock_key(self.region, self.source, self.account),
            },
        )
        return bool(locked)

    async def succeeded_within(self, seconds: float) -> bool:
        """True when the partition's last success finished less than ``seconds`` ago."""
        return bool(
            await self._conn.scalar(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM inventory.sync_partitions"
                    " WHERE region_id = :region AND image_source = :source"
                    " AND coalesce(account, '') = :account AND status = 'succeeded'"
                    " AND finished_at > clock_timestamp() - make_interval(secs => :seconds))"
                ),
                {
                    "region": self.region,
                    "source": self.source,
                    "account": self.account,
                    "seconds": seconds,
                },
            )
        )

    async def open(self) -> None:
        # This writer keeps image_versions in step (migration 0007's guard on images).
        await self._conn.execute(sa.text(f"SET LOCAL {WRITES_VERSIONS} = 'on'"))
        for statement in (*_CREATE_STAGING, _CREATE_ADOPTED, _CREATE_TOUCHED, _CREATE_INSERTED):
            await self._conn.execute(sa.text(statement))
        raw = await self._conn.get_raw_connection()
        self._driver = raw.driver_connection

    async def _copy(
        self, table: str, records: Iterable[tuple[Any, ...]], columns: Sequence[str]
    ) -> None:
        """Binary COPY into a staging table through the driver connection (SQLAlchemy has
        no COPY), whose errors are the driver's own: translated here, like SQLAlchemy's."""
        with database_errors(f"staging {table}"):
            await self._driver.copy_records_to_table(table, records=records, columns=columns)

    async def stage(self, rows: Sequence[ImageRow], listing: int) -> None:
        """COPY one page's rows (already de-duplicated) into staging."""
        if not rows:
            return
        self._listings.add(listing)
        await self._copy(
            "stage_images", [(*image_record(r), listing) for r in rows], _STAGE_IMAGE_COLUMNS
        )
        disks = [(r.image_id, *disk_record(d), listing) for r in rows for d in r.disks]
        if disks:
            await self._copy("stage_disks", disks, _STAGE_DISK_COLUMNS)

    def _listed_ids(self) -> str:
        """SQL selecting the ids of the partition's listed images: a catalogue
        partition's by source, an account partition's through its access rows."""
        if self.account:
            return _ACCOUNT_LISTED
        return (
            "SELECT image_id FROM inventory.images"
            " WHERE region_id = :region AND image_source = :source AND removed_at IS NULL"
        )

    def _params(self, **more: Any) -> dict[str, Any]:
        return {"region": self.region, "source": self.source, "account": self.account, **more}

    async def has_listed(self) -> bool:
        """Whether the partition has listed images stored (a resync, not a first sync)."""
        statement = f"SELECT EXISTS ({self._listed_ids()})"
        return bool(await self._conn.scalar(sa.text(statement), self._params()))

    async def unchanged_of(self, image_ids: Sequence[str], hashes: Sequence[bytes]) -> set[str]:
        """Of these ``(image_id, content hash)`` pairs (one page), the ids the partition
        lists with that very hash: a resync recognises them before normalising them.
        Asked page by page, so the stored hashes are never all in memory at once."""
        if not image_ids:
            return set()
        result = await self._conn.execute(
            sa.text(_ACCOUNT_UNCHANGED if self.account else _CATALOGUE_UNCHANGED),
            self._params(ids=list(image_ids), hashes=list(hashes)),
        )
        return set(result.scalars().all())

    async def unstaged_listed(self) -> list[str]:
        """The partition's listed images that no listing staged (in full or as seen): what
        a complete merge would remove (or, for an account, whose access would end)."""
        # EXCEPT (hashed or sorted), not NOT EXISTS: staging has no index or statistics
        # yet, and the anti-join became a nested loop over it.
        statement = (
            f"SELECT image_id FROM ({self._listed_ids()}"
            " EXCEPT SELECT image_id FROM stage_images"
            " EXCEPT SELECT image_id FROM stage_seen) gone ORDER BY image_id"
        )
        result = await self._conn.execute(sa.text(statement), self._params())
        return list(result.scalars().all())

    async def stage_unchanged(self, image_ids: Sequence[str], listing: int) -> None:
        """Record images listed again with their stored content hash: seen, not rewritten."""
        if image_ids:
            self._listings.add(listing)
            await self._copy(
                "stage_seen",
                [(image_id, listing) for image_id in image_ids],
                ("image_id", "listing"),
            )

    async def stage_extras(self, extras: Sequence[ImageExtras]) -> None:
        """COPY what describeImageMembers / describeImageConstraintsBatch said about the
        partition's images (only those with something to say: the others are null).
        Called once per partition whose source has extras, even with nothing to stage:
        then stored extras of images without any now are cleared."""
        self._extras = True
        if extras:
            await self._copy("stage_extras", [e.record() for e in extras], _STAGE_EXTRA_COLUMNS)

    async def stored_extras(self, image_ids: Sequence[str]) -> list[ImageExtras]:
        """The stored shares and constraints of these images (those that have any)."""
        if not image_ids:
            return []
        result = await self._conn.execute(
            sa.text(
                f"SELECT image_id, {', '.join(EXTRA_COLUMNS)} FROM inventory.images"
                " WHERE region_id = :region AND image_id = ANY(CAST(:ids AS text[]))"
                f" AND ({' OR '.join(f'{c} IS NOT NULL' for c in EXTRA_COLUMNS)})"
            ),
            {"region": self.region, "ids": list(image_ids)},
        )
        return [
            ImageExtras(
                image_id,
                None if shared is None else tuple(shared),
                kind,
                None if types is None else tuple(types),
            )
            for image_id, shared, kind, types in result.all()
        ]

    async def discard_listing(self, listing: int) -> None:
        """Forget what one listing staged (it is about to be listed again)."""
        await self._conn.execute(
            sa.text("DELETE FROM stage_images WHERE listing = :l"), {"l": listing}
        )
        await self._conn.execute(
            sa.text("DELETE FROM stage_disks WHERE listing = :l"), {"l": listing}
        )
        await self._conn.execute(
            sa.text("DELETE FROM stage_seen WHERE listing = :l"), {"l": listing}
        )

    async def merge(
        self, *, run_id: int, remove_missing: bool, keep_ids: Sequence[str] = ()
    ) -> MergeCounts:
        """Write what changed; mark missing images removed when ``remove_missing``.

        ``keep_ids`` are images the API listed but that failed validation: they are
        neither updated nor removed.
        """
        params: dict[str, Any] = {
            "region": self.region,
            "source": self.source,
            "run_id": run_id,
            "account": self.account or None,
        }
        conn = self._conn
        # The first successful sync of a partition records the initial load: its events
        # are `baseline` (the images existed before the service watched them). Only a
        # complete merge becomes a success; the partition's lock keeps this stable.
        params["baseline"] = remove_missing and not await conn.scalar(sa.text(_SUCCEEDED), params)
        floor = await event_id_floor(conn)  # for the change feed, below
        await self._prepare_staging()
        if self._extras:
            await self._apply_extras(params)
        seen = await conn.scalar(sa.text(_COUNT_SEEN)) or 0
        if self.account:
            await self._take_account_turn(params)
        counts, changed = await self._write_changes(params)
        removed = granted = revoked = 0
        if self.account:
            granted, revoked, removed = await self._merge_access(
                {**params, "keep": list(keep_ids)}, remove_missing
            )
        elif remove_missing:
            removed = (
                await conn.execute(sa.text(_REMOVE), {**params, "keep": list(keep_ids)})
            ).rowcount
        await self._follow_versions(params)
        merged = MergeCounts(
            images_seen=seen,
            created=counts["created"],
            updated=counts["updated"],
            unchanged=seen - changed,
            went_offline=counts["went_offline"],
            came_online=counts["came_online"],
            removed=removed,
            reappeared=counts["reappeared"],
            access_granted=granted,
            access_revoked=revoked,
        )
        # Last: the feed clock's row lock is held to the commit (service.store.feed).
        await record_batch(
            conn,
            run_id=run_id,
            region=self.region,
            source=self.source,
            counts=merged.events(),
            floor=floor,
            account=self.account or None,
        )
        return merged

    async def _write_changes(self, params: dict[str, Any]) -> tuple[dict[str, int], int]:
        """Classify staging against the table; write the events and the changed images
        and disks. Returns the events written by type and the images changed."""
        conn = self._conn
        await conn.execute(sa.text(_CLASSIFY), params)
        await conn.execute(sa.text(_DIFF))
        await conn.execute(sa.text(_INSERT_NEW_IMAGES), params)
        counts: dict[str, int] = {}
        for event_type, statement in _EVENTS.items():
            result = await conn.execute(sa.text(statement), params)
            counts[event_type] = result.rowcount
        changed = await conn.scalar(sa.text("SELECT count(*) FROM stage_diff")) or 0
        if changed:
            await conn.execute(sa.text(_UPSERT_IMAGES), params)
            await conn.execute(sa.text(_DELETE_DISKS), params)
            await conn.execute(sa.text(_INSERT_DISKS), params)
            await conn.execute(sa.text(_TOUCH_CHANGED))
        return counts, changed

    async def _follow_versions(self, params: dict[str, Any]) -> None:
        """Close the current version of every image this merge wrote and open one from
        its row as written (none for a removed image)."""
        conn = self._conn
        if await conn.scalar(sa.text("SELECT EXISTS (SELECT 1 FROM stage_touched)")):
            await conn.execute(sa.text(_CLOSE_VERSIONS), params)
            await conn.execute(sa.text(_OPEN_VERSIONS), params)

    async def _take_account_turn(self, params: dict[str, Any]) -> None:
        """Wait for the region's other account merges (they may hold the same images),
        then set aside the shared images another configured account owns."""
        conn = self._conn
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": ACCOUNT_MERGE_LOCK_SPACE, "key": account_merge_lock_key(self.region)},
        )
        await conn.execute(sa.text(_ACCESS_ONLY), params)
        for statement in _DROP_ACCESS_ONLY:
            await conn.execute(sa.text(statement))
        await conn.execute(sa.text(_ADOPTED), params)

    async def _merge_access(
        self, params: dict[str, Any], remove_missing: bool
    ) -> tuple[int, int, int]:
        """The account's access rows after its listing: (access_granted, access_revoked,
        removed) events written."""
        conn = self._conn
        for statement in _LISTED:
            await conn.execute(sa.text(statement))
        granted = (await conn.execute(sa.text(_ACCESS_GRANTED), params)).rowcount
        await conn.execute(sa.text(_UPSERT_ACCESS), params)
        revoked = removed = 0
        if remove_missing:
            await conn.execute(sa.text(_GONE_FROM_ACCOUNT), params)
            await conn.execute(sa.text(_END_ACCESS), params)
            revoked = (await conn.execute(sa.text(_ACCESS_REVOKED), params)).rowcount
            removed = (await conn.execute(sa.text(_REMOVE_LAST_ACCESS), params)).rowcount
        else:
            await conn.execute(sa.text(_NOTHING_GONE))
        await conn.execute(sa.text(_SOURCE_BY_ACCESS), params)
        return granted, revoked, removed

    async def _prepare_staging(self) -> None:
        """Index staging, keep one copy of an image staged by both listings, and gather
        the statistics the merge's plans need."""
        conn = self._conn
        await conn.execute(sa.text("CREATE INDEX ON stage_images (image_id)"))
        await conn.execute(sa.text("CREATE INDEX ON stage_disks (image_id)"))
        await conn.execute(sa.text("CREATE INDEX ON stage_seen (image_id)"))
        if len(self._listings) > 1:
            # An image that moved between the online and offline listings while they
            # were read can be in both: keep one (the offline listing's), never two.
            # (Within one listing the process staged each image once.)
            await conn.execute(sa.text(_DEDUPE_IMAGES))
            await conn.execute(sa.text(_DEDUPE_UNCHANGED))
            await conn.execute(sa.text(_DEDUPE_DISKS))
        # Statistics of the join keys only, from a small sample: a full one reads the
        # whole staging table (bench/README.md, "Constants and their numbers").
        await conn.execute(sa.text("SET LOCAL default_statistics_target = 10"))
        await conn.execute(sa.text("ANALYZE stage_seen"))
        await conn.execute(sa.text("ANALYZE stage_images (image_id, listing)"))
        await conn.execute(sa.text("ANALYZE stage_disks (image_id, listing)"))

    async def _apply_extras(self, params: dict[str, Any]) -> None:
        conn = self._conn
        await conn.execute(sa.text(_PROMOTE_SEEN), params)
        if await conn.scalar(sa.text("SELECT count(*) FROM stage_promoted")):
            await conn.execute(sa.text(_PROMOTE_IMAGES), params)
            await conn.execute(sa.text(_PROMOTE_DISKS), params)
            await conn.execute(sa.text(_UNSEE_PROMOTED))
        await conn.execute(sa.text(_SET_EXTRAS))
