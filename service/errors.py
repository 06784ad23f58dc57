"""The error tree of jdcloud-image-sync.

Every error the service raises on purpose derives from :class:`ImageSyncError`;
driver and library errors are translated at the boundary (``raise X(...) from exc``)
so callers never catch aiohttp, asyncpg or pydantic types::

    ImageSyncError
    ├── ConfigError              bad configuration or usage; the CLI exits 2
    ├── ListenError              the status server cannot listen (port busy); exit 1
    ├── DatabaseError            PostgreSQL unreachable, failed, or not migrated
    │   └── SchemaNotCurrent     migrations are pending
    └── ApiError                 describeImages failed (carries code/status/message/requestId)
        ├── TransientApiError    worth retrying: 429 RATE_LIMIT, 500/502/503, network, bad body
        │   └── MalformedResponse    a body that is not the documented JSON (truncated, HTML...)
        ├── PermanentApiError    not retried: other 4xx, QUOTA_EXCEEDED; fails its partition
        └── AuthError            401/403: fails the whole run with one clear line

Messages never contain a secret: the access key secret and database passwords are
kept out of them (a database URL is shown as :meth:`service.dburl.DatabaseUrl.display`).
"""

from __future__ import annotations


class ImageSyncError(Exception):
    """Base of every error the service raises on purpose."""


class ConfigError(ImageSyncError):
    """Bad configuration or usage. The message is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class ListenError(ImageSyncError):
    """The status server cannot listen on its address (e.g. the port is busy)."""


class DatabaseError(ImageSyncError):
    """The database could not be reached or a statement failed.

    Raised by the store ``from`` the driver's error (``service.store.engine.database_errors``).
    ``kind`` is the driver's error class (e.g. ``ConnectionRefusedError``: it names no
    host), ``refused`` true when the server answered and refused the statement (e.g.
    permission denied) rather than not answering.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        refused: bool = False,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind or type(self).__name__
        self.refused = refused
        self.retryable = retryable
        """A deadlock or serialization failure: the transaction may simply run again."""


class SchemaNotCurrent(DatabaseError):
    """The database schema is older than this release's migrations."""


class ApiError(ImageSyncError):
    """describeImages answered with an error, or could not be read.

    ``http_status`` is the HTTP status (0 for network failures), ``status`` the
    API's ``error.status`` (e.g. ``RATE_LIMIT``), ``request_id`` the API's requestId.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int = 0,
        status: str = "",
        request_id: str | None = None,
        region: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.http_status = http_status
        self.status = status
        self.request_id = request_id
        self.region = region
        self.retry_after = retry_after
        super().__init__(self.describe())

    @property
    def code(self) -> int:
        """The API's ``error.code``: the HTTP status it answered with."""
        return self.http_status

    def describe(self) -> str:
        parts = []
        if self.http_status:
            parts.append(str(self.http_status))
        if self.status:
            parts.append(self.status)
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.region:
            text = f"{self.region}: {text}"
        if self.request_id:
            text = f"{text} (requestId {self.request_id})"
        return text


class TransientApiError(ApiError):
    """A failure worth retrying (throttling, 5xx, network, unreadable body)."""


class MalformedResponse(TransientApiError):
    """The body was not the documented JSON (truncated, HTML, wrong shape)."""


class PermanentApiError(ApiError):
    """A failure that retrying will not fix; fails its partition."""


class AuthError(ApiError):
    """401/403: the credentials are wrong or lack permission; fails the account's
    partitions (the whole run with one account)."""

    signed_with: object | None = None
    """The credentials the refused request was signed with (never shown)."""
    by_account: dict[str, AuthError] | None = None
    """Raised at the end of a run of several accounts: each refused account's error."""
