"""One column list for images and disks: ImageRow/DiskRow's fields, the COPY records,
the staging tables and ``service.store.tables`` must agree. Pure (no database)."""

from __future__ import annotations

from dataclasses import fields

from service.normalize import (
    DISK_COLUMNS,
    EXTRA_COLUMNS,
    IMAGE_COLUMNS,
    DiskRow,
    ImageRow,
    disk_record,
    image_record,
    normalize_image,
)
from service.store import apply
from service.store.tables import image_disks, images

BOOKKEEPING = ("raw", "first_seen_at", "last_changed_at", "removed_at")
"""Columns of inventory.images that the store fills, not describeImages."""

ITEM = {
    "imageId": "img-columns01",
    "name": "n",
    "platform": "Ubuntu",
    "osVersion": "22.04",
    "createTime": "2024-01-02 03:04:05",
    "systemDisk": {"diskCategory": "cloud", "deviceName": "vda"},
    "dataDisks": [{"diskCategory": "local", "deviceName": "vdb"}],
}


def test_the_images_table_has_exactly_the_row_columns_and_the_bookkeeping() -> None:
    in_table = [c.name for c in images.columns]
    expected = {*IMAGE_COLUMNS, *EXTRA_COLUMNS, *BOOKKEEPING}
    assert set(in_table) == expected, (
        f"only in tables.py: {sorted(set(in_table) - expected)}; "
        f"only in ImageRow/EXTRA_COLUMNS: {sorted(expected - set(in_table))}"
    )


def test_the_disks_table_is_the_image_key_then_the_disk_row_fields_in_order() -> None:
    assert tuple(c.name for c in image_disks.columns) == ("region_id", "image_id", *DISK_COLUMNS)


def test_records_follow_the_dataclass_fields() -> None:
    row = normalize_image(ITEM, region_id="cn-north-1", image_source="public")
    described = [f.name for f in fields(ImageRow) if f.name not in ("raw_json", "disks")]
    assert list(IMAGE_COLUMNS) == described
    assert image_record(row) == (*(getattr(row, name) for name in described), row.raw_json)
    assert len(row.disks) == 2
    for disk in row.disks:
        assert disk_record(disk) == tuple(getattr(disk, f.name) for f in fields(DiskRow))


def test_staging_tables_are_typed_from_the_tables() -> None:
    stage_images, stage_extras, stage_seen, stage_disks = apply._CREATE_STAGING
    for name in (*IMAGE_COLUMNS, *EXTRA_COLUMNS, "raw"):
        assert f"{apply._PG.identifier_preparer.quote(name)} " in stage_images, name
    assert len(apply._STAGE_IMAGE_COLUMNS) == len(image_record(
        normalize_image(ITEM, region_id="cn-north-1", image_source="public")
    )) + 1  # + listing  # fmt: skip
    assert "system_disk_size_gb integer" in stage_images
    assert "created_at timestamp with time zone" in stage_images
    assert "instance_types text[]" in stage_images and "instance_types text[]" in stage_extras
    assert "position smallint" in stage_disks and "cloud_iops integer" in stage_disks
    assert stage_seen.startswith("CREATE TEMP TABLE stage_seen (image_id text, listing smallint)")
