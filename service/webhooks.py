"""Webhooks: the change feed POSTed to subscribers, signed, at least once.

Each subscriber (``IMAGE_SYNC_WEBHOOK_URL``, or a TOML ``[[webhooks]]`` table) has a
cursor in ``inventory.webhook_cursors``. A delivery round, for each subscriber:

1. takes the subscriber's advisory lock (one replica delivers for it at a time; the
   others skip it this round);
2. reads up to :data:`BATCH_EVENTS` events after its cursor, keeps those its filters
   want, and POSTs them as ``{"events": [...]}`` signed
   ``X-Image-Sync-Signature: sha256=<HMAC-SHA256 hex of the body>`` with
   ``X-Image-Sync-Delivery: <first cursor>-<last cursor>`` (the same batch always has
   the same id, so a receiver can drop a redelivery);
3. advances the cursor only on a 2xx. 5xx, 408, 429, timeouts and connection errors
   are retried with exponential backoff and full jitter; after ``max_attempts`` (or
   on another 4xx) the subscriber is marked failing and the round moves on; the next
   round starts again from the stored cursor, so nothing is skipped.

The secret is a :class:`~pydantic.SecretStr`: it signs bodies and goes nowhere else
(not in logs, errors, metrics or the status page). URLs are shown without credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import SecretStr

from service.config import Settings
from service.errors import ConfigError, DatabaseError
from service.metrics import Metrics
from service.store import feed
from service.store.engine import Connection, Engine, connect
from service.store.feed import Change
from service.vocabulary import EVENT_TYPES

log = logging.getLogger(__name__)

BATCH_EVENTS = 100
"""Events per POST at most (DESIGN.md)."""
BACKOFF_BASE = 0.5
"""Seconds: the first retry waits up to this long, each next one up to twice as long ..."""
BACKOFF_MAX = 30.0
"""... and never more than this."""
_RETRIED_STATUSES = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Subscriber:
    """One webhook subscriber. ``name`` is its identity in ``webhook_cursors``."""

    name: str
    url: str = field(repr=False)  # may carry credentials; shown as display_url
    secret: SecretStr = field(repr=False)
    event_types: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    from_beginning: bool = False

    @property
    def display_url(self) -> str:
        return strip_credentials(self.url)

    def wants(self, change: Change) -> bool:
        """True when the subscriber's filters (empty = everything) keep the event."""
        account = change.document.get("account")
        return (
            (not self.event_types or change.event_type in self.event_types)
            and (not self.sources or change.image_source in self.sources)
            and (not self.accounts or account in self.accounts)
        )


def strip_credentials(url: str) -> str:
    """The URL without user-info, query or fragment (which may hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def subscribers_of(settings: Settings) -> list[Subscriber]:
    """The configured subscribers; ConfigError for an unknown event type or a name
    given twice."""
    out: list[Subscriber] = []
    if settings.webhook_url and settings.webhook_secret is not None:
        out.append(
            Subscriber(
                name=_url_name(settings.webhook_url),
                url=settings.webhook_url,
                secret=settings.webhook_secret,
                from_beginning=settings.webhook_from == "beginning",
            )
        )
    for index, hook in enumerate(settings.webhooks):
        for event_type in hook.event_types:
            if event_type not in EVENT_TYPES:
                raise ConfigError(
                    f"webhooks[{index}].event_types",
                    f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}",
                )
        assert hook.secret is not None  # filled by load_settings
        out.append(
            Subscriber(
                name=hook.name or _url_name(hook.url),
                url=hook.url,
                secret=hook.secret,
                event_types=frozenset(hook.event_types),
                sources=frozenset(hook.sources),
                accounts=frozenset(hook.accounts),
                from_beginning=hook.from_ == "beginning",
            )
        )
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("webhooks", f"two subscribers are named {name!r}")
    return out


def _url_name(url: str) -> str:
    """A stable name for a subscriber known only by its URL (credentials left out)."""
    return "url-" + hashlib.sha256(strip_credentials(url).encode()).hexdigest()[:12]


def sign(secret: SecretStr, body: bytes) -> str:
    """The ``X-Image-Sync-Signature`` header value of ``body``."""
    digest = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def encode_batch(events: Sequence[Change]) -> bytes:
    """The POST body: ``{"events": [...]}``, each event its row's columns and ``cursor``."""
    payload = {"events": [c.payload() for c in events]}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class DeliveryFailed(Exception):
    """A batch was not acknowledged; the message names why (never a secret)."""


class Dispatcher:
    """Delivery rounds for the configured subscribers, on the runtime's engine, HTTP
    session and metrics (owned by the caller)."""

    def __init__(
        self,
        engine: Engine,
        session: aiohttp.ClientSession,
        subscribers: Sequence[Subscriber],
        *,
        max_attempts: int = 5,
        timeout: float = 10.0,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.session = session
        self.subscribers = tuple(subscribers)
        self.max_attempts = max_attempts
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.metrics = metrics
        self._rng = rng or random.Random()
        if metrics is not None:
            for subscriber in self.subscribers:
                metrics.initialise_webhook(subscriber.name)

    async def deliver_all(self) -> None:
        """One round: every subscriber caught up (or marked failing)."""
        await asyncio.gather(*(self.deliver(s) for s in self.subscribers))

    async def deliver(self, subscriber: Subscriber) -> bool:
        """Deliver everything after the subscriber's cursor; False when it failed or
        another replica holds it. Database trouble is logged; the next round retries."""
        try:
            async with connect(self.engine, autocommit=True) as conn:
                if not await feed.try_lock_subscriber(conn, subscriber.name):
                    return False
                try:
                    return await self._catch_up(conn, subscriber)
                finally:
                    with contextlib.suppress(DatabaseError):
                        await feed.unlock_subscriber(conn, subscriber.name)
        except DatabaseError as exc:
            log.error("webhook %s: database unavailable: %s", subscriber.name, exc.kind)
            return False

    async def _catch_up(self, conn: Connection, subscriber: Subscriber) -> bool:
        cursor = await feed.ensure_subscriber(
            conn,
            subscriber.name,
            url=subscriber.display_url,
            from_beginning=subscriber.from_beginning,
        )
        ok = True
        while page := await feed.read_changes(conn, cursor, BATCH_EVENTS):
            wanted = [c for c in page if subscriber.wants(c)]
            if wanted:
                try:
                    await self._post(subscriber, wanted)
                except DeliveryFailed as exc:
                    log.warning("webhook %s: delivery failed: %s", subscriber.name, exc)
                    await feed.mark_subscriber_failing(conn, subscriber.name, str(exc))
                    ok = False
                    break
                if self.metrics is not None:
                    self.metrics.webhook_deliveries.labels(subscriber.name).inc()
                    self.metrics.webhook_events.labels(subscriber.name).inc(len(wanted))
            cursor = page[-1].cursor
            await feed.advance_subscriber(conn, subscriber.name, cursor, delivered=bool(wanted))
        if self.metrics is not None:
            lag = await feed.lag_of(conn, cursor)
            self.metrics.webhook_lag_events.labels(subscriber.name).set(lag.events)
            self.metrics.webhook_lag_seconds.labels(subscriber.name).set(lag.seconds)
            self.metrics.webhook_failing.labels(subscriber.name).set(0 if ok else 1)
        return ok

    async def _post(self, subscriber: Subscriber, events: Sequence[Change]) -> None:
        """POST one batch until a 2xx; DeliveryFailed after the last attempt."""
        body = encode_batch(events)
        headers = {
            "Content-Type": "application/json",
            "X-Image-Sync-Signature": sign(subscriber.secret, body),
            "X-Image-Sync-Delivery": f"{events[0].cursor}-{events[-1].cursor}",
        }
        for attempt in range(1, self.max_attempts + 1):
            reason, retry = await self._attempt(subscriber, body, headers)
            if reason is None:
                return
            if self.metrics is not None:
                self.metrics.webhook_failures.labels(subscriber.name, reason.split(" ")[0]).inc()
            if not retry or attempt == self.max_attempts:
                raise DeliveryFailed(f"{reason} (attempt {attempt} of {self.max_attempts})")
            await asyncio.sleep(self._rng.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt)))

    async def _attempt(
        self, subscriber: Subscriber, body: bytes, headers: dict[str, str]
    ) -> tuple[str | None, bool]:
        """(None, _) on a 2xx; else (why, worth retrying)."""
        try:
            async with self.session.post(
                subscriber.url, data=body, headers=headers, timeout=self.timeout
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            return "timeout", True
        except aiohttp.ClientError as exc:
            return f"connection ({type(exc).__name__})", True
        if 200 <= status < 300:
            return None, False
        return f"http_{status}", status >= 500 or status in _RETRIED_STATUSES

    async def run(self, stop: asyncio.Event, wake: asyncio.Event, interval: float) -> None:
        """Delivery rounds until ``stop``: one when ``wake`` is set (a tick finished, a
        NOTIFY arrived) and at least every ``interval`` seconds (failing subscribers are
        retried then)."""
        while not stop.is_set():
            wake.clear()
            try:
                await self.deliver_all()
            except Exception:  # a bug; deliveries continue next round and say so
                log.exception("webhook delivery round failed unexpectedly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, wake), interval)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
