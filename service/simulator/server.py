"""The describeImages simulator as an aiohttp application, plus ways to run it.

API: ``GET /v1/regions/{regionId}/images`` with the documented parameters
(see ``describeImages.md``). Choices where the documentation is silent:

- ``offline`` missing for public/thirdparty means ``offline=false``; it is ignored
  for other sources and with ``ids``.
- ``ids`` (``ids.1=..&ids.2=..``) looks images up in every source of the region;
  the other filters are ignored, paging still applies.
- Booleans are accepted as true/false in any case (the SDK sends ``True``).
- ``imageName`` matches as a case-insensitive substring; ``architecture`` and
  ``bootMode`` (parameters of the SDK, not of the page) filter exactly.
- With drift on, each listing request (any page) first inserts or deletes one
  image of the listing being read, with the configured probability.
- An unknown ``imageSource``, region, or a non-integer/zero ``pageNumber`` is
  400 ``INVALID_ARGUMENT``; a page past the end is an empty page with the total.
- The signature (JDCLOUD3-HMAC-SHA256) is checked before anything else but the
  latency; any failure is 401 ``UNAUTHENTICATED`` (the reason is in the message).

The other image APIs the SDK (and ``jdc vm ...``) call, answered like JD Cloud:

- ``GET /v1/regions/{regionId}/images/{imageId}`` (describeImage): ``result.image``;
- ``GET .../images/{imageId}/members`` (describeImageMembers): ``result.pins``, sorted;
  only for the private images of the simulator's one account (``demo-user``), any
  other image is 404 ``NOT_FOUND``;
- ``GET .../images/{imageId}/constraints`` (describeImageConstraints):
  ``result.imageConstraints`` ``{imageId, imageInstanceTypeConstraint}`` (null when
  the image has none);
- ``GET /v1/regions/{regionId}/imageConstraints?ids.1=..`` (describeImageConstraintsBatch):
  ``result.imageConstraints[]`` for the ids that have a constraint.

An unknown image is 404 ``NOT_FOUND``. Faults apply to them as to describeImages; the
"source" a fault rule (``fail_partitions``, ``fail_first_n``) names for them is the
API's name, e.g. ``{"kind": "internal", "n": 1, "source": "describeImageMembers"}``.

Admin endpoints (JSON, unsigned, only here) live under ``/__simulator__/``:
``GET|PUT faults``, ``POST catalogue/{op}`` (op: take_offline, bring_online,
add, delete, modify), ``POST shares/{op}`` (op: share, unshare; body
``{"region", "image_id", "pins"}``), ``PUT constraints`` (body ``{"region",
"image_id", "constraint": {"constraintsType", "instanceTypes"} | null}``),
``GET|DELETE requests`` (the bounded request log), ``GET stats``, ``GET changes?since=N`` (the change log: every catalogue mutation
made through ``catalogue/{op}`` or by drift, numbered from 1, oldest first) and
``GET catalogue`` (every image of every partition, as served), ``POST organisation`` (many
accounts, roles, private images and shares at once); ``GET /__simulator__/`` lists them (generated from the router).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from service.jdcloud.signer import (
    DEMO_ACCESS_KEY,
    DEMO_SECRET_KEY,
    HEADER_DATE,
    HEADER_SECURITY_TOKEN,
    verify_request,
)
from service.simulator.accounts import DEFAULT_STS_LIFETIME, Accounts, SimAccount
from service.simulator.catalogue import (
    OWNER_PIN,
    SOURCES,
    Catalogue,
    CatalogueError,
    ListingQuery,
)
from service.simulator.faults import STATUS_CODES, Fault, FaultConfig, Faults
from service.simulator.organisation import add_organisation

__all__ = [
    "ADMIN_PREFIX",
    "Simulator",
    "SimulatorState",
    "build_app",
    "running_simulator",
    "simulator_in_thread",
]

ADMIN_PREFIX = "/__simulator__"
DEFAULT_LOG_SIZE = 10_000
_IDS_PARAM = re.compile(r"ids\.(\d+)")
_MESSAGES = {
    "RATE_LIMIT": "Requests too frequent, please retry later",
    "QUOTA_EXCEEDED": "Quota exceeded",
    "INTERNAL": "Internal server error",
    "UNKNOWN": "Unknown server error",
    "SOURCE_UNAVAILABLE": "Source unavailable",
    "UNAVAILABLE": "Service unavailable, please retry later",
    "HTTP_FORBIDDEN": "Forbidden",
}
_HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>jdcloud-gateway</center>"
    b"</body></html>"
)


class _ApiError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class SimulatorState:
    """What one simulator application owns: catalogue, faults, accounts, request log.
    ``access_key``/``secret_key`` are the first account's pair."""

    catalogue: Catalogue
    faults: Faults
    access_key: str
    secret_key: str = field(repr=False)
    accounts: Accounts = field(default_factory=Accounts)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DEFAULT_LOG_SIZE))
    counters: Counter[str] = field(default_factory=Counter)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def record_change(self, op: str, region: str, image: Mapping[str, Any]) -> None:
        """Append one mutation to the change log (the ground truth a soak checks against)."""
        self.changes.append(
            {
                "seq": len(self.changes) + 1,
                "time": time.time(),
                "op": op,
                "region": region,
                "source": image.get("imageSource"),
                "image_id": image.get("imageId"),
                "image": dict(image),  # after the change (before it, for a delete)
            }
        )

    def secret_for(self, access_key: str) -> str | None:
        caller = self.accounts.caller(access_key)
        return caller.secret_key if caller is not None else None


STATE: web.AppKey[SimulatorState] = web.AppKey("simulator_state", SimulatorState)


def build_app(
    catalogue: Catalogue,
    *,
    access_key: str = DEMO_ACCESS_KEY,
    secret_key: str = DEMO_SECRET_KEY,
    faults: Faults | FaultConfig | Mapping[str, Any] | None = None,
    request_log_size: int = DEFAULT_LOG_SIZE,
    sts_lifetime: float = DEFAULT_STS_LIFETIME,
) -> web.Application:
    """An aiohttp application serving ``catalogue`` as describeImages (and STS). Its first
    account (``demo``, PIN ``demo-user``) signs with ``access_key``/``secret_key``; more
    are added through ``state.accounts`` or ``POST /__simulator__/accounts``."""
    if not isinstance(faults, Faults):
        faults = Faults(faults)
    accounts = Accounts(sts_lifetime=sts_lifetime)
    accounts.add("demo", pin=OWNER_PIN, access_key=access_key, secret_key=secret_key)
    catalogue.first_pin = OWNER_PIN
    app = web.Application()
    app[STATE] = SimulatorState(
        catalogue=catalogue,
        faults=faults,
        access_key=access_key,
        secret_key=secret_key,
        accounts=accounts,
        requests=deque(maxlen=request_log_size),
    )
    app.router.add_post("/v1/sessionToken:assumeRole", assume_role)
    app.router.add_get("/v1/regions/{regionId}/images", describe_images)
    app.router.add_get("/v1/regions/{regionId}/images/{imageId}", describe_image)
    app.router.add_get("/v1/regions/{regionId}/images/{imageId}/members", describe_image_members)
    app.router.add_get(
        "/v1/regions/{regionId}/images/{imageId}/constraints", describe_image_constraints
    )
    app.router.add_get("/v1/regions/{regionId}/imageConstraints", describe_constraints_batch)
    app.router.add_get(f"{ADMIN_PREFIX}/faults", get_faults)
    app.router.add_put(f"{ADMIN_PREFIX}/faults", put_faults)
    app.router.add_post(f"{ADMIN_PREFIX}/catalogue/{{op}}", change_catalogue)
    app.router.add_post(f"{ADMIN_PREFIX}/shares/{{op}}", change_shares)
    app.router.add_put(f"{ADMIN_PREFIX}/constraints", put_constraint)
    app.router.add_get(f"{ADMIN_PREFIX}/requests", get_requests)
    app.router.add_delete(f"{ADMIN_PREFIX}/requests", clear_requests)
    app.router.add_get(f"{ADMIN_PREFIX}/stats", get_stats)
    app.router.add_get(f"{ADMIN_PREFIX}/changes", get_changes)
    app.router.add_get(f"{ADMIN_PREFIX}/catalogue", get_catalogue)
    app.router.add_get(f"{ADMIN_PREFIX}/accounts", get_accounts)
    app.router.add_post(f"{ADMIN_PREFIX}/accounts", add_account)
    app.router.add_post(f"{ADMIN_PREFIX}/accounts/{{name}}/refuse", refuse_account)
    app.router.add_post(f"{ADMIN_PREFIX}/roles", add_role)
    app.router.add_post(f"{ADMIN_PREFIX}/organisation", organisation)
    app.router.add_put(f"{ADMIN_PREFIX}/sts", put_sts)
    app.router.add_post(f"{ADMIN_PREFIX}/sts/expire", expire_sessions)
    # The index lists whatever admin routes are registered above (added last, before the
    # catch-all, so it sees them all).
    app.router.add_get(f"{ADMIN_PREFIX}/", admin_index)
    app.router.add_get(ADMIN_PREFIX, admin_index)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- describeImages ------------------------------------------------------------------------


async def _admitted(
    request: web.Request,
) -> tuple[SimulatorState, dict[str, Any], str, web.Response | None]:
    """What every API request goes through first: the request log, latency, signature.
    Returns the state, the log entry, a request id and the 401 when the signature fails."""
    state = request.app[STATE]
    region = request.match_info["regionId"]
    request_id = os.urandom(16).hex()
    entry: dict[str, Any] = {
        "time": time.time(),
        "region": region,
        "path": request.rel_url.raw_path,
        "query": request.rel_url.raw_query_string,
        "status": None,
        "fault": None,
        "peer": _peer(request),
    }
    state.requests.append(entry)
    state.counters["requests"] += 1
    latency = state.faults.latency_s()
    if latency:
        await asyncio.sleep(latency)

    reason = await _authenticate(state, request, entry)
    if reason is not None:
        failed = _error(entry, request_id, "UNAUTHENTICATED", f"Authentication failed: {reason}")
        return state, entry, request_id, failed
    return state, entry, request_id, None


def _peer(request: web.Request) -> str | None:
    """``host:port`` of the client's end of the connection (which process asked, in a test
    that runs several), or None once the connection is gone."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else None


async def _authenticate(
    state: SimulatorState, request: web.Request, entry: dict[str, Any], service: str | None = None
) -> str | None:
    """Why the request's signature or credentials are refused (401), or None; ``service``
    is the signing scope's service when one is required (``sts``)."""
    reason = verify_request(
        method=request.method,
        host=request.host,
        path=request.rel_url.raw_path,
        query=request.rel_url.raw_query_string,
        headers=request.headers,
        body=await request.read(),
        secret_for=state.secret_for,
    )
    if reason is None and service and f"/{service}/" not in request.headers["Authorization"]:
        reason = f"these requests are signed for service {service}"
    return reason if reason is not None else _refusal(state, request, entry)


CALLER: web.RequestKey[SimAccount] = web.RequestKey("simulator_caller", SimAccount)
"""``request[CALLER]``: the :class:`SimAccount` a validly signed request acts as."""


def _refusal(state: SimulatorState, request: web.Request, entry: dict[str, Any]) -> str | None:
    """After a valid signature: the account it acts as (``request[CALLER]``), or why the
    credentials are refused anyway (disabled key pair, expired role session)."""
    access_key = _access_key(request.headers.get("Authorization", ""))
    caller = state.accounts.caller(access_key)
    assert caller is not None  # the signature was checked against its secret
    now = time.time()
    if caller.expires_at is not None and _signed_at(request) >= caller.expires_at:
        state.counters["sts:signed_expired"] += 1
    reason = state.accounts.refusal(caller, request.headers.get(HEADER_SECURITY_TOKEN), now)
    if reason is not None:
        state.counters["refused:" + caller.account.name] += 1
        return reason
    entry["account"] = caller.account.name
    request[CALLER] = caller.account
    return None


def _access_key(authorization: str) -> str:
    credential = authorization.partition("Credential=")[2]
    return credential.partition("/")[0]


def _signed_at(request: web.Request) -> float:
    stamp = request.headers.get(HEADER_DATE, "")
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _viewer(request: web.Request) -> str:
    return request[CALLER].pin


def _decide_fault(
    state: SimulatorState, entry: dict[str, Any], region: str, source: str | None
) -> Fault | None:
    fault = state.faults.decide(region, source)
    if fault is not None:
        entry["fault"] = fault.kind if fault.kind != "status" else fault.status
        state.counters[f"fault:{entry['fault']}"] += 1
    return fault


async def describe_images(request: web.Request) -> web.StreamResponse:
    state, entry, request_id, refused = await _admitted(request)
    if refused is not None:
        return refused
    region = request.match_info["regionId"]
    params = request.query
    ids = _ids(params)
    source = None if ids else params.get("imageSource")
    fault = _decide_fault(state, entry, region, source)
    if fault is not None and fault.kind != "truncated":
        return await _inject(request, entry, request_id, fault)

    try:
        page_number = _int_param(params, "pageNumber", 1)
        page_size = _int_param(params, "pageSize", 20)
        if page_number < 1:
            raise _ApiError("INVALID_ARGUMENT", "Invalid parameter pageNumber")
        if not 10 <= page_size <= 100:
            raise _ApiError("OUT_OF_RANGE", "PageSize out of range")
        if region not in state.catalogue.regions:
            raise _ApiError("INVALID_ARGUMENT", f"Invalid parameter regionId: {region}")
        if ids:
            images, total = state.catalogue.list_ids(
                region, ids, page_number=page_number, page_size=page_size, viewer=_viewer(request)
            )
        else:
            query = _listing_query(params)
            if state.faults.should_drift():
                _drift(state, region, query)
            images, total = state.catalogue.list_page(
                region, query, page_number=page_number, page_size=page_size, viewer=_viewer(request)
            )
    except _ApiError as error:
        return await _refuse(request, entry, request_id, error, fault)

    entry["status"] = 200
    payload = b"".join(
        (
            b'{"requestId":"',
            request_id.encode(),
            b'","result":{"images":',
            images,
            b',"totalCount":',
            str(total).encode(),
            b"}}",
        )
    )
    if fault is not None:
        return await _truncated(request, 200, payload, request_id)
    return _json(payload, request_id)


async def _refuse(
    request: web.Request,
    entry: dict[str, Any],
    request_id: str,
    error: _ApiError,
    fault: Fault | None,
) -> web.StreamResponse:
    """The API's error response (cut short when the fault is ``truncated``)."""
    response = _error(entry, request_id, error.status, error.message)
    if fault is None:
        return response
    assert isinstance(response.body, bytes)
    return await _truncated(request, response.status, response.body, request_id)


# --- describeImage, describeImageMembers, describeImageConstraints[Batch] ---------------


async def _image_api(
    request: web.Request, api: str, answer: Callable[[SimulatorState, str], Any]
) -> web.StreamResponse:
    """One of the other image APIs: admission, faults, then ``{"result": answer(...)}``.
    ``answer`` raises :class:`_ApiError` (or :class:`CatalogueError`: 404 NOT_FOUND)."""
    state, entry, request_id, refused = await _admitted(request)
    if refused is not None:
        return refused
    region = request.match_info["regionId"]
    fault = _decide_fault(state, entry, region, api)
    if fault is not None and fault.kind != "truncated":
        return await _inject(request, entry, request_id, fault)
    try:
        if region not in state.catalogue.regions:
            raise _ApiError("INVALID_ARGUMENT", f"Invalid parameter regionId: {region}")
        try:
            result = answer(state, region)
        except CatalogueError as exc:
            raise _ApiError("NOT_FOUND", str(exc)) from None
    except _ApiError as error:
        return await _refuse(request, entry, request_id, error, fault)
    entry["status"] = 200
    payload = orjson.dumps({"requestId": request_id, "result": result})
    if fault is not None:
        return await _truncated(request, 200, payload, request_id)
    return _json(payload, request_id)


def _image_of(state: SimulatorState, region: str, image_id: str) -> dict[str, Any]:
    image = state.catalogue.get(region, image_id)
    if image is None:
        raise _ApiError("NOT_FOUND", f"Image {image_id} not found")
    return image


def _constraint_of(state: SimulatorState, region: str, image_id: str) -> dict[str, Any]:
    return {
        "imageId": image_id,
        "imageInstanceTypeConstraint": state.catalogue.constraint(region, image_id),
    }


async def describe_image(request: web.Request) -> web.StreamResponse:
    image_id = request.match_info["imageId"]
    return await _image_api(
        request,
        "describeImage",
        lambda state, region: {"image": _image_of(state, region, image_id)},
    )


async def describe_image_members(request: web.Request) -> web.StreamResponse:
    image_id = request.match_info["imageId"]

    def answer(state: SimulatorState, region: str) -> dict[str, Any]:
        _image_of(state, region, image_id)
        return {"pins": state.catalogue.members(region, image_id, _viewer(request))}

    return await _image_api(request, "describeImageMembers", answer)


async def describe_image_constraints(request: web.Request) -> web.StreamResponse:
    image_id = request.match_info["imageId"]

    def answer(state: SimulatorState, region: str) -> dict[str, Any]:
        _image_of(state, region, image_id)
        return {"imageConstraints": _constraint_of(state, region, image_id)}

    return await _image_api(request, "describeImageConstraints", answer)


async def describe_constraints_batch(request: web.Request) -> web.StreamResponse:
    ids = _ids(request.query)

    def answer(state: SimulatorState, region: str) -> dict[str, Any]:
        catalogue = state.catalogue
        found = [
            _constraint_of(state, region, image_id)
            for image_id in dict.fromkeys(ids)
            if catalogue.source_of(region, image_id) is not None
            and catalogue.constraint(region, image_id) is not None
        ]
        return {"imageConstraints": found}

    return await _image_api(request, "describeImageConstraintsBatch", answer)


async def _truncated(
    request: web.Request, status: int, payload: bytes, request_id: str
) -> web.StreamResponse:
    """The response announced with its full length, cut in the middle, connection dropped."""
    response = web.StreamResponse(status=status, headers={"x-jdcloud-request-id": request_id})
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.abort()
    return response


def _ids(params: Mapping[str, str]) -> list[str]:
    numbered = []
    for name, value in params.items():
        match = _IDS_PARAM.fullmatch(name)
        if match:
            numbered.append((int(match[1]), value))
    return [value for _, value in sorted(numbered)]


def _int_param(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise _ApiError("INVALID_ARGUMENT", f"Invalid parameter {name}") from None


def _bool_param(params: Mapping[str, str], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise _ApiError("INVALID_ARGUMENT", f"Invalid parameter {name}")
    return lowered == "true"


def _listing_query(params: Mapping[str, str]) -> ListingQuery:
    source = params.get("imageSource")
    if not source:
        raise _ApiError("FAILED_PRECONDITION", "Parameter ImageSource missing")
    if source not in SOURCES:
        raise _ApiError("INVALID_ARGUMENT", f"Invalid parameter imageSource: {source}")
    return ListingQuery(
        source=source,
        offline=_bool_param(params, "offline"),
        platform=params.get("platform") or None,
        image_name=params.get("imageName") or None,
        root_device_type=params.get("rootDeviceType") or None,
        launch_permission=params.get("launchPermission") or None,
        status=params.get("status") or None,
        architecture=params.get("architecture") or None,
        boot_mode=params.get("bootMode") or None,
    )


def _drift(state: SimulatorState, region: str, query: ListingQuery) -> None:
    """Insert or delete one image in the partition being listed (as the listing sees it)."""
    catalogue, rng = state.catalogue, state.faults.rng
    if (region, query.source) not in catalogue.partitions():
        return
    offline = query.normalised().offline
    if rng.random() < 0.5:
        fields = {} if offline is None else {"offline": offline}
        state.record_change("add", region, catalogue.add(region, query.source, **fields))
        state.counters["drift:add"] += 1
        return
    image_id = catalogue.random_image_id(region, query.source, rng, offline=offline)
    if image_id is not None:
        state.record_change("delete", region, catalogue.delete(region, image_id))
        state.counters["drift:delete"] += 1


async def _inject(
    request: web.Request, entry: dict[str, Any], request_id: str, fault: Fault
) -> web.StreamResponse:
    state = request.app[STATE]
    if fault.status is not None:
        response = _error(
            entry, request_id, fault.status, _MESSAGES.get(fault.status, fault.status)
        )
        if fault.status == "RATE_LIMIT":
            response.headers["Retry-After"] = str(state.faults.config.retry_after_s)
        return response
    if fault.kind == "reset":
        entry["status"] = "reset"
        if request.transport is not None:
            request.transport.abort()
        # Nothing reaches the client; this response is only for aiohttp's bookkeeping.
        return web.Response(status=499)
    entry["status"] = 200
    if fault.kind == "malformed":
        return web.Response(
            body=b'{"requestId":"'
            + request_id.encode()
            + b'","result":{"images":[{"imageId":"img-',
            content_type="application/json",
            headers={"x-jdcloud-request-id": request_id},
        )
    if fault.kind == "html":
        return web.Response(body=_HTML_PAGE, content_type="text/html")
    if fault.kind == "error_200":
        return _json(_error_body(request_id, "INTERNAL", _MESSAGES["INTERNAL"]), request_id)
    raise AssertionError(f"unhandled fault {fault}")  # truncated is applied by the caller


def _error_body(request_id: str, status: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "requestId": request_id,
            "error": {"code": STATUS_CODES[status], "status": status, "message": message},
        }
    )


def _error(entry: dict[str, Any], request_id: str, status: str, message: str) -> web.Response:
    code = STATUS_CODES[status]
    entry["status"] = code
    return _json(_error_body(request_id, status, message), request_id, status=code)


def _json(payload: bytes, request_id: str, *, status: int = 200) -> web.Response:
    return web.Response(
        body=payload,
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers={"x-jdcloud-request-id": request_id},
    )


async def not_found(request: web.Request) -> web.Response:
    return _json(
        _error_body(
            os.urandom(16).hex(), "NOT_FOUND", f"No route for {request.method} {request.path}"
        ),
        "",
        status=404,
    )


# --- admin ---------------------------------------------------------------------------------


def _admin_json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


def admin_operations(app: web.Application) -> list[dict[str, str]]:
    """The admin routes of ``app`` (method, path, what it does), from its router: the
    index at ``/__simulator__/`` and ``image-sync simulate --help`` list these."""
    operations = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if (
            not path.startswith(f"{ADMIN_PREFIX}/")
            or route.handler is admin_index
            or route.method == "HEAD"  # added by every add_get
        ):
            continue
        doc = (route.handler.__doc__ or "").strip().splitlines()
        operations.append({"method": route.method, "path": path, "doc": doc[0] if doc else ""})
    return operations


async def admin_index(request: web.Request) -> web.Response:
    """The admin operations, as JSON."""
    return _admin_json({"operations": admin_operations(request.app)})


async def get_faults(request: web.Request) -> web.Response:
    """The fault configuration in force."""
    return _admin_json(request.app[STATE].faults.to_dict())


async def put_faults(request: web.Request) -> web.Response:
    """Change the faults: a JSON object of FaultConfig fields (simulator/faults.py)."""
    faults = request.app[STATE].faults
    try:
        faults.update(await _json_body(request))
    except (TypeError, ValueError) as exc:
        return _admin_json({"error": str(exc)}, status=400)
    return _admin_json(faults.to_dict())


_OPERATIONS = ("take_offline", "bring_online", "add", "delete", "modify")


async def change_catalogue(request: web.Request) -> web.Response:
    """Change the catalogue: op is take_offline, bring_online, add, delete or modify.

    Body: {"region", "image_id" | "source", "fields"}."""
    catalogue = request.app[STATE].catalogue
    op = request.match_info["op"]
    if op not in _OPERATIONS:
        return _admin_json({"error": f"unknown operation {op!r}; one of {_OPERATIONS}"}, status=404)
    body = await _json_body(request)
    try:
        region = body["region"]
        fields = body.get("fields") or {}
        if op == "add":
            image = catalogue.add(region, body["source"], **fields)
        elif op == "modify":
            image = catalogue.modify(region, body["image_id"], **fields)
        else:
            image = getattr(catalogue, op)(region, body["image_id"])
    except CatalogueError as exc:
        return _admin_json({"error": str(exc)}, status=404)
    except KeyError as exc:
        return _admin_json({"error": f"missing {exc.args[0]!r}"}, status=400)
    except (TypeError, ValueError) as exc:
        return _admin_json({"error": str(exc)}, status=400)
    request.app[STATE].record_change(op, region, image)
    return _admin_json({"image": image})


async def change_shares(request: web.Request) -> web.Response:
    """POST /__simulator__/shares/{share|unshare} with {"region", "image_id", "pins"}."""
    op = request.match_info["op"]
    if op not in ("share", "unshare"):
        return _admin_json({"error": f"unknown operation {op!r}; share or unshare"}, status=404)
    body = await _json_body(request)
    catalogue = request.app[STATE].catalogue
    return _admin_change(
        lambda: {"pins": getattr(catalogue, op)(body["region"], body["image_id"], body["pins"])}
    )


async def put_constraint(request: web.Request) -> web.Response:
    """PUT /__simulator__/constraints with {"region", "image_id", "constraint" | null}."""
    body = await _json_body(request)
    catalogue = request.app[STATE].catalogue
    return _admin_change(
        lambda: {
            "constraint": catalogue.set_constraint(
                body["region"], body["image_id"], body.get("constraint")
            )
        }
    )


async def get_changes(request: web.Request) -> web.Response:
    """The change log after sequence number ``?since=N`` (default 0: all of it)."""
    since = request.query.get("since", "0")
    if not since.isdigit():
        return _admin_json({"error": "since must be a whole number"}, status=400)
    changes = request.app[STATE].changes
    return _admin_json({"changes": changes[int(since) :], "last": len(changes)})


async def get_catalogue(request: web.Request) -> web.Response:
    """Every image, online and offline: {"region/source": [image, ...]} in served order."""
    catalogue = request.app[STATE].catalogue
    return _admin_json(
        {
            f"{region}/{source}": catalogue.images(region, source)
            for region, source in catalogue.partitions()
        }
    )


def _admin_change(change: Callable[[], dict[str, Any]]) -> web.Response:
    try:
        return _admin_json(change())
    except CatalogueError as exc:
        return _admin_json({"error": str(exc)}, status=404)
    except KeyError as exc:
        return _admin_json({"error": f"missing {exc.args[0]!r}"}, status=400)
    except (TypeError, ValueError, AttributeError) as exc:
        return _admin_json({"error": str(exc)}, status=400)


async def get_requests(request: web.Request) -> web.Response:
    """The request log, oldest first; ?limit=N keeps the last N."""
    log = list(request.app[STATE].requests)
    limit = request.query.get("limit")
    if limit is not None and limit.isdigit():
        log = log[-int(limit) :] if int(limit) else []
    return _admin_json({"requests": log})


async def clear_requests(request: web.Request) -> web.Response:
    """Empty the request log."""
    request.app[STATE].requests.clear()
    return _admin_json({"requests": []})


async def get_stats(request: web.Request) -> web.Response:
    """Requests served, by status."""
    state = request.app[STATE]
    by_status = Counter(str(entry["status"]) for entry in state.requests)
    return _admin_json(
        {
            "counters": dict(state.counters),
            "logged_by_status": dict(by_status),
            "images": len(state.catalogue),
            "partitions": {
                f"{region}/{source}": state.catalogue.count(region, source)
                for region, source in state.catalogue.partitions()
            },
        }
    )


# --- STS and accounts ---------------------------------------------------------------------


async def assume_role(request: web.Request) -> web.Response:
    """STS ``POST /v1/sessionToken:assumeRole``: temporary credentials of a role."""
    state = request.app[STATE]
    request_id = os.urandom(16).hex()
    entry: dict[str, Any] = {
        "time": time.time(),
        "region": "jdcloud-api",
        "path": request.rel_url.raw_path,
        "query": "",
        "status": None,
        "fault": None,
        "peer": _peer(request),
    }
    state.requests.append(entry)
    state.counters["sts:assumeRole"] += 1
    body = await request.read()
    reason = await _authenticate(state, request, entry, service="sts")
    if reason is not None:
        return _error(entry, request_id, "UNAUTHENTICATED", f"Authentication failed: {reason}")
    caller = state.accounts.caller(_access_key(request.headers["Authorization"]))
    assert caller is not None
    try:
        info = orjson.loads(body)["assumeRoleInfo"]
        jrn, name = info["roleJrn"], info["roleSessionName"]
        duration = info.get("durationSeconds")
        if not isinstance(jrn, str) or not isinstance(name, str):
            raise TypeError
        if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool)):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _error(entry, request_id, "INVALID_ARGUMENT", "Invalid parameter assumeRoleInfo")
    try:
        credentials = state.accounts.assume_role(caller, jrn, name, duration)
    except PermissionError as exc:
        return _error(entry, request_id, "HTTP_FORBIDDEN", f"Forbidden: {exc}")
    except LookupError as exc:
        return _error(entry, request_id, "NOT_FOUND", str(exc))
    except ValueError as exc:
        return _error(entry, request_id, "INVALID_ARGUMENT", str(exc))
    entry["status"] = 200
    entry["account"] = caller.account.name
    return _json(
        orjson.dumps(
            {
                "requestId": request_id,
                "result": {
                    "credentials": credentials,
                    "assumedRoleUser": {"assumedRoleId": jrn, "arn": f"{jrn}/{name}"},
                },
            }
        ),
        request_id,
    )


async def get_accounts(request: web.Request) -> web.Response:
    """The accounts (name, pin, access key, refused), roles and STS settings; no secret."""
    accounts = request.app[STATE].accounts
    return _admin_json(
        {
            "accounts": [
                {"name": a.name, "pin": a.pin, "access_key": a.access_key, "refused": a.refused}
                for a in accounts.all()
            ],
            "roles": [
                {"jrn": r.jrn, "account": r.account, "trusts": sorted(r.trusts)}
                for r in accounts.roles()
            ],
            "sts_lifetime": accounts.sts_lifetime,
            "assume_role_calls": accounts.assume_role_calls,
        }
    )


async def add_account(request: web.Request) -> web.Response:
    """Add an account: {"name", "pin", "access_key", "secret_key"}."""
    body = await _json_body(request)
    accounts = request.app[STATE].accounts
    return _admin_change(
        lambda: {
            "name": accounts.add(
                body["name"],
                pin=body["pin"],
                access_key=body["access_key"],
                secret_key=body["secret_key"],
            ).name
        }
    )


async def refuse_account(request: web.Request) -> web.Response:
    """Refuse (body {"refused": true}, the default) or accept again an account's keys."""
    body = await _json_body(request)
    accounts = request.app[STATE].accounts
    name = request.match_info["name"]

    def change() -> dict[str, Any]:
        refused = bool(body.get("refused", True))
        accounts.refuse(name, refused)
        return {"name": name, "refused": refused}

    return _admin_change(change)


async def add_role(request: web.Request) -> web.Response:
    """Add a role: {"account", "name", "trusts": [account names]}; answers its jrn."""
    body = await _json_body(request)
    accounts = request.app[STATE].accounts
    return _admin_change(
        lambda: {"jrn": accounts.add_role(body["account"], body["name"], trusts=body["trusts"]).jrn}
    )


async def organisation(request: web.Request) -> web.Response:
    """Bulk: {"accounts": [{name, pin, access_key, secret_key, role?}], "images_per_region", "share_every"}."""
    body = await _json_body(request)
    state = request.app[STATE]
    return _admin_change(
        lambda: add_organisation(
            state.catalogue,
            state.accounts,
            body["accounts"],
            images_per_region=int(body["images_per_region"]),
            share_every=int(body.get("share_every", 0)),
            on_add=lambda region, image: state.record_change("add", region, image),
        )
    )


async def put_sts(request: web.Request) -> web.Response:
    """Set the lifetime of temporary credentials issued from now: {"lifetime": seconds}."""
    body = await _json_body(request)
    accounts = request.app[STATE].accounts

    def change() -> dict[str, Any]:
        lifetime = float(body["lifetime"])
        if not 0 < lifetime <= 86400:
            raise ValueError("lifetime must be within (0, 86400] seconds")
        accounts.sts_lifetime = lifetime
        return {"sts_lifetime": lifetime}

    return _admin_change(change)


async def expire_sessions(request: web.Request) -> web.Response:
    """End every role session now (their next request is 401): {"expired": n}."""
    return _admin_json({"expired": request.app[STATE].accounts.expire_sessions()})


# --- running it ----------------------------------------------------------------------------


@dataclass(slots=True)
class Simulator:
    """A running simulator: where it listens and what it serves."""

    url: str
    host: str
    port: int
    app: web.Application

    @property
    def endpoint(self) -> str:
        """``host:port``, as the SDK's ``Config(endpoint, scheme="http")`` wants it."""
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> SimulatorState:
        return self.app[STATE]

    @property
    def catalogue(self) -> Catalogue:
        return self.state.catalogue

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def requests(self) -> deque[dict[str, Any]]:
        """The request log (bounded; newest last): time, region, path, query, status, fault."""
        return self.state.requests


@contextlib.asynccontextmanager
async def running_simulator(
    catalogue: Catalogue | None = None,
    *,
    seed: int = 0,
    images: int = 2000,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults | FaultConfig | Mapping[str, Any] | None = None,
    access_key: str = DEMO_ACCESS_KEY,
    secret_key: str = DEMO_SECRET_KEY,
    sts_lifetime: float = DEFAULT_STS_LIFETIME,
    **catalogue_options: Any,
) -> AsyncIterator[Simulator]:
    """Serve a simulator in the current event loop for the duration of the block.

    Without ``catalogue`` one is generated from ``seed``, ``images`` and
    ``catalogue_options`` (regions, sources, skew). ``port=0`` picks a free port.
    """
    if catalogue is None:
        catalogue = Catalogue(seed=seed, images=images, **catalogue_options)
    elif catalogue_options:
        raise TypeError("catalogue options given together with a catalogue")
    app = build_app(
        catalogue,
        access_key=access_key,
        secret_key=secret_key,
        faults=faults,
        sts_lifetime=sts_lifetime,
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield Simulator(
            url=f"http://{url_host}:{bound_port}", host=url_host, port=bound_port, app=app
        )
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def simulator_in_thread(**options: Any) -> Iterator[Simulator]:
    """Serve a simulator from a background thread with its own loop (for blocking clients).

    Takes the options of :func:`running_simulator`. Change the catalogue or faults of
    the running simulator through the admin endpoints, not the objects: they belong
    to the simulator's thread.
    """
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        try:
            async with running_simulator(**options) as simulator:
                holder["simulator"] = simulator
                holder["loop"] = asyncio.get_running_loop()
                holder["stop"] = stop = asyncio.Event()
                started.set()
                await stop.wait()
        except BaseException as exc:  # reported to the caller's thread below
            holder["error"] = exc
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="simulator", daemon=True)
    thread.start()
    started.wait()
    if "error" in holder:
        thread.join()
        raise RuntimeError("the simulator did not start") from holder["error"]
    try:
        yield holder["simulator"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(timeout=10)
