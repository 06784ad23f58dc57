"""The configured accounts, resolved: each with its own key pair or an STS role.

:func:`accounts_of` turns the settings (``[[accounts]]``, or the one account of the base
pair named ``IMAGE_SYNC_ACCOUNT``) into :class:`Account` records, in configuration order
(the order that decides which account lists a region's catalogue, DESIGN.md, Accounts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.config import ACCOUNT_SOURCES, CATALOGUE_SOURCES, Settings
from service.jdcloud.listing import Partition
from service.jdcloud.signer import Credentials
from service.jdcloud.sts import RoleSpec

__all__ = ["Account", "RoleSpec", "account_partitions", "accounts_of"]


@dataclass(frozen=True, slots=True)
class Account:
    """One configured account: its own key pair (``credentials``) or a role assumed with
    ``base`` (the base pair), and the regions it covers."""

    name: str
    regions: tuple[str, ...]
    credentials: Credentials | None = None
    role: RoleSpec | None = None
    base: Credentials | None = None

    def __post_init__(self) -> None:
        if (self.credentials is None) == (self.role is None):
            raise ValueError("an account has either its own key pair or a role")
        if self.role is not None and self.base is None:
            raise ValueError("a role account needs the base pair")


def accounts_of(settings: Settings, base: Credentials) -> tuple[Account, ...]:
    """The accounts to sync, in configuration order; ``base`` is the base pair (the
    settings' key pair, or the simulator's demo pair on a local endpoint)."""
    if not settings.accounts:
        return (Account(settings.account, settings.regions, credentials=base),)
    out = []
    for entry in settings.accounts:
        regions = entry.regions or settings.regions
        if entry.role_jrn is not None:
            role = RoleSpec(
                entry.role_jrn,
                entry.session_name or f"image-sync-{entry.name}",
                entry.duration_seconds,
            )
            out.append(Account(entry.name, regions, role=role, base=base))
        elif entry.access_key and entry.secret_key is not None:
            token = entry.security_token.get_secret_value() if entry.security_token else None
            creds = Credentials(entry.access_key, entry.secret_key.get_secret_value(), token)
            out.append(Account(entry.name, regions, credentials=creds))
        else:
            out.append(Account(entry.name, regions, credentials=base))
    return tuple(out)


def account_partitions(
    accounts: Sequence[Account],
    sources: Sequence[str],
    *,
    regions: Sequence[str] | None = None,
    named: bool = True,
) -> list[Partition]:
    """The partitions of ``accounts``: each catalogue source once per region any account
    covers (no account), each account source per (account, region); regions in the order
    the accounts name them; ``regions`` (when given: a one-off run) instead of theirs. ``named``:
    whether partition names show their account (False for the one-account form)."""
    covered = list(dict.fromkeys(r for a in accounts for r in a.regions))
    if regions is not None:
        covered = list(regions)  # a one-off run: what the operator asked for
    out = [Partition(r, s) for r in covered for s in sources if s in CATALOGUE_SOURCES]
    for account in accounts:
        out.extend(
            Partition(r, s, account.name, named)
            for r in (covered if regions is not None else account.regions)
            for s in sources
            if s in ACCOUNT_SOURCES
        )
    return out
