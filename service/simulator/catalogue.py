"""The simulated image catalogue: deterministic from a seed, mutable while served.

A catalogue holds, per region and image source (a *partition*), images exactly in
the API shape of ``describeImages`` (see ``/work/shared/describeImages.md``),
including an unknown extra field (``uefiSupport``) that clients must keep.

Each image is stored once as pre-serialised JSON (orjson) next to the few fields
the filters look at. A filtered listing (the ids of one partition matching one
set of filters, in served order) is computed once and cached until that
partition changes; a page is then a join of at most 100 pre-serialised items, so
serving a request never re-filters or re-encodes a 40,000-image partition.

Served order is ``createTime`` descending, then ``imageId`` descending: stable, so
page-number paging is deterministic while nothing changes.

Beyond describeImages, each image may have members (the pins a private image is shared
with: describeImageMembers) and an instance-type constraint (public and thirdparty
images: describeImageConstraints[Batch]). They are seeded from a second RNG, as are
the SDK ``Image`` fields describeImages.md leaves out (``loginName``, ``imported``,
``expiredTime``, ``instanceId``, ``chargeInfo``), so a seed's first catalogue keeps the
values it had before they existed. Sharing a private image makes its
``launchPermission`` ``specifiedUsers``; unsharing the last pin makes it ``ownerOnly``.

The catalogue is not thread-safe: use it from the event loop that serves it.
"""

from __future__ import annotations

import base64
import copy
import itertools
import random
import string
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

__all__ = [
    "DEFAULT_REGIONS",
    "DEFAULT_SOURCES",
    "OFFLINE_SOURCES",
    "SOURCES",
    "Catalogue",
    "CatalogueError",
    "ListingQuery",
]

DEFAULT_REGIONS = ("cn-north-1", "cn-east-1", "cn-east-2", "cn-south-1")
DEFAULT_SOURCES = ("public", "thirdparty", "private", "shared", "community")
SOURCES = frozenset(DEFAULT_SOURCES)
# Only these sources carry `offline`; for them the API lists online and offline images apart.
OFFLINE_SOURCES = frozenset({"public", "thirdparty"})

BEIJING = timezone(timedelta(hours=8))
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_IMMUTABLE_FIELDS = frozenset({"imageId", "imageSource"})
_LISTINGS_PER_PARTITION = 64  # cached filter combinations per partition (LRU)

# (platform, osType, osVersion, architecture, public name, relative weight)
_OS_TEMPLATES: tuple[tuple[str, str, str, str, str, int], ...] = (
    ("CentOS", "linux", "6.9", "i386", "CentOS 6.9 32位", 1),
    ("CentOS", "linux", "7.2", "x86_64", "CentOS 7.2 64位", 2),
    ("CentOS", "linux", "7.6", "x86_64", "CentOS 7.6 64位", 5),
    ("CentOS", "linux", "7.9", "x86_64", "CentOS 7.9 64位", 6),
    ("CentOS", "linux", "8.2", "x86_64", "CentOS 8.2 64位", 4),
    ("Ubuntu", "linux", "16.04", "x86_64", "Ubuntu 16.04 64位", 2),
    ("Ubuntu", "linux", "18.04", "x86_64", "Ubuntu 18.04 64位", 4),
    ("Ubuntu", "linux", "20.04", "x86_64", "Ubuntu 20.04 64位", 5),
    ("Ubuntu", "linux", "22.04", "x86_64", "Ubuntu 22.04 64位", 6),
    ("Ubuntu", "linux", "22.04", "arm64", "Ubuntu 22.04 ARM 64位", 1),
    (
        "Windows Server",
        "windows",
        "2012 R2",
        "x86_64",
        "Windows Server 2012 R2 数据中心版 64位中文版",
        2,
    ),
    ("Windows Server", "windows", "2016", "x86_64", "Windows Server 2016 数据中心版 64位中文版", 3),
    ("Windows Server", "windows", "2019", "x86_64", "Windows Server 2019 数据中心版 64位中文版", 4),
    (
        "Windows Server",
        "windows",
        "2019",
        "x86_64",
        "Windows Server 2019 Datacenter 64-bit English",
        1,
    ),
    ("Windows Server", "windows", "2022", "x86_64", "Windows Server 2022 数据中心版 64位中文版", 3),
    ("Other Linux", "linux", "11", "x86_64", "Debian 11 64位", 2),
    ("Other Linux", "linux", "22.03", "x86_64", "openEuler 22.03 LTS 64位", 2),
    ("Other Linux", "linux", "9.2", "x86_64", "Rocky Linux 9.2 64位", 1),
    ("Other Windows", "windows", "10", "x86_64", "Windows 10 专业版 64位", 1),
)
_OS_CUM_WEIGHTS = tuple(itertools.accumulate(template[5] for template in _OS_TEMPLATES))
_MARKET_APPS = (
    "宝塔Linux面板 7.9",
    "WordPress 6.2",
    "LAMP 环境",
    "LNMP 环境",
    "Docker CE 24",
    "MySQL 8.0",
    "Java 运行环境 JDK 17",
    "GitLab CE 16",
    "Nginx 1.24",
    "SQL Server 2019 标准版",
)
_PRIVATE_PREFIXES = (
    "web-server",
    "api-gateway",
    "基础镜像",
    "build-agent",
    "db-replica",
    "nginx-golden",
    "app-release",
    "测试环境",
    "k8s-node",
    "image-test",
)
_DESCRIPTIONS = (
    "",
    "",
    "",
    "京东云官方镜像，已预装云监控和主机安全组件",
    "golden image, patched monthly",
    "由实例制作的私有镜像",
    "Hardened per CIS level 1",
    "镜像市场服务商提供，含一年技术支持",
)
_STATUSES = (
    ("ready",) * 93 + ("creating",) * 2 + ("copying", "error", "deleting") * 2 + ("converting",)
)
_CLOUD_DISK_TYPES = ("ssd.gp1", "ssd.gp1", "ssd.io1", "hdd.std1")
_INSTANCE_TYPES = (
    "g.n2.medium", "g.n2.large", "g.n2.xlarge", "c.n2.large", "c.n2.xlarge", "m.n2.large",
    "g.n3.large", "c.n3.xlarge", "p.n1p40.2xlarge", "h.g2.large", "i.n2.2xlarge",
)  # fmt: skip
CONSTRAINT_TYPES = ("includes", "excludes")
OWNER_PIN = "demo-user"
"""The pin of the simulator's one account: it owns every private image."""


class CatalogueError(KeyError):
    """An unknown region, source or image, or an invalid change; the message names it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class ListingQuery:
    """One describeImages listing of a partition: its filters, normalised.

    ``offline`` is None for sources without an offline flag (the API ignores it
    there); for public/thirdparty a missing ``offline`` parameter means False.
    """

    source: str
    offline: bool | None = None
    platform: str | None = None
    image_name: str | None = None
    root_device_type: str | None = None
    launch_permission: str | None = None
    status: str | None = None
    architecture: str | None = None
    boot_mode: str | None = None
    owner_pin: str | None = None
    """Only images of this owner (a private listing shows the caller's own images)."""

    def normalised(self) -> ListingQuery:
        offline = (self.offline or False) if self.source in OFFLINE_SOURCES else None
        # launchPermission is only meaningful for private images.
        permission = self.launch_permission if self.source == "private" else None
        return ListingQuery(
            self.source,
            offline,
            self.platform,
            self.image_name,
            self.root_device_type,
            permission,
            self.status,
            self.architecture,
            self.boot_mode,
            self.owner_pin if self.source == "private" else None,
        )


@dataclass(slots=True)
class _Entry:
    """One image: its JSON bytes and the fields filters and ordering need."""

    image_id: str
    create_time: str
    offline: bool | None
    platform: str
    name: str
    root_device_type: str
    launch_permission: str
    status: str
    architecture: str
    boot_mode: str
    owner_pin: str
    encoded: bytes

    @classmethod
    def of(cls, image: Mapping[str, Any]) -> _Entry:
        offline = image.get("offline")
        return cls(
            image_id=image["imageId"],
            create_time=image.get("createTime", ""),
            offline=offline if isinstance(offline, bool) else None,
            platform=image.get("platform", ""),
            name=image.get("name", ""),
            root_device_type=image.get("rootDeviceType", ""),
            launch_permission=image.get("launchPermission", ""),
            status=image.get("status", ""),
            architecture=image.get("architecture", ""),
            boot_mode=image.get("bootMode", ""),
            owner_pin=image.get("ownerPin", ""),
            encoded=_dumps(image),
        )

    def sort_key(self) -> tuple[str, str]:
        return (self.create_time, self.image_id)

    def matches(self, query: ListingQuery) -> bool:
        return (
            (query.offline is None or bool(self.offline) == query.offline)
            and (query.platform is None or self.platform == query.platform)
            and (query.image_name is None or query.image_name.lower() in self.name.lower())
            and (query.root_device_type is None or self.root_device_type == query.root_device_type)
            and (
                query.launch_permission is None or self.launch_permission == query.launch_permission
            )
            and (query.status is None or self.status == query.status)
            and (query.architecture is None or self.architecture == query.architecture)
            and (query.boot_mode is None or self.boot_mode == query.boot_mode)
            and (query.owner_pin is None or self.owner_pin == query.owner_pin)
        )


@dataclass(slots=True)
class _Partition:
    entries: dict[str, _Entry] = field(default_factory=dict)
    version: int = 0
    _ordered: list[_Entry] | None = None
    _listings: OrderedDict[ListingQuery, list[_Entry]] = field(default_factory=OrderedDict)

    def changed(self) -> None:
        self.version += 1
        self._ordered = None
        self._listings.clear()

    def ordered(self) -> list[_Entry]:
        if self._ordered is None:
            self._ordered = sorted(self.entries.values(), key=_Entry.sort_key, reverse=True)
        return self._ordered

    def listing(self, query: ListingQuery) -> list[_Entry]:
        cached = self._listings.get(query)
        if cached is not None:
            self._listings.move_to_end(query)
            return cached
        listing = [entry for entry in self.ordered() if entry.matches(query)]
        self._listings[query] = listing
        if len(self._listings) > _LISTINGS_PER_PARTITION:
            self._listings.popitem(last=False)
        return listing


class Catalogue:
    """Images per (region, source), generated from ``seed``; see the module docstring.

    ``images`` is the total over all partitions, spread by ``skew``: relative
    weights per ``(region, source)`` (default 1.0 each). For instance
    ``{("cn-north-1", "private"): 13}`` over the 20 default partitions puts
    about 40% of the images in that one partition.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        images: int = 2000,
        regions: Iterable[str] = DEFAULT_REGIONS,
        sources: Iterable[str] = DEFAULT_SOURCES,
        skew: Mapping[tuple[str, str], float] | None = None,
        offline_ratio: float = 0.12,
    ) -> None:
        self.regions = tuple(regions)
        self.sources = tuple(sources)
        unknown = [source for source in self.sources if source not in SOURCES]
        if unknown:
            raise ValueError(f"unknown image source {unknown[0]!r}")
        if not self.regions or not self.sources:
            raise ValueError("a catalogue needs at least one region and one source")
        if images < 0:
            raise ValueError(f"images must be >= 0, got {images}")
        skew = dict(skew or {})
        for region, source in skew:
            if region not in self.regions or source not in self.sources:
                raise ValueError(f"skew names an unknown partition {region}/{source}")
        self.seed = seed
        self._offline_ratio = offline_ratio
        self._rng = random.Random(seed)
        self._ids: set[str] = set()
        self._partitions: dict[tuple[str, str], _Partition] = {
            (region, source): _Partition() for region in self.regions for source in self.sources
        }
        self._source_of: dict[tuple[str, str], str] = {}  # (region, image id) -> source
        # Members and constraints, keyed by (region, image id); drawn from their own RNG.
        self._extras_rng = random.Random(f"extras-{seed}")
        self._members: dict[tuple[str, str], list[str]] = {}
        self.first_pin = OWNER_PIN
        """The PIN whose listings are served when no viewer is named (the first account)."""
        self._shared_cache: dict[
            tuple[str, ListingQuery, str], tuple[tuple[int, int], list[_Entry]]
        ] = {}
        self._constraints: dict[tuple[str, str], dict[str, Any]] = {}
        counts = _apportion(images, {key: skew.get(key, 1.0) for key in self._partitions})
        for (region, source), count in counts.items():
            generated = [self._generate(region, source) for _ in range(count)]
            # Insert in served order so the first sort of a partition is a no-op pass.
            generated.sort(key=lambda image: (image["createTime"], image["imageId"]), reverse=True)
            for image in generated:
                self._insert(region, source, image)

    # --- reading -----------------------------------------------------------------------

    def partitions(self) -> list[tuple[str, str]]:
        return list(self._partitions)

    def count(self, region: str, source: str) -> int:
        return len(self._partition(region, source).entries)

    def __len__(self) -> int:
        return len(self._source_of)

    def images(self, region: str, source: str) -> list[dict[str, Any]]:
        """Every image of a partition (online and offline) as served, in served order."""
        return [orjson.loads(entry.encoded) for entry in self._partition(region, source).ordered()]

    def get(self, region: str, image_id: str) -> dict[str, Any] | None:
        """The image as served (a copy), or None when the region has no such image."""
        source = self._source_of.get((region, image_id))
        if source is None:
            return None
        return orjson.loads(self._partitions[region, source].entries[image_id].encoded)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
        """A deep copy of the whole state: {(region, source): {image id: image}}."""
        return {
            key: {entry.image_id: orjson.loads(entry.encoded) for entry in partition.ordered()}
            for key, partition in self._partitions.items()
        }

    def version(self, region: str, source: str) -> int:
        """Increases on every change of the partition (for caches and tests)."""
        return self._partition(region, source).version

    def source_of(self, region: str, image_id: str) -> str | None:
        """The source (partition) of an image, or None when the region has no such image."""
        return self._source_of.get((region, image_id))

    def members(self, region: str, image_id: str, viewer: str | None = None) -> list[str]:
        """The pins a private image is shared with (describeImageMembers), sorted; with
        ``viewer``, only for an image that PIN owns."""
        if self._source(region, image_id) != "private" or (
            viewer is not None and self._owner(region, image_id) != viewer
        ):
            raise CatalogueError(
                f"image {image_id} is not a private image of {viewer or 'its owner'}"
            )
        return list(self._members.get((region, image_id), ()))

    def visible(self, region: str, image_id: str, viewer: str) -> bool:
        """Whether ``viewer`` (a PIN) can see the image: catalogue images always, private
        ones when it owns them or they are shared with it, the seeded shared ones for
        the simulator's first account."""
        source = self._source_of.get((region, image_id))
        if source == "private":
            return self._owner(region, image_id) == viewer or viewer in self._members.get(
                (region, image_id), ()
            )
        if source == "shared":
            return viewer == self.first_pin
        return source is not None

    def constraint(self, region: str, image_id: str) -> dict[str, Any] | None:
        """The image's instance-type constraint, or None (describeImageConstraints)."""
        self._source(region, image_id)
        found = self._constraints.get((region, image_id))
        return copy.deepcopy(found) if found is not None else None

    def share(self, region: str, image_id: str, pins: Iterable[str]) -> list[str]:
        """Share a private image with ``pins`` (shareImage); returns its members."""
        members = set(self.members(region, image_id)) | _pins(pins)
        return self._set_members(region, image_id, members)

    def unshare(self, region: str, image_id: str, pins: Iterable[str]) -> list[str]:
        """Stop sharing a private image with ``pins`` (unShareImage); returns its members."""
        members = set(self.members(region, image_id)) - _pins(pins)
        return self._set_members(region, image_id, members)

    def set_constraint(
        self, region: str, image_id: str, constraint: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        """Set (or with None clear) the instance-type constraint of a public or
        thirdparty image: ``{"constraintsType": "includes"|"excludes", "instanceTypes": [...]}``."""
        if self._source(region, image_id) not in OFFLINE_SOURCES:
            raise CatalogueError(f"only public and thirdparty images have constraints: {image_id}")
        if constraint is None:
            self._constraints.pop((region, image_id), None)
            return None
        kind, types = constraint.get("constraintsType"), constraint.get("instanceTypes")
        if kind not in CONSTRAINT_TYPES:
            raise ValueError(f"constraintsType must be one of {CONSTRAINT_TYPES}, got {kind!r}")
        if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
            raise ValueError("instanceTypes must be a list of instance type names")
        self._constraints[region, image_id] = {"constraintsType": kind, "instanceTypes": types}
        return self.constraint(region, image_id)

    def _set_members(self, region: str, image_id: str, members: set[str]) -> list[str]:
        key = (region, image_id)
        permission = "specifiedUsers" if members else "ownerOnly"
        if members:
            self._members[key] = sorted(members)
        else:
            self._members.pop(key, None)
        self._partitions[region, "private"].changed()  # the members' shared listings
        image = self.get(region, image_id)
        if image is not None and image.get("launchPermission") != permission:
            self.modify(region, image_id, launchPermission=permission)
        return sorted(members)

    def list_page(
        self,
        region: str,
        query: ListingQuery,
        *,
        page_number: int,
        page_size: int,
        viewer: str | None = None,
    ) -> tuple[bytes, int]:
        """One page of a listing as ``viewer`` (a PIN; default the first account's) sees
        it: (JSON array of images, totalCount of the listing). A private listing has the
        viewer's own images; a shared listing the private images of others shared with it
        (as ``imageSource`` ``shared``), and for the first account the seeded shared ones."""
        if region not in self.regions:
            raise CatalogueError(f"unknown region {region!r}")
        viewer = viewer or self.first_pin
        if query.source == "private":
            query = replace(query, owner_pin=viewer)
        query = query.normalised()
        partition = self._partitions.get((region, query.source))
        if partition is None:  # a valid source this catalogue does not simulate
            return b"[]", 0
        listing = (
            self._shared_listing(region, query, viewer)
            if query.source == "shared"
            else partition.listing(query)
        )
        start = (page_number - 1) * page_size
        return _json_array(listing[start : start + page_size]), len(listing)

    def _shared_listing(self, region: str, query: ListingQuery, viewer: str) -> list[_Entry]:
        shared, private = (
            self._partitions[region, "shared"],
            self._partitions.get((region, "private")),
        )
        versions = (shared.version, private.version if private else -1)
        key = (region, query, viewer)
        cached = self._shared_cache.get(key)
        if cached is not None and cached[0] == versions:
            return cached[1]
        listing = list(shared.listing(query)) if viewer == self.first_pin else []
        if private is not None:
            for image_id, entry in private.entries.items():
                if entry.owner_pin != viewer and viewer in self._members.get(
                    (region, image_id), ()
                ):
                    as_shared = self._as_shared(entry)
                    if as_shared.matches(query):
                        listing.append(as_shared)
        listing.sort(key=_Entry.sort_key, reverse=True)
        if len(self._shared_cache) > 4 * _LISTINGS_PER_PARTITION:
            self._shared_cache.clear()
        self._shared_cache[key] = (versions, listing)
        return listing

    @staticmethod
    def _as_shared(entry: _Entry) -> _Entry:
        image = orjson.loads(entry.encoded)
        image["imageSource"] = "shared"
        return _Entry.of(image)

    def list_ids(
        self,
        region: str,
        ids: Iterable[str],
        *,
        page_number: int,
        page_size: int,
        viewer: str | None = None,
    ) -> tuple[bytes, int]:
        """A page of the images with these ids in the region that ``viewer`` can see
        (:meth:`visible`), any source, served order."""
        if region not in self.regions:
            raise CatalogueError(f"unknown region {region!r}")
        viewer = viewer or self.first_pin
        found: list[_Entry] = []
        for image_id in dict.fromkeys(ids):
            source = self._source_of.get((region, image_id))
            if source is not None and self.visible(region, image_id, viewer):
                entry = self._partitions[region, source].entries[image_id]
                if source == "private" and entry.owner_pin != viewer:
                    entry = self._as_shared(entry)
                found.append(entry)
        found.sort(key=_Entry.sort_key, reverse=True)
        start = (page_number - 1) * page_size
        return _json_array(found[start : start + page_size]), len(found)

    def random_image_id(
        self, region: str, source: str, rng: random.Random, *, offline: bool | None = None
    ) -> str | None:
        """An image id of the partition (optionally with this offline flag), or None."""
        entries = self._partition(region, source).ordered()
        if offline is not None:
            entries = [entry for entry in entries if bool(entry.offline) == offline]
        return rng.choice(entries).image_id if entries else None

    # --- changing ----------------------------------------------------------------------

    def take_offline(self, region: str, image_id: str) -> dict[str, Any]:
        return self._set_offline(region, image_id, True)

    def bring_online(self, region: str, image_id: str) -> dict[str, Any]:
        return self._set_offline(region, image_id, False)

    def add(self, region: str, source: str, **fields: Any) -> dict[str, Any]:
        """Create an image (generated, then ``fields`` applied); returns it as served.

        ``createTime`` defaults to now (Beijing time), so a new image is listed first.
        """
        self._partition(region, source)
        image = self._generate(region, source, create_time=datetime.now(BEIJING))
        image_id = fields.get("imageId")
        if image_id is not None:
            if (region, image_id) in self._source_of:
                raise CatalogueError(f"image {image_id} already exists in {region}")
            self._ids.discard(image["imageId"])
            self._ids.add(image_id)
        if fields.get("imageSource", source) != source:
            raise CatalogueError("imageSource of an added image is the partition's source")
        image.update(fields)
        self._insert(region, source, image)
        return copy.deepcopy(image)

    def delete(self, region: str, image_id: str) -> dict[str, Any]:
        """Remove an image; returns it as it was served."""
        source = self._source(region, image_id)
        partition = self._partitions[region, source]
        entry = partition.entries.pop(image_id)
        del self._source_of[region, image_id]
        self._members.pop((region, image_id), None)
        self._constraints.pop((region, image_id), None)
        partition.changed()
        return orjson.loads(entry.encoded)  # type: ignore[no-any-return]

    def modify(self, region: str, image_id: str, **fields: Any) -> dict[str, Any]:
        """Change top-level fields of an image (a value of None removes the field)."""
        bad = _IMMUTABLE_FIELDS.intersection(fields)
        if bad:
            raise CatalogueError(f"{sorted(bad)[0]} cannot be modified")
        source = self._source(region, image_id)
        partition = self._partitions[region, source]
        image = orjson.loads(partition.entries[image_id].encoded)
        for name, value in fields.items():
            if value is None:
                image.pop(name, None)
            else:
                image[name] = value
        partition.entries[image_id] = _Entry.of(image)
        partition.changed()
        return image  # type: ignore[no-any-return]

    # --- internals ---------------------------------------------------------------------

    def _partition(self, region: str, source: str) -> _Partition:
        partition = self._partitions.get((region, source))
        if partition is None:
            raise CatalogueError(f"unknown partition {region}/{source}")
        return partition

    def _owner(self, region: str, image_id: str) -> str:
        source = self._source(region, image_id)
        return self._partitions[region, source].entries[image_id].owner_pin

    def _source(self, region: str, image_id: str) -> str:
        source = self._source_of.get((region, image_id))
        if source is None:
            raise CatalogueError(f"no image {image_id} in {region}")
        return source

    def _set_offline(self, region: str, image_id: str, offline: bool) -> dict[str, Any]:
        source = self._source(region, image_id)
        if source not in OFFLINE_SOURCES:
            raise CatalogueError(f"{source} image {image_id} has no offline flag")
        return self.modify(region, image_id, offline=offline)

    def _insert(self, region: str, source: str, image: dict[str, Any]) -> None:
        rng, key = self._extras_rng, (region, image["imageId"])
        if image.get("launchPermission") == "specifiedUsers" and source == "private":
            self._members.setdefault(key, sorted(_pin(rng) for _ in range(rng.randint(1, 3))))
        if source in OFFLINE_SOURCES and key not in self._constraints and rng.random() < 0.25:
            self._constraints[key] = {
                "constraintsType": rng.choice(CONSTRAINT_TYPES),
                "instanceTypes": sorted(rng.sample(_INSTANCE_TYPES, rng.randint(1, 4))),
            }
        partition = self._partitions[region, source]
        partition.entries[image["imageId"]] = _Entry.of(image)
        self._source_of[region, image["imageId"]] = source
        partition.changed()

    def _new_id(self, prefix: str) -> str:
        rng = self._rng
        while True:
            # base32 of 50 random bits: 10 chars of [a-z2-7], several times faster than choices().
            candidate = prefix + base64.b32encode(rng.randbytes(7)).decode("ascii")[:10].lower()
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate

    def _generate(
        self, region: str, source: str, *, create_time: datetime | None = None
    ) -> dict[str, Any]:
        rng = self._rng
        platform, os_type, os_version, architecture, os_name, _ = rng.choices(
            _OS_TEMPLATES, cum_weights=_OS_CUM_WEIGHTS
        )[0]
        if create_time is None:
            # 2016-01-01 .. 2025-12-31, Beijing time.
            create_time = datetime(2016, 1, 1, tzinfo=BEIJING) + timedelta(
                seconds=rng.randrange(10 * 365 * 86400)
            )
        windows = os_type == "windows"
        name, owner, permission = _identity(rng, source, os_name, create_time)
        status = rng.choice(_STATUSES)
        progress = (
            str(rng.randrange(1, 100)) if status in ("creating", "copying", "converting") else "100"
        )
        local_root, system_size, snapshot_id, system_disk, data_disks = self._disks(windows)
        uefi = rng.random() < (0.3 if create_time.year >= 2021 else 0.05)
        image: dict[str, Any] = {
            "imageId": self._new_id("img-"),
            "name": name,
            "platform": platform,
            "osVersion": os_version,
            "architecture": architecture,
            "systemDiskSizeGB": system_size,
            "imageSource": source,
            "osType": os_type,
            "status": status,
            "createTime": create_time.astimezone(BEIJING).strftime(TIME_FORMAT),
            "sizeMB": rng.randrange(1200, 30000) if status == "ready" else 0,
            "desc": rng.choice(_DESCRIPTIONS),
            "ownerPin": owner,
            "launchPermission": permission,
            "systemDisk": system_disk,
            "dataDisks": data_disks,
            "snapshotId": snapshot_id,
            "rootDeviceType": "localDisk" if local_root else "cloudDisk",
            "progress": progress,
            "bootMode": "uefi" if uefi and rng.random() < 0.5 else "bios",
            "uefiSupport": uefi,
        }
        if source in OFFLINE_SOURCES:
            image["offline"] = rng.random() < self._offline_ratio
        image.update(_sdk_fields(self._extras_rng, source, owner))
        return image

    def _disks(self, windows: bool) -> tuple[bool, int, str, dict[str, Any], list[dict[str, Any]]]:
        """(local root, system disk GiB, snapshotId, systemDisk, dataDisks) of a new image
        (the random draws in the order the catalogue of a seed depends on)."""
        rng = self._rng
        local_root = rng.random() < 0.15
        system_size = rng.choice((50, 60, 80)) if windows else rng.choice((20, 40, 40, 40, 60))
        snapshot_id = "" if local_root else self._new_id("snapshot-")
        if local_root:
            system_disk: dict[str, Any] = {
                "diskCategory": "local",
                "autoDelete": True,
                "deviceName": "vda",
                "localDisk": {"diskType": "local", "diskSizeGB": system_size},
            }
        else:
            system_disk = {
                "diskCategory": "cloud",
                "autoDelete": True,
                "deviceName": "vda",
                "cloudDisk": _cloud_disk(rng, system_size, snapshot_id),
            }
        data_disks = [
            {
                "diskCategory": "cloud",
                "autoDelete": rng.random() < 0.7,
                "deviceName": "vd" + "bcd"[position],
                "cloudDisk": _cloud_disk(
                    rng,
                    rng.choice((20, 50, 100, 200, 500)),
                    self._new_id("snapshot-") if rng.random() < 0.5 else "",
                ),
            }
            for position in range(rng.choices((0, 1, 2, 3), cum_weights=(6, 8, 9, 10))[0])
        ]
        return local_root, system_size, snapshot_id, system_disk, data_disks


def _identity(
    rng: random.Random, source: str, os_name: str, created: datetime
) -> tuple[str, str, str]:
    """(name, ownerPin, launchPermission) as the source would have them."""
    if source == "public":
        return os_name, "admin", "all"
    if source == "thirdparty":
        vendor = "".join(rng.choices(string.ascii_lowercase, k=6))
        return f"{rng.choice(_MARKET_APPS)} ({os_name})", f"market-{vendor}", "all"
    stamp = created.strftime("%Y%m%d")
    name = f"{rng.choice(_PRIVATE_PREFIXES)}-{stamp}-{rng.randrange(1, 100)}"
    if source == "private":
        return name, "demo-user", rng.choice(("ownerOnly", "ownerOnly", "specifiedUsers"))
    other_pin = "jd_" + "".join(rng.choices(_ID_ALPHABET, k=8))
    if source == "shared":
        return name, other_pin, "specifiedUsers"
    return f"community-{name} ({os_name})", other_pin, "all"


def _pin(rng: random.Random) -> str:
    return "jd_" + "".join(rng.choices(_ID_ALPHABET, k=8))


def _pins(pins: Iterable[str]) -> set[str]:
    if isinstance(pins, str):
        raise ValueError("pins must be a list of user pins, not one string")
    found = set(pins)
    if not all(isinstance(pin, str) and pin for pin in found):
        raise ValueError("pins must be non-empty strings")
    return found


def _sdk_fields(rng: random.Random, source: str, owner: str) -> dict[str, Any]:
    """The SDK ``Image`` fields describeImages.md does not list, as the source has them."""
    fields: dict[str, Any] = {"loginName": owner, "imported": False, "expiredTime": ""}
    if source == "private":
        fields["imported"] = rng.random() < 0.2
        if not fields["imported"]:
            fields["instanceId"] = "i-" + "".join(rng.choices(_ID_ALPHABET, k=10))
    if source == "thirdparty":
        fields["chargeInfo"] = {
            "serviceCode": "vm",
            "formula": [
                {"item": "image", "unit": "hour", "price": str(rng.randrange(1, 90) / 100)}
            ],
        }
        if rng.random() < 0.1:
            fields["expiredTime"] = f"{rng.randrange(2027, 2030)}-12-31 23:59:59"
    return fields


def _cloud_disk(rng: random.Random, size_gb: int, snapshot_id: str) -> dict[str, Any]:
    disk_type = rng.choice(_CLOUD_DISK_TYPES)
    if disk_type == "hdd.std1":
        iops = 500
    elif disk_type == "ssd.io1":
        iops = min(30 * size_gb, 32000)
    else:
        iops = min(1800 + 50 * size_gb, 25000)
    return {
        "diskType": disk_type,
        "diskSizeGB": size_gb,
        "iops": iops,
        "snapshotId": snapshot_id,
        "encrypted": rng.random() < 0.1,
    }


def _apportion(total: int, weights: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], int]:
    """Split ``total`` by weight (largest remainder): deterministic, sums exactly to total."""
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        raise ValueError("skew weights must not all be zero")
    if any(weight < 0 for weight in weights.values()):
        raise ValueError("skew weights must be >= 0")
    exact = {key: total * weight / weight_sum for key, weight in weights.items()}
    counts = {key: int(value) for key, value in exact.items()}
    by_remainder = sorted(exact, key=lambda key: exact[key] - counts[key], reverse=True)
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _dumps(image: Mapping[str, Any]) -> bytes:
    # orjson returns an over-allocated buffer (~4 KiB for a 700-byte image); copy it
    # to its exact size, or 100,000 stored images cost 400 MB instead of 70.
    return memoryview(orjson.dumps(image)).tobytes()


def _json_array(entries: list[_Entry]) -> bytes:
    return b"[" + b",".join(entry.encoded for entry in entries) + b"]"
