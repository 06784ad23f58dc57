"""Bulk set-up of an organisation in the simulator: many accounts at once, a role of
each trusting the first account (the base pair's), private images per account and
region, and shares between neighbouring accounts (``POST /__simulator__/organisation``,
for the accounts benchmark; one admin call instead of thousands)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from service.simulator.accounts import Accounts
from service.simulator.catalogue import Catalogue

__all__ = ["add_organisation"]


def add_organisation(
    catalogue: Catalogue,
    accounts: Accounts,
    specs: Sequence[Mapping[str, Any]],
    *,
    images_per_region: int,
    share_every: int = 0,
    on_add: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Add the accounts of ``specs`` (``name``, ``pin``, ``access_key``, ``secret_key``,
    optional ``role``: a role name trusting the first account); then, in every region,
    ``images_per_region`` private images (ownerOnly) per account, every ``share_every``-th
    of them (0: none) shared with the next account in ``specs`` (the last with the first).
    ``on_add(region, image)`` is told of each image added (the change log). Answers the
    roles' JRNs by account and the counts."""
    if images_per_region < 0 or share_every < 0:
        raise ValueError("images_per_region and share_every must be >= 0")
    trusted = accounts.first.name
    roles: dict[str, str] = {}
    added = [
        accounts.add(
            s["name"], pin=s["pin"], access_key=s["access_key"], secret_key=s["secret_key"]
        )
        for s in specs
    ]
    for spec in specs:
        if spec.get("role"):
            roles[spec["name"]] = accounts.add_role(
                spec["name"], spec["role"], trusts=[trusted]
            ).jrn
    images = shares = 0
    for region in catalogue.regions:
        for i, account in enumerate(added):
            neighbour = added[(i + 1) % len(added)].pin
            for n in range(1, images_per_region + 1):
                image = catalogue.add(
                    region, "private", ownerPin=account.pin, launchPermission="ownerOnly"
                )
                images += 1
                if share_every and n % share_every == 0 and neighbour != account.pin:
                    catalogue.share(region, image["imageId"], [neighbour])
                    image = catalogue.get(region, image["imageId"]) or image
                    shares += 1
                if on_add is not None:
                    on_add(region, image)
    return {"accounts": len(added), "roles": roles, "private_images": images, "shares": shares}
