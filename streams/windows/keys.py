"""The state of one key of a window operator: its windows and their accumulators, the heaps
that say when they are due, and its buffers; copied for transactions and turned into plain
data for snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KeyState:
    # time windows: (start, end) -> accumulators; fired windows kept until they expire
    windows: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    fired: set[tuple[int, int]] = field(default_factory=set)
    next_empty: int | None = None  # first window start not yet emitted (emit_empty)
    # sliding, count: buffered (time, args)
    buffer: list[tuple[int, list[Any]]] = field(default_factory=list)
    arrivals: int = 0
    # sessions: [start, last event, accumulators]
    sessions: list[list[Any]] = field(default_factory=list)
    # tumbling/hopping: (end, start) of windows not yet fired, by when they are due, and
    # (end + lateness, start, end) of fired ones, dropped once no late update can reach them
    due: list[tuple[int, int]] = field(default_factory=list)
    expiry: list[tuple[int, int, int]] = field(default_factory=list)

    def idle(self) -> bool:
        return not (self.windows or self.buffer or self.sessions or self.arrivals)

    def clone(self) -> KeyState:
        """A copy that shares nothing changed in place: the accumulator lists (a kernel adds
        to them in place) and the containers. What they hold (numbers, a sketch's points,
        buffered argument rows) is only ever replaced, never changed."""
        return KeyState(
            windows={w: _copied(accs) for w, accs in self.windows.items()},
            fired=set(self.fired),
            next_empty=self.next_empty,
            buffer=list(self.buffer),
            arrivals=self.arrivals,
            sessions=[[s, last, _copied(accs)] for s, last, accs in self.sessions],
            due=list(self.due),
            expiry=list(self.expiry),
        )

    def dump(self) -> dict[str, Any]:
        """Plain data (sharing the accumulators: copy it before they change)."""
        return {
            "windows": [[s, e, accs] for (s, e), accs in self.windows.items()],
            "fired": [[s, e] for s, e in sorted(self.fired)],
            "next_empty": self.next_empty,
            "buffer": [[t, a] for t, a in self.buffer],
            "arrivals": self.arrivals,
            "sessions": self.sessions,
        }

    @classmethod
    def load(cls, k: dict[str, Any]) -> KeyState:
        """From `dump`'s plain data (the heaps are rebuilt by the operator)."""
        return cls(
            windows={(s, e): accs for s, e, accs in k["windows"]},
            fired={(s, e) for s, e in k["fired"]},
            next_empty=k["next_empty"],
            buffer=[(t, a) for t, a in k["buffer"]],
            arrivals=k["arrivals"],
            sessions=[list(s) for s in k["sessions"]],
        )


def _copied(accs: list[Any]) -> list[Any]:
    return [a[:] if type(a) is list else a for a in accs]
