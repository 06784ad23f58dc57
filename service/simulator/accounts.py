"""The simulator's accounts, roles and STS sessions.

Each account has one key pair and its own PIN; the catalogue's private images belong to
the account whose PIN is their ``ownerPin``, and a private image shared with a PIN is in
that account's ``shared`` listing. The first account is the simulator's historical one
(PIN ``demo-user``, the demo key pair unless another is given); it also sees the
catalogue's seeded ``shared`` images (owned by PINs of no simulated account).

A role (``jrn:iam::<pin>:role/<name>``) belongs to one account and trusts other accounts'
PINs: STS ``assumeRole`` called with a trusted account's key pair issues temporary
credentials acting as the role's account, valid for ``sts_lifetime`` seconds (a setting
of the simulator, so tests can use a few seconds). A request signed with temporary
credentials is refused with 401 once they have expired; one whose ``x-jdcloud-date`` is
past their expiry is counted (``signed_expired``): a client that renews in time makes
none. An account's key pair can be refused (``refuse``): every request it signs, and
every role session it assumed, is then 401.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["JRN_RE", "Accounts", "Caller", "SimAccount", "SimRole"]

JRN_RE = re.compile(r"^jrn:iam::(?P<pin>[^:]+):role/(?P<name>[A-Za-z0-9_.@+=,-]{1,64})$")
BEIJING = timezone(timedelta(hours=8))
DEFAULT_STS_LIFETIME = 3600.0


@dataclass(slots=True)
class SimAccount:
    """One simulated account: its key pair and PIN."""

    name: str
    pin: str
    access_key: str
    secret_key: str = field(repr=False)
    refused: bool = False


@dataclass(frozen=True, slots=True)
class SimRole:
    """A role of ``account`` that the accounts with PINs in ``trusts`` may assume."""

    jrn: str
    account: str
    trusts: frozenset[str]


@dataclass(slots=True)
class _Session:
    access_key: str
    secret_key: str = field(repr=False)
    token: str = field(repr=False)
    account: str = ""
    via: str = ""  # the account whose key pair assumed the role
    role: str = ""
    expires_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who signed a request: the account it acts as, and for a role session the
    session's token and expiry (epoch seconds)."""

    account: SimAccount
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None


class Accounts:
    """Accounts by access key, roles by JRN, STS sessions by temporary access key."""

    def __init__(self, *, sts_lifetime: float = DEFAULT_STS_LIFETIME) -> None:
        self._accounts: dict[str, SimAccount] = {}
        self._by_key: dict[str, str] = {}
        self._roles: dict[str, SimRole] = {}
        self._sessions: dict[str, _Session] = {}
        self.sts_lifetime = sts_lifetime
        self.assume_role_calls = 0

    # --- configuration -----------------------------------------------------------------

    def add(self, name: str, *, pin: str, access_key: str, secret_key: str) -> SimAccount:
        if name in self._accounts:
            raise ValueError(f"account {name!r} exists")
        if access_key in self._by_key:
            raise ValueError("that access key belongs to another account")
        if any(account.pin == pin for account in self._accounts.values()):
            raise ValueError(f"pin {pin!r} belongs to another account")
        account = SimAccount(name, pin, access_key, secret_key)
        self._accounts[name] = account
        self._by_key[access_key] = name
        return account

    def add_role(self, account: str, role_name: str, *, trusts: list[str]) -> SimRole:
        """A role of ``account`` trusting the accounts named in ``trusts``."""
        owner = self.get(account)
        pins = frozenset(self.get(name).pin for name in trusts)
        role = SimRole(f"jrn:iam::{owner.pin}:role/{role_name}", owner.name, pins)
        self._roles[role.jrn] = role
        return role

    def refuse(self, account: str, refused: bool = True) -> None:
        """Refuse (or accept again) every request signed by the account's key pair and by
        the role sessions it assumed."""
        self.get(account).refused = refused

    def expire_sessions(self) -> int:
        """End every role session now (their holders still believe them valid): the next
        request each signs is 401. Returns how many were ended."""
        now = time.time()
        live = [s for s in self._sessions.values() if s.expires_at > now]
        for session in live:
            session.expires_at = now
        return len(live)

    def get(self, name: str) -> SimAccount:
        try:
            return self._accounts[name]
        except KeyError:
            raise ValueError(f"no account {name!r}") from None

    def all(self) -> list[SimAccount]:
        return list(self._accounts.values())

    @property
    def first(self) -> SimAccount:
        return next(iter(self._accounts.values()))

    def by_pin(self, pin: str) -> SimAccount | None:
        return next((a for a in self._accounts.values() if a.pin == pin), None)

    def roles(self) -> list[SimRole]:
        return list(self._roles.values())

    # --- requests ----------------------------------------------------------------------

    def caller(self, access_key: str) -> Caller | None:
        """The signer of a request by its access key (None: unknown key)."""
        name = self._by_key.get(access_key)
        if name is not None:
            account = self._accounts[name]
            return Caller(account, account.secret_key)
        session = self._sessions.get(access_key)
        if session is None:
            return None
        return Caller(
            self._accounts[session.account], session.secret_key, session.token, session.expires_at
        )

    def refusal(self, caller: Caller, token_header: str | None, now: float) -> str | None:
        """Why a validly signed request is still refused (401), or None."""
        if caller.token is None:
            return "the key pair is disabled" if caller.account.refused else None
        if token_header is None:
            return "temporary credentials need x-jdcloud-security-token"
        try:
            token = base64.b64decode(token_header, validate=True).decode()
        except ValueError:
            return "malformed x-jdcloud-security-token"
        if token != caller.token:
            return "the security token does not belong to these credentials"
        session = next(s for s in self._sessions.values() if s.token == token)
        if self._accounts[session.via].refused or caller.account.refused:
            return "the key pair that assumed the role is disabled"
        assert caller.expires_at is not None
        if now >= caller.expires_at:
            return "the temporary credentials have expired"
        return None

    def assume_role(
        self, caller: Caller, jrn: str, session_name: str, duration: int | None
    ) -> dict[str, str]:
        """STS assumeRole for ``caller`` (a key pair, not a session): the credentials
        object of the answer. Raises ValueError (403) or LookupError (404)."""
        self.assume_role_calls += 1
        if caller.token is not None:
            raise PermissionError("a role session cannot assume a role")
        role = self._roles.get(jrn)
        if role is None:
            raise LookupError(f"role {jrn} not found")
        if caller.account.pin not in role.trusts:
            raise PermissionError(f"{caller.account.pin} is not trusted by {jrn}")
        if not session_name:
            raise ValueError("roleSessionName is required")
        if duration is not None and not 900 <= duration <= 43200:
            raise ValueError("durationSeconds out of range")
        access_key = "JDCSTS" + os.urandom(10).hex().upper()
        session = _Session(
            access_key=access_key,
            secret_key=os.urandom(18).hex(),
            token="sts-" + os.urandom(24).hex(),
            account=role.account,
            via=caller.account.name,
            role=jrn,
            expires_at=time.time() + self.sts_lifetime,
        )
        self._sessions[access_key] = session
        # Whole seconds, Beijing time, as JD Cloud writes it; rounded down so a client
        # that trusts it never holds credentials past their real expiry.
        expiration = datetime.fromtimestamp(int(session.expires_at), UTC).astimezone(BEIJING)
        return {
            "accessKey": session.access_key,
            "secretKey": session.secret_key,
            "sessionToken": session.token,
            "expiration": expiration.strftime("%Y-%m-%d %H:%M:%S"),
        }
