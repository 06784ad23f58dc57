"""service.jdcloud.signer against the official SDK's Signer and WithoutBodyBuilder."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jdcloud_sdk.core.credential import Credential
from jdcloud_sdk.core.logger import Logger
from jdcloud_sdk.core.parameterbuilder import WithoutBodyBuilder
from jdcloud_sdk.core.signer import Signer
from jdcloud_sdk.services.vm.apis.DescribeImagesRequest import (
    DescribeImagesParameters,
    DescribeImagesRequest,
)

from service.jdcloud.signer import (
    ALGORITHM,
    DEMO_ACCESS_KEY,
    DEMO_SECRET_KEY,
    encode_query,
    sign_headers,
    verify_request,
)

# The SDK computes utcnow() on every call (deprecated on 3.12+), even when the date is given.
pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning"
)

DATE = "20261126T120000Z"
NONCE = "6f1c1f43-6a4f-4d1e-9f55-0a3c1d7e0b42"
AK = "AKTEST0123456789"
SK = "sk/with+odd=chars"
SDK_HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "JdcloudSdkPython/1.6.354 vm/1.6.1",
}


def sdk_sign(
    *,
    method: str = "GET",
    host: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: str = "",
    region: str = "cn-north-1",
    service: str = "vm",
    security_token: str = "",
) -> dict[str, str]:
    """What the SDK adds, with the fixed date and nonce in the headers as it reads them."""
    sdk_headers = {**headers, "x-jdcloud-date": DATE, "x-jdcloud-nonce": NONCE}
    if security_token:
        # JDCloudClient base64-encodes this header and passes the encoded value on.
        security_token = base64.b64encode(security_token.encode()).decode()
        sdk_headers["x-jdcloud-security-token"] = security_token
    Signer(Logger(0)).signV3(
        method,
        service,
        region,
        host,
        path,
        query,
        sdk_headers,
        body,
        Credential(AK, SK),
        security_token,
    )
    return sdk_headers


def our_sign(
    *,
    method: str = "GET",
    host: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: str = "",
    region: str = "cn-north-1",
    service: str = "vm",
    security_token: str = "",
) -> dict[str, str]:
    return sign_headers(
        method=method,
        host=host,
        path=path,
        query=query,
        headers=headers,
        body=body,
        access_key=AK,
        secret_key=SK,
        region=region,
        service=service,
        security_token=security_token or None,
        date=DATE,
        nonce=NONCE,
    )


CASES = {
    "describe-images": dict(
        host="vm.jdcloud-api.com",
        path="/v1/regions/cn-north-1/images",
        query="imageSource=public&pageNumber=1&pageSize=100",
        headers=SDK_HEADERS,
    ),
    "empty-query": dict(
        host="vm.jdcloud-api.com", path="/v1/regions/cn-east-2/images", query="", headers={}
    ),
    "ids-list": dict(
        host="vm.jdcloud-api.com",
        path="/v1/regions/cn-north-1/images",
        query="ids.1=img-abc&ids.2=img-def&ids.10=img-xyz",
        headers=SDK_HEADERS,
    ),
    "chinese-and-spaces": dict(
        host="vm.jdcloud-api.com",
        path="/v1/regions/cn-north-1/images/中文 名/x",
        query=encode_query([("imageName", "CentOS 8.2 64位"), ("platform", "Windows Server")]),
        headers=SDK_HEADERS,
    ),
    "tilde-plus-raw": dict(
        host="vm.jdcloud-api.com",
        path="/v1/~user/a+b//c%2Fd",
        query="b=a+b&a=x~y&c=%2B%20&d=1=2&novalue&&e=",
        headers=SDK_HEADERS,
    ),
    "non-default-port": dict(
        host="127.0.0.1:8000",
        path="/v1/regions/cn-south-1/images",
        query="imageSource=private&pageSize=10",
        headers=SDK_HEADERS,
        region="cn-south-1",
    ),
    "scheme-prefixed-host": dict(
        host="http://apigw-internal-dev.cn-north-1.jcloudcs.com:8000",
        path="",
        query="z=1&y=2",
        headers={"content-type": "application/json"},
    ),
    "security-token": dict(
        host="vm.jdcloud-api.com",
        path="/v1/regions/cn-north-1/images",
        query="imageSource=shared",
        headers=SDK_HEADERS,
        security_token="sts-token/with+chars==",
    ),
    "extra-header-and-body": dict(
        method="POST",
        host="vm.jdcloud-api.com",
        path="/v1/regions/cn-north-1/images:copy",
        query="",
        headers={**SDK_HEADERS, "X-Jdcloud-Pin": "  someone  ", "x-extra": "v"},
        body='{"imageId": "img-0123456789", "名": 1}',
        service="vm",
    ),
    "other-service-region": dict(
        host="apigw-internal-dev.cn-north-1.jcloudcs.com",
        path="/v1/regions/cn-north-1/instances/ /`!@#$%^&*()=+/0123/[]\\;',<>?:\"{}|/-_.~:GET",
        query="",
        headers={"content-type": "application/json"},
        service="apigatewaytestproductline",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_authorization_matches_the_sdk_byte_for_byte(case: dict[str, str]) -> None:
    expected = sdk_sign(**case)  # type: ignore[arg-type]
    ours = our_sign(**case)  # type: ignore[arg-type]
    assert ours["Authorization"] == expected["Authorization"]
    assert ours["Authorization"].startswith(f"{ALGORITHM} Credential={AK}/20261126/")
    for name in ("x-jdcloud-date", "x-jdcloud-nonce", "x-jdcloud-content-sha256", ALGORITHM):
        assert ours[name] == expected[name]
    if case.get("security_token"):
        assert ours["x-jdcloud-security-token"] == expected["x-jdcloud-security-token"]
        assert "x-jdcloud-security-token" in ours["Authorization"]
    else:
        assert "x-jdcloud-security-token" not in ours


def test_the_known_answer_from_the_sdks_own_test_suite() -> None:
    """jdcloud_sdk/core/signer_test.py: testSign_path_chineseCharacters."""
    headers = sign_headers(
        method="GET",
        host="http://apigw-internal-dev.cn-north-1.jcloudcs.com:8000",
        path="/v1/regions/cn-north-1/instances/中文:GET",
        query="",
        headers={"content-type": "application/json"},
        body="",
        access_key="ak",
        secret_key="sk",
        region="cn-north-1",
        service="apigatewaytestproductline",
        date="20190917T064708Z",
        nonce="X-Jdcloud-Nonce",
    )
    assert headers["Authorization"] == (
        "JDCLOUD3-HMAC-SHA256 Credential=ak/20190917/cn-north-1/apigatewaytestproductline/"
        "jdcloud3_request, SignedHeaders=content-type;host;x-jdcloud-date;x-jdcloud-nonce, "
        "Signature=936ed2dcb6fb4271ad640e0f46f1fe61763a0bad8bb4f4eb1224261f969612fa"
    )


def test_a_different_secret_or_date_changes_the_signature() -> None:
    case = CASES["describe-images"]
    base = our_sign(**case)["Authorization"]  # type: ignore[arg-type]
    other = sign_headers(
        method="GET",
        host=case["host"],
        path=case["path"],
        query=case["query"],
        headers=SDK_HEADERS,
        body="",
        access_key=AK,
        secret_key=SK + "x",
        region="cn-north-1",
        date=DATE,
        nonce=NONCE,
    )["Authorization"]
    assert other != base


def test_date_and_nonce_default_to_now_and_random() -> None:
    kwargs = dict(
        method="GET",
        host="h",
        path="/",
        query="",
        headers={},
        body=b"",
        access_key=AK,
        secret_key=SK,
        region="cn-north-1",
    )
    first, second = sign_headers(**kwargs), sign_headers(**kwargs)  # type: ignore[arg-type]
    assert first["x-jdcloud-nonce"] != second["x-jdcloud-nonce"]
    signed_at = datetime.strptime(first["x-jdcloud-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60


_query_text = st.text(
    alphabet=st.sampled_from("abcXYZ019 ~+%=&._-/中文?#"), min_size=0, max_size=30
)


@settings(max_examples=200, deadline=None)
@given(path=_query_text, query=_query_text, value=_query_text)
def test_any_path_and_query_signs_like_the_sdk(path: str, query: str, value: str) -> None:
    case = dict(
        host="vm.jdcloud-api.com:8443", path="/" + path, query=query, headers={"x-v": value}
    )
    assert our_sign(**case)["Authorization"] == sdk_sign(**case)["Authorization"]  # type: ignore[arg-type]


def sdk_url(parameters: DescribeImagesParameters, endpoint: str = "vm.jdcloud-api.com") -> str:
    return WithoutBodyBuilder().build_url(DescribeImagesRequest(parameters), "https", endpoint)


def test_encode_query_matches_the_sdks_without_body_builder() -> None:
    parameters = DescribeImagesParameters("cn-north-1")
    parameters.setImageSource("public")
    parameters.setPlatform("Windows Server")
    parameters.setIds(["img-abcdefghij", "img-0123456789"])
    parameters.setImageName("CentOS 8.2 64位 ~+/x")
    parameters.setRootDeviceType("cloudDisk")
    parameters.setStatus("ready")
    parameters.setPageNumber(3)
    parameters.setPageSize(100)
    url = sdk_url(parameters)
    ours = encode_query(
        [
            ("imageSource", "public"),
            ("platform", "Windows Server"),
            ("ids", ["img-abcdefghij", "img-0123456789"]),
            ("imageName", "CentOS 8.2 64位 ~+/x"),
            ("rootDeviceType", "cloudDisk"),
            ("status", "ready"),
            ("pageNumber", 3),
            ("pageSize", 100),
        ]
    )
    assert url == f"https://vm.jdcloud-api.com/v1/regions/cn-north-1/images?{ours}"
    assert "ids.1=img-abcdefghij&ids.2=img-0123456789" in ours
    assert "%E4%BD%8D%20~%2B%2Fx" in ours


def test_encode_query_booleans_are_lower_case_and_empty_is_empty() -> None:
    assert encode_query([("offline", True), ("x", False), ("n", 0)]) == "offline=true&x=false&n=0"
    assert encode_query([]) == ""


def test_the_sdk_clients_full_signing_flow_matches() -> None:
    """Signer.sign() on the URL WithoutBodyBuilder built (what VmClient.send does)."""
    parameters = DescribeImagesParameters("cn-east-2")
    parameters.setImageSource("thirdparty")
    parameters.setImageName("Ubuntu 22.04 64位")
    parameters.setIds(["img-a", "img-b"])
    url = sdk_url(parameters, endpoint="127.0.0.1:8001")
    sdk_headers = {**SDK_HEADERS, "x-jdcloud-date": DATE, "x-jdcloud-nonce": NONCE}
    Signer(Logger(0)).sign("GET", "vm", "cn-east-2", url, sdk_headers, "", Credential(AK, SK), "")
    parts = urlparse(url)
    ours = sign_headers(
        method="GET",
        host=parts.netloc,
        path=parts.path,
        query=parts.query,
        headers=SDK_HEADERS,
        body="",
        access_key=AK,
        secret_key=SK,
        region="cn-east-2",
        date=DATE,
        nonce=NONCE,
    )
    assert ours["Authorization"] == sdk_headers["Authorization"]


# --- verify_request -------------------------------------------------------------------------

HOST = "127.0.0.1:8123"
PATH = "/v1/regions/cn-north-1/images"
QUERY = encode_query([("imageSource", "public"), ("ids", ["img-1", "img-2"]), ("name", "中 文")])


def secrets(access_key: str) -> str | None:
    return {DEMO_ACCESS_KEY: DEMO_SECRET_KEY}.get(access_key)


def signed_request(
    *, secret_key: str = DEMO_SECRET_KEY, date: str | None = None, token: str | None = None
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "test"}
    headers.update(
        sign_headers(
            method="GET",
            host=HOST,
            path=PATH,
            query=QUERY,
            headers=headers,
            body=b"",
            access_key=DEMO_ACCESS_KEY,
            secret_key=secret_key,
            region="cn-north-1",
            date=date,
            security_token=token,
        )
    )
    return headers


def verify(
    headers: dict[str, str], *, query: str = QUERY, path: str = PATH, body: bytes = b""
) -> str | None:
    return verify_request(
        method="GET",
        host=HOST,
        path=path,
        query=query,
        headers=headers,
        body=body,
        secret_for=secrets,
    )


def test_verify_accepts_a_valid_request() -> None:
    assert verify(signed_request()) is None
    assert verify(signed_request(token="sts")) is None
    # Header names are case-insensitive, and the user agent is not signed.
    headers = {key.upper(): value for key, value in signed_request().items()}
    headers["USER-AGENT"] = "changed"
    assert verify(headers) is None


def test_verify_accepts_what_the_sdk_signs_without_a_fixed_date() -> None:
    url = f"http://{HOST}{PATH}?{QUERY}"
    headers = dict(SDK_HEADERS)
    Signer(Logger(0)).sign(
        "GET",
        "vm",
        "cn-north-1",
        url,
        headers,
        "",
        Credential(DEMO_ACCESS_KEY, DEMO_SECRET_KEY),
        "",
    )
    assert verify(headers) is None


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda h: h.update(Authorization=h["Authorization"].replace(DEMO_ACCESS_KEY, "NOPE")),
            "unknown access key",
        ),
        (lambda h: h.pop("Authorization"), "missing Authorization header"),
        (lambda h: h.update(Authorization="Bearer x"), "malformed Authorization header"),
        (lambda h: h.update({"Content-Type": "text/plain"}), "signature mismatch"),
        (lambda h: h.update({"x-jdcloud-nonce": "replayed"}), "signature mismatch"),
        (lambda h: h.pop("x-jdcloud-nonce"), "signed header x-jdcloud-nonce is missing"),
        (lambda h: h.pop("x-jdcloud-date"), "missing x-jdcloud-date header"),
    ],
)
def test_verify_rejects_tampered_headers(tamper, reason: str) -> None:  # type: ignore[no-untyped-def]
    headers = signed_request()
    tamper(headers)
    result = verify(headers)
    assert result is not None and result.startswith(reason)
    assert DEMO_SECRET_KEY not in result


def test_verify_rejects_a_wrong_secret_without_revealing_either() -> None:
    result = verify(signed_request(secret_key="wrong-secret"))
    assert result == "signature mismatch"


def test_verify_rejects_tampered_query_path_and_body() -> None:
    headers = signed_request()
    assert verify(headers, query=QUERY.replace("public", "private")) == "signature mismatch"
    assert verify(headers, query=QUERY + "&pageSize=100") == "signature mismatch"
    assert verify(headers, path=PATH.replace("north", "south")) == "signature mismatch"
    assert verify(headers, body=b"x") == "signature mismatch"


def test_verify_rejects_a_skewed_date() -> None:
    old = (datetime.now(UTC) - timedelta(minutes=20)).strftime("%Y%m%dT%H%M%SZ")
    result = verify(signed_request(date=old))
    assert result is not None and "away from server time" in result
    recent = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y%m%dT%H%M%SZ")
    assert verify(signed_request(date=recent)) is None
