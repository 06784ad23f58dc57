"""JDCLOUD3-HMAC-SHA256 request signing, byte-compatible with the official SDK.

The reference is ``jdcloud_sdk.core.signer.Signer.signV3`` (jdcloud-sdk 1.6.x) and
the query encoding of ``jdcloud_sdk.core.parameterbuilder.WithoutBodyBuilder``.
Its quirks are reproduced on purpose, because the gateway was built against them:

- The canonical query is rebuilt from the wire query: split on ``&``, each side of
  the first ``=`` is ``unquote_plus``-decoded then ``quote(..., safe='~')``-encoded,
  the pairs are sorted, and a pair without ``=`` is dropped.
- The canonical URI is the path ``unquote_plus``-decoded, runs of ``/`` collapsed,
  then ``quote(..., safe='/~')``-encoded.
- The signed headers are ``host`` plus every header sent except ``authorization``
  and ``user-agent``. ``host`` carries ``:port`` when the port is not 80/443.
- The signing key chain starts from ``"JDCLOUD3" + secret``; the scope ends in
  ``jdcloud3_request``.

Two deliberate choices where the SDK leaves room:

- ``x-jdcloud-date`` and ``x-jdcloud-nonce`` are always signed (the SDK signs them
  only when the caller put them in the headers; signing them always is the same
  algorithm and protects the nonce).
- A security token is sent base64-encoded in ``x-jdcloud-security-token`` and is
  signed, exactly as ``JDCloudClient`` does with ``const.HEADER_BASE64``.

Everything here is a pure function of its arguments (except the default date and
nonce). Secrets never appear in a return value other than through the HMAC, and
never in an error reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote_plus

__all__ = [
    "ALGORITHM",
    "DEMO_ACCESS_KEY",
    "DEMO_SECRET_KEY",
    "HEADER_CONTENT_SHA256",
    "HEADER_DATE",
    "HEADER_NONCE",
    "HEADER_SECURITY_TOKEN",
    "Credentials",
    "QueryValue",
    "encode_query",
    "sign_headers",
    "verify_request",
]

# The fixed pair the simulator, `image-sync demo` and the tests use when
# JDCLOUD_ACCESS_KEY/JDCLOUD_SECRET_KEY are unset. Not a credential of any account.
DEMO_ACCESS_KEY = "JDCDEMOACCESSKEY0000000000000000"
DEMO_SECRET_KEY = "JDCDEMOSECRETKEY-not-a-real-secret-0000"


@dataclass(frozen=True, slots=True)
class Credentials:
    """An access key pair (and session token) to sign with; the secret never appears in
    ``repr``."""

    access_key: str
    secret_key: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)

    @classmethod
    def demo(cls) -> Credentials:
        """The simulator's fixed pair (:data:`DEMO_ACCESS_KEY`, :data:`DEMO_SECRET_KEY`)."""
        return cls(DEMO_ACCESS_KEY, DEMO_SECRET_KEY)


ALGORITHM = "JDCLOUD3-HMAC-SHA256"
_KEY_PREFIX = "JDCLOUD3"
_SCOPE_TERMINATOR = "jdcloud3_request"
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

HEADER_DATE = "x-jdcloud-date"
HEADER_NONCE = "x-jdcloud-nonce"
HEADER_CONTENT_SHA256 = "x-jdcloud-content-sha256"
HEADER_SECURITY_TOKEN = "x-jdcloud-security-token"
_HEADER_AUTHORIZATION = "Authorization"
_UNSIGNED_HEADERS = frozenset({"authorization", "user-agent"})

_SLASHES = re.compile("/+")
_AUTHORIZATION = re.compile(
    re.escape(ALGORITHM) + r" Credential=(?P<access_key>[^/,\s]+)/(?P<date>\d{8})/"
    r"(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)/" + _SCOPE_TERMINATOR + r", "
    r"SignedHeaders=(?P<signed_headers>[^,\s]+), Signature=(?P<signature>[0-9a-f]{64})"
)

QueryValue = str | int | bool | Sequence[str | int]
"""A query parameter value; a non-string sequence becomes ``name.1=..&name.2=..``."""


def encode_query(params: Sequence[tuple[str, QueryValue]]) -> str:
    """The query string (no leading ``?``) as the SDK's WithoutBodyBuilder sends it.

    Pairs keep their order; list values expand to ``name.1=a&name.2=b``; booleans
    are ``true``/``false``. The joined string is percent-encoded as a whole with
    ``quote(..., safe='&=?')``, like the SDK (so ``&`` or ``=`` inside a value are
    not escaped: don't send them).
    """
    parts: list[str] = []
    for name, value in params:
        if isinstance(value, str | int):
            parts.append(f"{name}={_format_scalar(value)}")
        else:
            parts.extend(
                f"{name}.{index}={_format_scalar(item)}" for index, item in enumerate(value, 1)
            )
    return quote("&".join(parts), safe="&=?")


def sign_headers(
    *,
    method: str,
    host: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes | str,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "vm",
    security_token: str | None = None,
    date: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers to add to a request so that the gateway accepts it.

    ``host`` is the Host header as sent (``name:port`` when the port is not the
    scheme's default). ``path`` and ``query`` are as they appear on the wire.
    ``headers`` are the other headers the request will carry (all are signed
    except Authorization and User-Agent). ``date`` looks like ``20261126T120000Z``
    and defaults to now (UTC); ``nonce`` defaults to a random UUID. An
    ``x-jdcloud-date``/``x-jdcloud-nonce`` already in ``headers`` wins, as in the SDK.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    jd_date = lowered.get(HEADER_DATE) or date or datetime.now(UTC).strftime(_DATE_FORMAT)
    jd_nonce = lowered.get(HEADER_NONCE) or nonce or str(uuid.uuid4())
    added = {HEADER_DATE: jd_date, HEADER_NONCE: jd_nonce}
    if security_token:
        added[HEADER_SECURITY_TOKEN] = base64.b64encode(security_token.encode()).decode("ascii")
    to_sign = {**lowered, **added}
    payload_hash = _sha256_hex(body)
    signed_names, signature = _signature(
        method=method,
        host=host,
        path=path,
        query=query,
        headers=to_sign,
        signed_names=_signed_header_names(to_sign),
        payload_hash=payload_hash,
        secret_key=secret_key,
        date=jd_date,
        region=region,
        service=service,
    )
    scope = _credential_scope(jd_date[:8], region, service)
    authorization = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed_names)}, Signature={signature}"
    )
    return {
        _HEADER_AUTHORIZATION: authorization,
        **added,
        HEADER_CONTENT_SHA256: payload_hash,
        # The SDK sends this header too (its name is the algorithm); kept for parity.
        ALGORITHM: ALGORITHM,
    }


def verify_request(
    *,
    method: str,
    host: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    max_skew_seconds: int = 900,
) -> str | None:
    """Check a signed request as the gateway would; None when valid, else a short reason.

    ``secret_for`` maps an access key to its secret (None: unknown key). The
    signature is recomputed over the headers the Authorization header lists and
    compared in constant time. The reason never contains the secret.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    authorization = lowered.get("authorization")
    if not authorization:
        return "missing Authorization header"
    match = _AUTHORIZATION.fullmatch(authorization.strip())
    if match is None:
        return f"malformed Authorization header (expected {ALGORITHM})"
    secret_key = secret_for(match["access_key"])
    if secret_key is None:
        return "unknown access key"
    jd_date = lowered.get(HEADER_DATE)
    if not jd_date:
        return f"missing {HEADER_DATE} header"
    try:
        signed_at = datetime.strptime(jd_date, _DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return f"malformed {HEADER_DATE} header"
    if jd_date[:8] != match["date"]:
        return f"{HEADER_DATE} does not match the credential scope"
    if abs((datetime.now(UTC) - signed_at).total_seconds()) > max_skew_seconds:
        return f"{HEADER_DATE} is more than {max_skew_seconds}s away from server time"
    signed_names = match["signed_headers"].split(";")
    if "host" not in signed_names:
        return "host is not a signed header"
    missing = [name for name in signed_names if name != "host" and name not in lowered]
    if missing:
        return f"signed header {missing[0]} is missing"
    _, expected = _signature(
        method=method,
        host=host,
        path=path,
        query=query,
        headers=lowered,
        signed_names=signed_names,
        payload_hash=_sha256_hex(body),
        secret_key=secret_key,
        date=jd_date,
        region=match["region"],
        service=match["service"],
    )
    if not hmac.compare_digest(expected, match["signature"]):
        return "signature mismatch"
    return None


def _format_scalar(value: str | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """``host`` plus every header except the unsigned ones, sorted (lower-case keys)."""
    names = {"host"}
    names.update(name for name in headers if name not in _UNSIGNED_HEADERS)
    return sorted(names)


def _signature(
    *,
    method: str,
    host: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    signed_names: Sequence[str],
    payload_hash: str,
    secret_key: str,
    date: str,
    region: str,
    service: str,
) -> tuple[list[str], str]:
    """(signed header names, hex signature); ``headers`` has lower-case keys."""
    canonical_host = _strip_scheme(host).strip()
    canonical_headers = "".join(
        f"host:{canonical_host}\n" if name == "host" else f"{name}:{headers[name].strip()}\n"
        for name in signed_names
    )
    canonical_request = "\n".join(
        (
            method,
            _canonical_uri(path),
            _canonical_query(query),
            canonical_headers,
            ";".join(signed_names),
            payload_hash,
        )
    )
    date_stamp = date[:8]
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            date,
            _credential_scope(date_stamp, region, service),
            _sha256_hex(canonical_request),
        )
    )
    key = (_KEY_PREFIX + secret_key).encode()
    for part in (date_stamp, region, service, _SCOPE_TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return list(signed_names), signature


def _credential_scope(date_stamp: str, region: str, service: str) -> str:
    return f"{date_stamp}/{region}/{service}/{_SCOPE_TERMINATOR}"


def _canonical_query(query: str) -> str:
    pairs = sorted(
        [quote(unquote_plus(side), safe="~") for side in item.split("=", 1)]
        for item in query.split("&")
        if item
    )
    # A pair without "=" (or with an empty name) is dropped, as in the SDK.
    return "&".join(f"{pair[0]}={pair[1]}" for pair in pairs if pair[0] and len(pair) == 2)


def _canonical_uri(path: str) -> str:
    decoded = _SLASHES.sub("/", unquote_plus(path))
    if not decoded:
        return "/"
    encoded = quote(decoded, safe="/~")
    return encoded if encoded.startswith("/") else "/" + encoded


def _strip_scheme(host: str) -> str:
    lowered = host.lower()
    for prefix in ("http://", "https://"):
        if lowered.startswith(prefix):
            return host[len(prefix) :]
    return host


def _sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
