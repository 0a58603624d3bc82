"""What a window is: its kind and bounds (`Windowing`), what fires (`WindowResult`), and
what came too late (`LateUpdate`). The engine's window operator (`processors.engine.windows`)
runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

WindowKind = Literal["tumbling", "hopping", "sliding", "session", "count"]
MAX_CLOCKS = 100_000
"""Keys whose clock is kept after their windows are all gone; past that, the clock of the key
that advanced least recently is forgotten (such a key starts afresh if it comes back)."""


@dataclass(frozen=True)
class Windowing:
    kind: WindowKind
    size: int  # ms (count windows: updates)
    hop: int = 0  # hopping: ms between window starts; count: updates between firings
    gap: int = 0  # session: ms of silence that ends a session
    delay: int = 0  # ms the watermark trails the newest event time
    allowed_lateness: int = 0
    processing_time: bool = False
    emit_empty: bool = False
    idle: int | None = None  # ms of the unit's clock after which a silent key's windows fire

    def windows(self, t: int) -> list[tuple[int, int]]:
        """The [start, end) time windows that contain `t` (tumbling and hopping)."""
        if self.kind == "tumbling":
            start = t - t % self.size
            return [(start, start + self.size)]
        start = t - t % self.hop
        out = []
        while start + self.size > t:
            out.append((start, start + self.size))
            start -= self.hop
        out.reverse()
        return out


@dataclass(slots=True)
class WindowResult:
    """A window's values as it fired. Treat it as immutable (not a frozen dataclass: one is
    made per window fired, and a frozen one costs four times as much to make)."""

    key: str
    start: int
    end: int
    values: dict[str, Any]
    updated: bool = False  # a re-firing after a late update within allowed lateness


@dataclass(frozen=True, slots=True)
class LateUpdate:
    key: str
    time: int
    watermark: int
