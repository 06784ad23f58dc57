"""describeImages items -> typed rows (pure functions, no I/O).

The API boundary: every item is parsed and validated once, here. An item that cannot
be trusted (no ``imageId``, a wrong type, a negative size, a NUL character, an absurd
size) raises :class:`InvalidItem`; the caller counts and reports it and keeps the
other items. Unknown fields are kept in ``raw``.

``createTime`` and ``expiredTime`` are Beijing time (UTC+8) without a zone; they become
aware datetimes. ``chargeInfo`` (the SDK's ``ImageChargeInfo``) gives
``charge_service_code`` and ``charge_formula``; the deprecated top-level ``serviceCode``
stays in ``raw`` only.

Shares (``shared_with``) and instance-type constraints come from other APIs
(describeImageMembers, describeImageConstraintsBatch): :class:`ImageExtras`, parsed by
the client and joined to the rows by the store. They are not part of the content hash,
which covers the describeImages object alone.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
MAX_ITEM_BYTES = 256 * 1024
"""An image object larger than this is rejected: no real image comes near it."""

KNOWN_FIELDS = frozenset(
    {
        "imageId", "name", "platform", "osVersion", "architecture", "systemDiskSizeGB",
        "imageSource", "osType", "status", "createTime", "sizeMB", "desc", "ownerPin",
        "launchPermission", "systemDisk", "dataDisks", "snapshotId", "rootDeviceType",
        "progress", "offline", "bootMode", "loginName", "imported", "expiredTime",
        "instanceId", "chargeInfo",
    }
)  # fmt: skip
"""Fields describeImages documents; the others are kept in ``raw`` only."""


class InvalidItem(ValueError):
    """An API item that fails validation. ``image_id`` is set when the item had one."""

    def __init__(self, reason: str, image_id: str | None = None) -> None:
        self.reason = reason
        self.image_id = image_id
        super().__init__(f"{image_id or '<no imageId>'}: {reason}")


@dataclass(frozen=True, slots=True)
class DiskRow:
    """One row of ``inventory.image_disks`` (without the image key)."""

    position: int
    role: str
    device_name: str | None
    disk_category: str | None
    auto_delete: bool | None
    cloud_disk_type: str | None
    cloud_disk_size_gb: int | None
    cloud_iops: int | None
    cloud_snapshot_id: str | None
    cloud_encrypted: bool | None
    local_disk_type: str | None
    local_disk_size_gb: int | None


@dataclass(frozen=True, slots=True)
class ImageRow:
    """One row of ``inventory.images`` as the API describes it, with its disks.

    ``raw_json`` is the item serialised with sorted keys (the ``raw`` column) and
    ``content_hash`` its BLAKE2b-128 digest together with the source: equal hashes
    mean nothing about the image changed.
    """

    region_id: str
    image_id: str
    image_source: str
    name: str | None
    platform: str | None
    os_version: str | None
    architecture: str | None
    os_type: str | None
    status: str | None
    description: str | None
    owner_pin: str | None
    launch_permission: str | None
    root_device_type: str | None
    snapshot_id: str | None
    boot_mode: str | None
    system_disk_size_gb: int | None
    size_mb: int | None
    progress: int | None
    created_at: datetime | None
    offline: bool | None
    login_name: str | None
    imported: bool | None
    expired_at: datetime | None
    instance_id: str | None
    charge_service_code: str | None
    charge_formula: str | None
    """``chargeInfo.formula`` serialised as JSON (the ``charge_formula`` jsonb column)."""
    raw_json: str
    content_hash: bytes
    disks: tuple[DiskRow, ...]


# The one list of the images' and disks' columns: the fields of ImageRow and DiskRow.
# The COPY records below, the staging tables (service.store.apply, typed from
# service.store.tables) and the merge's statements are built from these names;
# tests/test_columns.py fails when inventory.images or inventory.image_disks drifts
# from them.
IMAGE_COLUMNS: tuple[str, ...] = tuple(
    f for f in ImageRow.__slots__ if f not in ("raw_json", "disks")
)
"""The columns of ``inventory.images`` that describeImages fills, in ImageRow's order."""
DISK_COLUMNS: tuple[str, ...] = DiskRow.__slots__
"""The columns of ``inventory.image_disks`` after the image key, in DiskRow's order."""
_image_record = operator.attrgetter(*IMAGE_COLUMNS, "raw_json")
_disk_record = operator.attrgetter(*DISK_COLUMNS)

TRACKED_FIELDS: tuple[str, ...] = (
    "image_source", "name", "platform", "os_version", "architecture", "os_type", "status",
    "description", "owner_pin", "launch_permission", "root_device_type", "snapshot_id",
    "boot_mode", "system_disk_size_gb", "size_mb", "progress", "created_at", "offline",
    "disks", "extra", "login_name", "imported", "expired_at", "instance_id",
    "charge_service_code", "charge_formula", "shared_with", "instance_types_constraint",
    "instance_types",
)  # fmt: skip
"""The fields of an image's history document (events, ``images_as_of``): every column
that describes the image, its disks as a JSON array, ``extra``, the unknown API
fields, and the extras from the other APIs. A change to any of them is an event."""

EXTRA_COLUMNS = ("shared_with", "instance_types_constraint", "instance_types")
"""Columns filled from describeImageMembers / describeImageConstraintsBatch."""


@dataclass(frozen=True, slots=True)
class ImageExtras:
    """What the other image APIs say about one image (None: not fetched / not applicable).

    ``shared_with`` is the sorted pins of describeImageMembers;
    ``instance_types_constraint`` is ``includes`` or ``excludes`` and
    ``instance_types`` its list, from describeImageConstraintsBatch.
    """

    image_id: str
    shared_with: tuple[str, ...] | None = None
    instance_types_constraint: str | None = None
    instance_types: tuple[str, ...] | None = None

    def record(self) -> tuple[Any, ...]:
        """The row for COPY into staging (lists as lists, for text[])."""
        return (
            self.image_id,
            None if self.shared_with is None else list(self.shared_with),
            self.instance_types_constraint,
            None if self.instance_types is None else list(self.instance_types),
        )


def _text(item: dict[str, Any], key: str, image_id: str | None) -> str | None:
    value = item.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise InvalidItem(f"{key} should be a string, got {type(value).__name__}", image_id)


def _int(item: dict[str, Any], key: str, image_id: str | None) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidItem(f"{key} should be an integer, got a boolean", image_id)
    if isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.strip().lstrip("-").isdigit()
    ):
        number = int(value)
    elif isinstance(value, str) and not value.strip():
        return None
    else:
        raise InvalidItem(f"{key} should be an integer, got {value!r:.40}", image_id)
    if not 0 <= number <= 2_147_483_647:
        raise InvalidItem(f"{key} out of range: {number}", image_id)
    return number


def _bool(item: dict[str, Any], key: str, image_id: str | None) -> bool | None:
    value = item.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidItem(f"{key} should be a boolean, got {value!r:.40}", image_id)


def _object(item: dict[str, Any], key: str, image_id: str | None) -> dict[str, Any] | None:
    value = item.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise InvalidItem(f"{key} should be an object, got {type(value).__name__}", image_id)


def parse_create_time(
    value: str | None, image_id: str | None = None, field: str = "createTime"
) -> datetime | None:
    """``2020-08-21 11:36:36`` (Beijing time) -> aware datetime; also accepts ISO 8601.
    ``field`` names the API field in the error (``expiredTime`` is read the same way)."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidItem(f"{field} is not a time: {value!r:.40}", image_id) from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=BEIJING)
    # 0001-01-01 in Beijing is year 0 in UTC, and the driver writes the first and last
    # representable moments as -infinity/infinity: neither is a creation time.
    if not _FIRST_MOMENT < parsed < _LAST_MOMENT:
        raise InvalidItem(f"{field} out of range: {value!r:.40}", image_id)
    return parsed


_FIRST_MOMENT = datetime.min.replace(tzinfo=UTC)
_LAST_MOMENT = datetime.max.replace(tzinfo=UTC)


def _disk(attachment: Any, position: int, image_id: str) -> DiskRow:
    if not isinstance(attachment, dict):
        raise InvalidItem(f"disk {position} should be an object", image_id)
    cloud = _object(attachment, "cloudDisk", image_id) or {}
    local = _object(attachment, "localDisk", image_id) or {}
    return DiskRow(
        position=position,
        role="system" if position == 0 else "data",
        device_name=_text(attachment, "deviceName", image_id),
        disk_category=_text(attachment, "diskCategory", image_id),
        auto_delete=_bool(attachment, "autoDelete", image_id),
        cloud_disk_type=_text(cloud, "diskType", image_id),
        cloud_disk_size_gb=_int(cloud, "diskSizeGB", image_id),
        cloud_iops=_int(cloud, "iops", image_id),
        cloud_snapshot_id=_text(cloud, "snapshotId", image_id),
        cloud_encrypted=_bool(cloud, "encrypted", image_id),
        local_disk_type=_text(local, "diskType", image_id),
        local_disk_size_gb=_int(local, "diskSizeGB", image_id),
    )


def _boot_mode(item: dict[str, Any], image_id: str) -> str | None:
    mode = _text(item, "bootMode", image_id)
    if mode is not None:
        return mode
    uefi = _bool(item, "uefiSupport", image_id)
    return None if uefi is None else ("uefi" if uefi else "bios")


def content_hash(item: dict[str, Any], image_source: str) -> bytes | None:
    """The ``content_hash`` :func:`normalize_image` gives ``item``, without the rest of
    the work: a resync compares it with the stored hash and skips unchanged images.
    None when the item cannot be serialised (it will fail normalisation anyway)."""
    try:
        digest = hashlib.blake2b(orjson.dumps(item, option=orjson.OPT_SORT_KEYS), digest_size=16)
    except TypeError:
        return None
    digest.update(image_source.encode())
    return digest.digest()


def normalize_image(item: Any, *, region_id: str, image_source: str) -> ImageRow:
    """Validate one API image object and turn it into an :class:`ImageRow`.

    Raises :class:`InvalidItem` when the item cannot be trusted.
    """
    row = _normalize_plain(item, region_id, image_source)
    if row is not None:
        return row
    return _normalize_careful(item, region_id=region_id, image_source=image_source)


_PLAIN_TEXT_KEYS = (
    "name", "platform", "osVersion", "architecture", "osType", "status", "desc", "ownerPin",
    "launchPermission", "rootDeviceType", "snapshotId", "bootMode", "createTime",
    "loginName", "instanceId", "expiredTime",
)  # fmt: skip
_INT_MAX = 2_147_483_647


def _plain_int(value: Any) -> bool:
    return value is None or (value.__class__ is int and 0 <= value <= _INT_MAX)


def _plain_disk(attachment: Any, position: int) -> DiskRow | None:
    """:func:`_disk` for an attachment whose every field already has its exact type."""
    if attachment.__class__ is not dict:
        return None
    get = attachment.get
    cloud, local = get("cloudDisk"), get("localDisk")
    if cloud is None:
        cloud = {}
    elif cloud.__class__ is not dict:
        return None
    if local is None:
        local = {}
    elif local.__class__ is not dict:
        return None
    device_name, category, auto_delete = get("deviceName"), get("diskCategory"), get("autoDelete")
    c_type, c_size, c_iops = cloud.get("diskType"), cloud.get("diskSizeGB"), cloud.get("iops")
    c_snapshot, c_encrypted = cloud.get("snapshotId"), cloud.get("encrypted")
    l_type, l_size = local.get("diskType"), local.get("diskSizeGB")
    for text in (device_name, category, c_type, c_snapshot, l_type):
        if text is not None and text.__class__ is not str:
            return None
    for flag in (auto_delete, c_encrypted):
        if flag is not None and flag is not True and flag is not False:
            return None
    if not (_plain_int(c_size) and _plain_int(c_iops) and _plain_int(l_size)):
        return None
    return DiskRow(
        position, "system" if position == 0 else "data", device_name, category, auto_delete,
        c_type, c_size, c_iops, c_snapshot, c_encrypted, l_type, l_size,
    )  # fmt: skip


def _normalize_plain(item: Any, region_id: str, image_source: str) -> ImageRow | None:
    """The common case, fast: every field already has its exact type and range.

    Returns None whenever anything needs coercion or could be invalid; the caller then
    takes :func:`_normalize_careful`, which decides (and explains) those cases. For an
    item it accepts, the row is equal to what the careful path builds.
    """
    if item.__class__ is not dict:
        return None
    get = item.get
    image_id = get("imageId")
    if image_id.__class__ is not str or not 0 < len(image_id) <= 128 or not image_id.strip():
        return None
    texts = [get(key) for key in _PLAIN_TEXT_KEYS]
    for text in texts:
        if text is not None and text.__class__ is not str:
            return None
    system_disk_size, size_mb, progress = get("systemDiskSizeGB"), get("sizeMB"), get("progress")
    if progress.__class__ is str and progress.isascii() and progress.isdigit():
        progress = int(progress)  # describeImages sends progress as a string: "100"
    if not (_plain_int(system_disk_size) and _plain_int(size_mb) and _plain_int(progress)):
        return None
    offline, imported = get("offline"), get("imported")
    for flag in (offline, imported):
        if flag is not None and flag is not True and flag is not False:
            return None
    charge = get("chargeInfo")
    if charge is not None and (
        charge.__class__ is not dict
        or not (charge.get("serviceCode") is None or charge.get("serviceCode").__class__ is str)
    ):
        return None
    if texts[11] is None and "uefiSupport" in item:
        return None  # bootMode from uefiSupport: the careful path
    raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    if len(raw) > MAX_ITEM_BYTES or b"\\u0000" in raw:
        return None
    disks = _plain_disks(get("systemDisk"), get("dataDisks"))
    if disks is None:
        return None
    (name, platform, os_version, architecture, os_type, status, description, owner_pin,
     launch_permission, root_device_type, snapshot_id, boot_mode, create_time, login_name,
     instance_id, expired_time) = texts  # fmt: skip
    digest = hashlib.blake2b(raw, digest_size=16)
    digest.update(image_source.encode())
    return ImageRow(
        region_id, image_id, image_source, name, platform, os_version, architecture, os_type,
        status, description, owner_pin, launch_permission, root_device_type, snapshot_id,
        boot_mode, system_disk_size, size_mb, progress,
        parse_create_time(create_time, image_id) if create_time else None,
        offline, login_name, imported,
        parse_create_time(expired_time, image_id, "expiredTime") if expired_time else None,
        instance_id, *_charge(charge), raw.decode(), digest.digest(), tuple(disks),
    )  # fmt: skip


def _plain_disks(system: Any, data: Any) -> list[DiskRow] | None:
    """The disks of :func:`_normalize_plain`'s item; None when one needs the careful path."""
    disks: list[DiskRow] = []
    if system is not None:
        disk = _plain_disk(system, 0)
        if disk is None:
            return None
        disks.append(disk)
    if data is not None:
        if data.__class__ is not list:
            return None
        for position, attachment in enumerate(data, start=1):
            disk = _plain_disk(attachment, position)
            if disk is None:
                return None
            disks.append(disk)
    return disks


def _charge(charge: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(serviceCode, formula as JSON) of an already validated ``chargeInfo``."""
    if charge is None:
        return None, None
    formula = charge.get("formula")
    return charge.get("serviceCode"), None if formula is None else orjson.dumps(formula).decode()


def _careful_raw(item: dict[str, Any], image_id: str) -> bytes:
    """The item serialised with sorted keys (the ``raw`` column), or InvalidItem."""
    try:
        raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # pragma: no cover - items come from JSON, always serialisable
        raise InvalidItem(f"not serialisable: {exc}", image_id) from exc
    if len(raw) > MAX_ITEM_BYTES:
        raise InvalidItem(f"object of {len(raw)} bytes is larger than {MAX_ITEM_BYTES}", image_id)
    if b"\\u0000" in raw:
        raise InvalidItem("contains a NUL character, which PostgreSQL cannot store", image_id)
    return raw


def _careful_disks(item: dict[str, Any], image_id: str) -> list[DiskRow]:
    """The system disk (position 0) and the data disks, or InvalidItem."""
    system = item.get("systemDisk")
    data = item.get("dataDisks")
    if data is not None and not isinstance(data, list):
        raise InvalidItem("dataDisks should be a list", image_id)
    disks: list[DiskRow] = []
    if system is not None:
        disks.append(_disk(system, 0, image_id))
    for position, attachment in enumerate(data or (), start=1):
        disks.append(_disk(attachment, position, image_id))
    return disks


def _normalize_careful(item: Any, *, region_id: str, image_source: str) -> ImageRow:
    """Every check and coercion, with the reason of a rejection."""
    if not isinstance(item, dict):
        raise InvalidItem(f"an image should be an object, got {type(item).__name__}")
    image_id = item.get("imageId")
    if not isinstance(image_id, str) or not image_id.strip():
        raise InvalidItem("imageId missing or not a string")
    if len(image_id) > 128:
        raise InvalidItem("imageId longer than 128 characters", image_id[:40])
    raw = _careful_raw(item, image_id)
    disks = _careful_disks(item, image_id)

    charge = _object(item, "chargeInfo", image_id)
    if charge is not None:
        charge = {**charge, "serviceCode": _text(charge, "serviceCode", image_id)}
    charge_code, charge_formula = _charge(charge)
    digest = hashlib.blake2b(raw, digest_size=16)
    digest.update(image_source.encode())
    return ImageRow(
        region_id=region_id,
        image_id=image_id,
        image_source=image_source,
        name=_text(item, "name", image_id),
        platform=_text(item, "platform", image_id),
        os_version=_text(item, "osVersion", image_id),
        architecture=_text(item, "architecture", image_id),
        os_type=_text(item, "osType", image_id),
        status=_text(item, "status", image_id),
        description=_text(item, "desc", image_id),
        owner_pin=_text(item, "ownerPin", image_id),
        launch_permission=_text(item, "launchPermission", image_id),
        root_device_type=_text(item, "rootDeviceType", image_id),
        snapshot_id=_text(item, "snapshotId", image_id),
        boot_mode=_boot_mode(item, image_id),
        system_disk_size_gb=_int(item, "systemDiskSizeGB", image_id),
        size_mb=_int(item, "sizeMB", image_id),
        progress=_int(item, "progress", image_id),
        created_at=parse_create_time(_text(item, "createTime", image_id), image_id),
        offline=_bool(item, "offline", image_id),
        login_name=_text(item, "loginName", image_id),
        imported=_bool(item, "imported", image_id),
        expired_at=parse_create_time(_text(item, "expiredTime", image_id), image_id, "expiredTime"),
        instance_id=_text(item, "instanceId", image_id),
        charge_service_code=charge_code,
        charge_formula=charge_formula,
        raw_json=raw.decode(),
        content_hash=digest.digest(),
        disks=tuple(disks),
    )


def image_record(row: ImageRow) -> tuple[Any, ...]:
    """The row as a tuple in :data:`IMAGE_COLUMNS` order plus ``raw`` (for COPY)."""
    return _image_record(row)


def disk_record(disk: DiskRow) -> tuple[Any, ...]:
    """The disk as a tuple in :data:`DISK_COLUMNS` order (for COPY)."""
    return _disk_record(disk)
