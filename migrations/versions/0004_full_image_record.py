"""the full image record: Image fields kept only in raw, shares, instance-type constraints

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Additive. New columns of ``inventory.images`` (appended, each with a COMMENT):

- from the describeImages object: ``login_name``, ``imported``, ``expired_at``,
  ``instance_id``, ``charge_service_code``, ``charge_formula``. Existing rows are
  back-filled from ``raw`` with the service's own parser, so a changed image's
  ``before`` and ``after`` documents agree on them and nothing but the real change is
  an event. The content hash covers ``raw`` alone, so stored hashes stay valid and an
  unchanged image is not rewritten by the next sync;
- from the other APIs: ``shared_with`` (describeImageMembers), ``instance_types_constraint``
  and ``instance_types`` (describeImageConstraintsBatch); null until a sync fetches them.

``current_images`` gains the columns at its end. ``images_as_of()`` is dropped and
created again with the columns appended (a function's result type cannot be changed in
place); for events written before this migration, whose documents kept these API fields
in ``extra``, it reads them from there, so replaying old history gives the columns too.
"""

import importlib
from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from service.normalize import InvalidItem, normalize_image

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v2 = importlib.import_module("migrations.versions.0002_reader_views")
_v3 = importlib.import_module("migrations.versions.0003_configured_partitions")

# name, type, SQL type, comment. The first six come from the describeImages object.
COLUMNS = (
    ("login_name", sa.Text(), "text", "API loginName: the owner's cloud account name."),
    ("imported", sa.Boolean(), "boolean", "API imported: true when the image was imported."),
    (
        "expired_at",
        sa.DateTime(timezone=True),
        "timestamptz",
        "API expiredTime (Beijing time); null: never.",
    ),
    (
        "instance_id",
        sa.Text(),
        "text",
        "API instanceId: the instance the image was made from.",
    ),
    (
        "charge_service_code",
        sa.Text(),
        "text",
        "API chargeInfo.serviceCode (billing resource type).",
    ),
    (
        "charge_formula",
        postgresql.JSONB(),
        "jsonb",
        "API chargeInfo.formula (billing items), as received.",
    ),
    (
        "shared_with",
        postgresql.ARRAY(sa.Text()),
        "text[]",
        "describeImageMembers pins, sorted, for private images shared with specified users; "
        "null when not fetched or not applicable.",
    ),
    (
        "instance_types_constraint",
        sa.Text(),
        "text",
        "describeImageConstraintsBatch constraintsType: includes, excludes; null: none.",
    ),
    (
        "instance_types",
        postgresql.ARRAY(sa.Text()),
        "text[]",
        "describeImageConstraintsBatch instanceTypes the constraint lists; null: none.",
    ),
)
RAW_FIELDS = ("loginName", "imported", "expiredTime", "instanceId", "chargeInfo")
"""API fields that were unknown (kept in ``extra``) before this migration."""

# How images_as_of reads each new column from an event document written before this
# migration, where the API field sat in ``extra``.
_FROM_OLD_EXTRA = {
    "login_name": "s.old -> 'extra' ->> 'loginName'",
    "imported": "CASE WHEN lower(s.old -> 'extra' ->> 'imported') IN ('true', 'false') "
    "THEN (s.old -> 'extra' ->> 'imported')::boolean END",
    "expired_at": "inventory.beijing_time(s.old -> 'extra' ->> 'expiredTime')",
    "instance_id": "s.old -> 'extra' ->> 'instanceId'",
    "charge_service_code": "s.old -> 'extra' -> 'chargeInfo' ->> 'serviceCode'",
    "charge_formula": "nullif(s.old -> 'extra' -> 'chargeInfo' -> 'formula', 'null'::jsonb)",
}

AS_OF_COLUMNS = [*_v2.AS_OF_COLUMNS, *((name, sql_type) for name, _, sql_type, _ in COLUMNS)]
"""images_as_of's result columns from this migration on."""

CURRENT_IMAGES = """
SELECT region_id, image_id, image_source, name, platform, os_version, architecture,
       os_type, status, description, owner_pin, launch_permission, root_device_type,
       snapshot_id, boot_mode, system_disk_size_gb, size_mb, progress, created_at,
       offline, raw, first_seen_at, last_changed_at, {new}
  FROM inventory.images
 WHERE removed_at IS NULL
"""


def upgrade() -> None:
    for name, type_, _, comment in COLUMNS:
        op.add_column("images", sa.Column(name, type_, comment=comment), schema="inventory")
    op.execute(
        "COMMENT ON COLUMN inventory.images.architecture IS "
        "'API architecture: x86_64, arm64 or i386.'"
    )
    _back_fill()
    new = ", ".join(name for name, *_ in COLUMNS)
    op.execute(
        f"CREATE OR REPLACE VIEW inventory.current_images AS {CURRENT_IMAGES.format(new=new)}"
    )
    for name, _, _, comment in COLUMNS:
        op.execute(f"COMMENT ON COLUMN inventory.current_images.{name} IS {_v2._literal(comment)}")
    _images_as_of()


def _back_fill() -> None:
    """Fill the six API columns of the existing rows from ``raw``, with the parser the
    sync uses (so the next sync builds the very same values)."""
    conn = op.get_bind()
    conn.execute(
        sa.text(
            "CREATE TEMP TABLE backfill (region_id text, image_id text, login_name text,"
            " imported boolean, expired_at timestamptz, instance_id text,"
            " charge_service_code text, charge_formula jsonb) ON COMMIT DROP"
        )
    )
    result = conn.execute(
        sa.text(
            "SELECT region_id, image_id, image_source, raw::text FROM inventory.images"
            " WHERE raw ?| CAST(:keys AS text[])"
        ),
        {"keys": list(RAW_FIELDS)},
    )
    insert = sa.text(
        "INSERT INTO backfill VALUES (:region_id, :image_id, :login_name, :imported,"
        " :expired_at, :instance_id, :charge_service_code, CAST(:charge_formula AS jsonb))"
    )
    while batch := result.fetchmany(2000):
        rows = []
        for region_id, image_id, source, raw in batch:
            try:
                row = normalize_image(orjson.loads(raw), region_id=region_id, image_source=source)
            except InvalidItem:
                continue  # stored before a rule got stricter: leave its new columns null
            rows.append(
                {
                    "region_id": region_id,
                    "image_id": image_id,
                    "login_name": row.login_name,
                    "imported": row.imported,
                    "expired_at": row.expired_at,
                    "instance_id": row.instance_id,
                    "charge_service_code": row.charge_service_code,
                    "charge_formula": row.charge_formula,
                }
            )
        if rows:
            conn.execute(insert, rows)
    conn.execute(
        sa.text(
            "UPDATE inventory.images i SET login_name = b.login_name, imported = b.imported,"
            " expired_at = b.expired_at, instance_id = b.instance_id,"
            " charge_service_code = b.charge_service_code, charge_formula = b.charge_formula"
            " FROM backfill b WHERE i.region_id = b.region_id AND i.image_id = b.image_id"
        )
    )


def _images_as_of() -> None:
    op.execute("""
        CREATE FUNCTION inventory.beijing_time(value text) RETURNS timestamptz
        LANGUAGE sql IMMUTABLE AS $fn$
        SELECT CASE
          WHEN value IS NULL OR value = '' THEN NULL
          WHEN value ~ '(Z|[+-][0-9]{2}(:?[0-9]{2})?)$' THEN value::timestamptz
          ELSE value::timestamp AT TIME ZONE 'Asia/Shanghai' END
        $fn$""")
    op.execute(
        "COMMENT ON FUNCTION inventory.beijing_time(text) IS "
        "'An API time (createTime, expiredTime): Beijing time unless it names a zone; "
        "null when empty. Used by images_as_of for events older than migration 0004.'"
    )
    # Events before this moment kept the API fields in extra; a later event names the
    # column itself whenever it changes (and created/reappeared carry every column).
    cutoff = op.get_bind().scalar(sa.text("SELECT now()::text"))
    _create_as_of(AS_OF_COLUMNS, ",\n               ".join(as_of_fields()), _literal_time(cutoff))
    op.execute(f"COMMENT ON FUNCTION inventory.images_as_of(timestamptz) IS {AS_OF_COMMENT}")
    op.execute("GRANT EXECUTE ON FUNCTION inventory.beijing_time(text) TO inventory_reader")


AS_OF_COMMENT = (
    "'The catalogue as it stood at ts, rebuilt from image_events: one row per image "
    "listed then, with its disks and unknown API fields (extra) as jsonb, and its "
    "shares and instance-type constraints as last recorded.'"
)


def as_of_fields() -> list[str]:
    """images_as_of's column expressions (after region_id, image_id) from ``s.doc``, the
    image's merged event documents, and ``s.old``, the merged ``extra`` of its events
    before this migration (0007 builds its versions with them too)."""
    fields = [
        _v2._as_of_select().replace(
            "s.doc -> 'extra'",
            f"(s.doc -> 'extra') - ARRAY[{', '.join(repr(k) for k in RAW_FIELDS)}]::text[]",
        )
    ]
    for name, _, sql_type, _ in COLUMNS:
        if sql_type == "jsonb":
            value = f"nullif(s.doc -> '{name}', 'null'::jsonb)"
        elif sql_type == "text[]":
            value = (
                f"CASE WHEN jsonb_typeof(s.doc -> '{name}') = 'array' THEN ARRAY("
                f"SELECT jsonb_array_elements_text(s.doc -> '{name}')) END"
            )
        else:
            value = f"(s.doc ->> '{name}')::{sql_type}"
        old = _FROM_OLD_EXTRA.get(name)
        fields.append(f"CASE WHEN s.doc ? '{name}' THEN {value} ELSE {old} END" if old else value)
    return fields


def _literal_time(value: str) -> str:
    return f"{_v2._literal(value)}::timestamptz"


def _create_as_of(columns: Sequence[tuple[str, str]], fields: str, cutoff: str) -> None:
    returns = ", ".join(f"{n} {t}" for n, t in columns)
    op.execute("DROP FUNCTION inventory.images_as_of(timestamptz)")
    _v3.create_as_of(returns, _v2_body(cutoff).replace("{fields}", fields), verb="CREATE")
    op.execute("GRANT EXECUTE ON FUNCTION inventory.images_as_of(timestamptz) TO inventory_reader")


def _v2_body(cutoff: str) -> str:
    """The body of 0002's images_as_of with a ``{fields}`` slot for the column list, and
    ``s.old``: the ``extra`` of the image's events before ``cutoff``, merged."""
    return f"""
        WITH ev AS (
            SELECT e.region_id, e.image_id, e.event_id, e.event_type, e.after, e.occurred_at
              FROM inventory.image_events e
             WHERE e.occurred_at <= ts
        ), last AS (
            SELECT DISTINCT ON (region_id, image_id) region_id, image_id, event_type
              FROM ev
             ORDER BY region_id, image_id, event_id DESC
        ), s AS (
            SELECT region_id, image_id,
                   inventory.jsonb_merge_agg(after ORDER BY event_id) AS doc,
                   inventory.jsonb_merge_agg(
                       jsonb_build_object('extra', after -> 'extra') ORDER BY event_id
                   ) FILTER (WHERE occurred_at < {cutoff} AND after ? 'extra') AS old
              FROM ev
             WHERE after IS NOT NULL
             GROUP BY region_id, image_id
        )
        SELECT s.region_id, s.image_id,
               {{fields}}
          FROM s
          JOIN last l USING (region_id, image_id)
         WHERE l.event_type <> 'removed'
        """


def downgrade() -> None:
    op.execute("DROP VIEW inventory.current_images")
    comment, body, _ = _v2.VIEWS["current_images"]
    op.execute(f"CREATE VIEW inventory.current_images AS {body}")
    op.execute(f"COMMENT ON VIEW inventory.current_images IS {_v2._literal(comment)}")
    op.execute("GRANT SELECT ON inventory.current_images TO inventory_reader")
    _create_as_of(_v2.AS_OF_COLUMNS, _v2._as_of_select(), "'-infinity'::timestamptz")
    op.execute("DROP FUNCTION inventory.beijing_time(text)")
    for name, *_ in reversed(COLUMNS):
        op.drop_column("images", name, schema="inventory")
