"""The ground truth: expected events from the simulator's change log.

The simulator logs every catalogue mutation (the driver's, through the admin
endpoint, and drift's) with the image as it became. Between two checkpoints (a
*window*) an image goes through states ``s0 .. sn``: ``s0`` as the database held it
at the previous checkpoint (checked equal to the catalogue then), ``sn`` as the
catalogue holds it now (checked equal to the database now). The replicas' syncs
observed some of the states in between, not necessarily all: two changes between two
syncs collapse into one observed change (offline then online is nothing at all). So
the events the database may hold for the image in this window are exactly those of
some observed path ``s0 -> s_i -> ... -> sn`` (any subset of the intermediate states,
always ending at ``sn``), with one event per transition between consecutive observed
states. Anything else is an invented, missing, duplicated or misordered event.

The driver changes an image at most once per window, so for an image only it touched
there is one possible path, and its change must be exactly one event of the right
type ("strict" below). Drift may add a second change (it deletes a random image), and
then the few paths are enumerated.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

Key = tuple[str, str]  # (region, image id)
MAX_ENUMERATED = 8
"""More changes than this to one image in one window are not enumerated (2^7 paths)."""


@dataclass(frozen=True, slots=True)
class State:
    """What the inventory can see of an image: listed or not, its offline flag, content."""

    present: bool
    offline: bool | None = None
    content: bytes = b""

    @classmethod
    def of(cls, image: Mapping[str, Any] | None) -> State:
        if image is None:
            return ABSENT
        rest = {k: v for k, v in image.items() if k != "offline"}
        return cls(True, image.get("offline"), orjson.dumps(rest, option=orjson.OPT_SORT_KEYS))


ABSENT = State(False)


def transition(a: State, b: State, recorded: bool) -> tuple[str, ...]:
    """The events one sync records when it sees ``b`` after having recorded ``a``."""
    if not a.present:
        if not b.present:
            return ()
        return ("reappeared",) if recorded else ("created",)
    if not b.present:
        return ("removed",)
    events: list[str] = []
    if a.content != b.content:
        events.append("updated")
    if bool(a.offline) != bool(b.offline):
        events.append("went_offline" if b.offline else "came_online")
    return tuple(events)


def allowed_paths(states: list[State], recorded: bool) -> set[tuple[str, ...]]:
    """Every event sequence some observed path from ``states[0]`` to ``states[-1]`` gives."""
    inner = list(range(1, len(states) - 1))
    if len(inner) >= MAX_ENUMERATED:
        inner = []  # fall back to the direct transition only (reported by the caller)
    out: set[tuple[str, ...]] = set()
    for size in range(len(inner) + 1):
        for chosen in itertools.combinations(inner, size):
            path = [states[0], *(states[i] for i in chosen), states[-1]]
            seen, events = recorded, []
            for a, b in itertools.pairwise(path):
                events.extend(transition(a, b, seen))
                seen = seen or b.present
            out.add(tuple(events))
    return out


@dataclass
class WindowVerdict:
    images_changed: int
    strict: int
    problems: list[str]


class GroundTruth:
    """The catalogue's state per image at the last checkpoint, advanced window by window."""

    def __init__(self) -> None:
        self.states: dict[Key, State] = {}
        self.recorded: set[Key] = set()  # images the database has events for
        self.last_seq = 0

    def judge(
        self,
        changes: Iterable[Mapping[str, Any]],
        events: Mapping[Key, list[str]],
        snapshot: Mapping[Key, Mapping[str, Any]],
    ) -> WindowVerdict:
        """Compare one window's events with the change log; then move to its end state.

        ``changes``: the change log entries since the last checkpoint; ``events``: the
        event types the database recorded in the window, per image in event order;
        ``snapshot``: the whole catalogue now.
        """
        paths: dict[Key, list[State]] = {}
        for change in changes:
            key = (change["region"], change["image_id"])
            after = None if change["op"] == "delete" else change["image"]
            paths.setdefault(key, [self.states.get(key, ABSENT)]).append(State.of(after))
            self.last_seq = max(self.last_seq, change["seq"])
        problems: list[str] = []
        if not self.states and not self.recorded:  # the first window: the initial catalogue
            for key, image in snapshot.items():
                paths.setdefault(key, [ABSENT, State.of(image)])
        strict = 0
        for key in sorted(paths.keys() | events.keys()):
            states = paths.get(key) or [self.states.get(key, ABSENT)] * 2
            if len(states) - 2 >= MAX_ENUMERATED:
                problems.append(f"{key}: {len(states) - 1} changes in one window, not judged")
                continue
            allowed = allowed_paths(states, key in self.recorded)
            strict += len(allowed) == 1 and len(states) == 2
            actual = tuple(events.get(key, ()))
            if actual not in allowed:
                problems.append(
                    f"{key[0]}/{key[1]}: events {list(actual)}, expected one of "
                    f"{sorted(map(list, allowed))} ({len(states) - 1} change(s))"
                )
        for key, states in paths.items():
            self.states[key] = states[-1]
        self.recorded.update(events)
        drifted = {k for k, s in self.states.items() if s.present} ^ set(snapshot)
        if drifted:
            problems.append(
                f"the change log does not account for {len(drifted)} image(s) of the "
                f"catalogue, e.g. {sorted(drifted)[:3]}"
            )
        return WindowVerdict(len(paths), strict, problems)
