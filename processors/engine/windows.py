"""A keyed window operator: assigns updates to windows, aggregates them, fires on the watermark.

Time and firing:
- Event time (default): an update's time is its lastUpdate. Each key keeps its own clock (the
  newest event time seen for that key), and its watermark is that clock minus `delay`: one
  device's clock moves only its own windows, so a device with a wrong clock cannot fire or
  make late everyone else's, and a device replaying its buffer after an outage gets its own
  windows computed. A window [start, end) of a key fires once the key's watermark reaches
  `end`. An un-keyed flow has one key, so one clock (the unit bounds how far ahead of its own
  clock an update may be: `max_future`).
- `allowed_lateness`: a window is kept that long after it fired; an update that still falls
  into it updates it and the window fires again (`updated=True`). An update whose windows are
  all past end + allowed_lateness goes to the late side output: counted and returned, never
  dropped silently.
- Processing time: an update's time is the injected clock's; `advance(now)` fires windows.

Window kinds: tumbling(size), hopping(size, hop), sliding(size) (fires on every update over
(t - size, t]), session(gap), count(size, step). Count windows follow arrival order.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace as _replace
from typing import Any

from streams import kernels
from streams.windows.aggregates import Aggregate
from streams.windows.keys import KeyState as _KeyState  # the type (the kernel's has its fields)
from streams.windows.model import MAX_CLOCKS, LateUpdate, Windowing, WindowResult

MAX_EMPTY_WINDOWS = 10_000
_END_OF_TIME = 2**62
"""Most empty windows emitted for one key at once (a long silence); the rest are skipped."""


Args = Sequence[Any]  # one argument value per aggregate (None: skip that aggregate)


class WindowOperator:
    def __init__(self, windowing: Windowing, aggregates: Sequence[tuple[str, Aggregate]]) -> None:
        self.spec = windowing
        self.aggregates = list(aggregates)
        self.keys: dict[str, _KeyState] = {}
        self.clocks: dict[str, int] = {}  # event time: each key's newest event time
        self.max_time: int | None = None  # the newest time of all (processing time: the clock)
        self.late_count = 0
        # Time windows are kept by when they are due (per key), so that firing costs what
        # fires, not the number of open windows. These (tumbling and hopping, event time) the
        # window kernel folds (`kernels.fold_windows`, `fold_parts`) under a contract: it
        # changes `keys`, `clocks`, `max_time` and `late_count` exactly as `process` would,
        # through KeyState's fields and the public methods `values`, `fire_key` and
        # `forget_clocks`, and only for keys `touch`ed first (so a rollback restores them).
        self.indexed = windowing.kind in ("tumbling", "hopping") and not windowing.emit_empty
        self._marks: dict[str, tuple[int, int]] = {}  # key -> (its clock, when first seen)
        # The open transaction (`begin`): each key's state and clock before its first change.
        self._undo: dict[str, tuple[_KeyState | None, int | None]] | None = None
        self._undo_scalars: tuple[int | None, int] = (None, 0)
        self._undo_marks: dict[str, tuple[int, int]] | None = None

    # Transactions ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Open a transaction: until `commit`, `rollback` puts every key back as it was. It
        costs a copy of each key's state the first time the key changes, not a copy of all."""
        self._undo = {}
        self._undo_scalars = (self.max_time, self.late_count)
        self._undo_marks = None

    def commit(self) -> None:
        self._undo = self._undo_marks = None

    def rollback(self) -> None:
        """Back to `begin` (a clock forgotten meanwhile past MAX_CLOCKS stays forgotten, as it
        might have been anyway)."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        keys, clocks = self.keys, self.clocks
        for key, (state, clock) in undo.items():
            if state is None:
                keys.pop(key, None)
            else:
                keys[key] = state
            if clock is None:
                clocks.pop(key, None)
            else:
                clocks[key] = clock
        self.max_time, self.late_count = self._undo_scalars
        if self._undo_marks is not None:
            self._marks, self._undo_marks = self._undo_marks, None

    def touch(self, keys: Iterable[str]) -> None:
        """Save these keys' state before it changes (inside a transaction; free outside)."""
        undo = self._undo
        if undo is None:
            return
        for key in keys:
            if key not in undo:
                state = self.keys.get(key)
                undo[key] = (None if state is None else state.clone(), self.clocks.get(key))

    @property
    def watermark(self) -> int | None:
        """The newest watermark of all keys (processing time: the only one)."""
        return None if self.max_time is None else self.max_time - self.spec.delay

    def watermark_of(self, key: str) -> int | None:
        """The watermark that decides `key`'s windows."""
        if self.spec.processing_time:
            return self.watermark
        clock = self.clocks.get(key)
        return None if clock is None else clock - self.spec.delay

    def _advance(self, key: str, t: int) -> bool:
        """Move `key`'s clock to `t` if that is later; whether it moved."""
        clocks = self.clocks
        clock = clocks.pop(key, None)  # re-inserted: the dict's order is by last advance
        if clock is not None and t <= clock:
            clocks[key] = clock
            return False
        clocks[key] = t
        if self.max_time is None or t > self.max_time:
            self.max_time = t
        if len(clocks) > MAX_CLOCKS:
            self.forget_clocks()
        return True

    def forget_clocks(self) -> None:
        """Forget the clocks of the keys silent the longest, past MAX_CLOCKS (those with no
        open window: a key's state needs its clock), down to nine tenths of it: a stream of
        new keys costs one pass over a tenth of the clocks per tenth, not one per key."""
        clocks, keys = self.clocks, self.keys
        excess = len(clocks) - (MAX_CLOCKS - MAX_CLOCKS // 10)
        for old in list(itertools.islice(clocks, max(0, excess))):
            if old not in keys:
                del clocks[old]

    # Accumulators ----------------------------------------------------------------------------

    def _fresh(self) -> list[Any]:
        return [agg.initial() for _, agg in self.aggregates]

    def _add(self, accs: list[Any], args: Args, t: int) -> None:
        for i, (_, agg) in enumerate(self.aggregates):
            value = args[i]
            if agg.needs_argument and value is None:
                continue
            accs[i] = agg.add(accs[i], value, t)

    def values(self, accs: list[Any], start: int, end: int) -> dict[str, Any]:
        out = {}
        for (name, agg), acc in zip(self.aggregates, accs, strict=True):
            value = agg.result(acc, start, end)
            # a sum past the double range (two readings of 1e308) has no value: the channel
            # is left out of the window's update, as a missing one is (never null or inf)
            if value is not None and (type(value) is not float or math.isfinite(value)):
                out[name] = value
        return out

    # Input -----------------------------------------------------------------------------------

    def process(self, key: str, t: int, args: Args) -> tuple[list[WindowResult], list[LateUpdate]]:
        """Add one update (time `t`, one argument per aggregate); what fired and what was late."""
        if self._undo is not None and key not in self._undo:
            self.touch((key,))
        state = self.keys.get(key)
        if state is None:
            state = self.keys[key] = kernels.KeyState()
        kind = self.spec.kind
        if kind == "count":
            return self._count(key, state, t, list(args)), []
        watermark = self.watermark_of(key)
        fired: list[WindowResult] = []
        late: list[LateUpdate] = []
        if kind == "sliding":
            if (
                watermark is not None
                and t <= watermark - self.spec.size - self.spec.allowed_lateness
            ):
                late.append(LateUpdate(key, t, watermark))
            else:
                state.buffer.append((t, list(args)))
                fired.append(self._slide(key, state, t))
        elif kind == "session":
            if not self._session_add(state, t, list(args), watermark):
                late.append(LateUpdate(key, t, watermark if watermark is not None else t))
        else:
            accepted = False
            for window in self.spec.windows(t):
                if watermark is not None and window[1] + self.spec.allowed_lateness <= watermark:
                    continue
                accs = state.windows.get(window)
                if accs is None:
                    accs = state.windows[window] = self._fresh()
                    if self.indexed:
                        heapq.heappush(state.due, (window[1], window[0]))
                self._add(accs, args, t)
                accepted = True
                if window in state.fired:  # a late update within allowed lateness
                    fired.append(
                        WindowResult(key, *window, self.values(accs, *window), updated=True)
                    )
            if not accepted:
                late.append(LateUpdate(key, t, watermark if watermark is not None else t))
            if state.next_empty is None:
                state.next_empty = self.spec.windows(t)[0][0]
        self.late_count += len(late)
        if not self.spec.processing_time and self._advance(key, t):
            watermark = t - self.spec.delay
            fired.extend(self.fire_key(key, state, watermark))
        return fired, late

    def advance(self, now: int) -> list[WindowResult]:
        """Processing time: move the clock to `now` and fire what is due."""
        if self.max_time is None or now > self.max_time:
            self.max_time = now
        if self.max_time is None or not self.spec.processing_time:
            return []
        return self._fire_all(self.max_time - self.spec.delay)

    def fire_idle(self, now: int) -> list[WindowResult]:
        """Event time: fire every open window of the keys whose clock has not moved for
        `idle` ms of the unit's clock `now` (a device gone quiet). Their clocks stay: a later
        update to a fired window is late (or, within allowed lateness, updates it)."""
        idle = self.spec.idle
        if idle is None or self.spec.processing_time or self.spec.emit_empty:
            return []
        if self.spec.kind in ("count", "sliding"):
            return []
        marks, out = self._marks, []
        if self._undo is not None and self._undo_marks is None:
            self._undo_marks = dict(marks)  # this walks every key anyway
        for key in list(self.keys):
            clock = self.clocks.get(key)
            mark = marks.get(key)
            if mark is None or mark[0] != clock:
                marks[key] = (clock, now)  # type: ignore[assignment]
            elif now - mark[1] >= idle:
                # as if the key's clock had reached the end of its open windows: they fire,
                # and a later update to them is late (never a second result for one window)
                state = self.keys[key]
                ends = [end for (_, end) in state.windows if (_, end) not in state.fired]
                ends += [last + self.spec.gap for _, last, _ in state.sessions]
                del marks[key]
                if not ends:
                    continue
                self.touch((key,))
                watermark = max(ends)
                self._advance(key, watermark + self.spec.delay)
                out.extend(self.fire_key(key, state, watermark))
        for key in [k for k in marks if k not in self.keys]:
            del marks[key]
        out.sort(key=lambda r: (r.end, r.key, r.start))
        return out

    def flush(self) -> list[WindowResult]:
        """Fire every window still open, as if time had run to the end (offline runs)."""
        if self.max_time is None:
            return []
        if self.spec.kind in ("count", "sliding"):
            return []
        saved = self.spec
        self.spec = _replace(self.spec, emit_empty=False)  # no endless empty windows
        try:
            return self._fire_all(_END_OF_TIME)
        finally:
            self.spec = saved

    # Firing ----------------------------------------------------------------------------------

    def _fire_all(self, watermark: int) -> list[WindowResult]:
        """Every key's windows due at `watermark`, in (end, key, start) order."""
        out: list[WindowResult] = []
        for key in sorted(self.keys):
            out.extend(self.fire_key(key, self.keys[key], watermark))
        out.sort(key=lambda r: (r.end, r.key, r.start))
        return out

    def fire_key(self, key: str, state: _KeyState, watermark: int) -> list[WindowResult]:
        """`key`'s windows due at its watermark, in (end, start) order; a key left with no
        state at all is dropped (its clock stays, in `clocks`)."""
        if self._undo is not None and key not in self._undo and self._changes(state, watermark):
            self.touch((key,))
        if self.indexed:
            out = self._fire_indexed(key, state, watermark)
        elif self.spec.kind == "sliding":
            horizon = watermark - self.spec.size - self.spec.allowed_lateness
            state.buffer = [(t, a) for t, a in state.buffer if t > horizon]
            out = []
        elif self.spec.kind == "count":
            out = []
        elif self.spec.kind == "session":
            out = self._fire_sessions(key, state, watermark)
        else:
            out = self._empty(key, state, watermark) if self.spec.emit_empty else []
            due = sorted(w for w in state.windows if w[1] <= watermark and w not in state.fired)
            for window in due:
                out.append(WindowResult(key, *window, self.values(state.windows[window], *window)))
                state.fired.add(window)
            for window in [
                w for w in state.fired if w[1] + self.spec.allowed_lateness <= watermark
            ]:
                state.fired.discard(window)
                del state.windows[window]
            out.sort(key=lambda r: (r.end, r.start))
        if state.idle() and not self.spec.emit_empty and self.keys.get(key) is state:
            del self.keys[key]
        return out

    def _changes(self, state: _KeyState, watermark: int) -> bool:
        """Whether `fire_key` at `watermark` may change `state` (cheap for the indexed kinds,
        which a processing-time flow fires for every key on every batch)."""
        if not self.indexed:
            return True
        due, expiry = state.due, state.expiry
        return bool(
            (due and due[0][0] <= watermark)
            or (expiry and expiry[0][0] <= watermark)
            or state.idle()
        )

    def _fire_indexed(self, key: str, state: _KeyState, watermark: int) -> list[WindowResult]:
        """Tumbling and hopping windows of one key: those due, from its heap."""
        out: list[WindowResult] = []
        due, expiry, lateness = state.due, state.expiry, self.spec.allowed_lateness
        while due and due[0][0] <= watermark:
            end, start = heapq.heappop(due)
            window = (start, end)
            out.append(WindowResult(key, start, end, self.values(state.windows[window], *window)))
            state.fired.add(window)
            heapq.heappush(expiry, (end + lateness, start, end))
        while expiry and expiry[0][0] <= watermark:
            _, start, end = heapq.heappop(expiry)
            state.fired.discard((start, end))
            del state.windows[(start, end)]
        return out

    def _reindex(self) -> None:
        if not self.indexed:
            return
        lateness = self.spec.allowed_lateness
        for state in self.keys.values():
            state.due, state.expiry = [], []
            for start, end in state.windows:
                if (start, end) in state.fired:
                    state.expiry.append((end + lateness, start, end))
                else:
                    state.due.append((end, start))
            heapq.heapify(state.due)
            heapq.heapify(state.expiry)

    def _empty(self, key: str, state: _KeyState, watermark: int) -> list[WindowResult]:
        """Windows of this key that saw no update, up to the watermark."""
        if state.next_empty is None:
            return []
        step = self.spec.size if self.spec.kind == "tumbling" else self.spec.hop
        have = set(state.windows)
        out: list[WindowResult] = []
        start = state.next_empty
        while start + self.spec.size <= watermark and len(out) < MAX_EMPTY_WINDOWS:
            window = (start, start + self.spec.size)
            if window not in have:
                out.append(WindowResult(key, *window, self.values(self._fresh(), *window)))
            start += step
        state.next_empty = start
        return out

    # Sliding ---------------------------------------------------------------------------------

    def _slide(self, key: str, state: _KeyState, t: int) -> WindowResult:
        accs = self._fresh()
        low = t - self.spec.size
        for when, args in state.buffer:
            if low < when <= t:
                self._add(accs, args, when)
        return WindowResult(key, low, t, self.values(accs, low, t))

    # Sessions --------------------------------------------------------------------------------

    def _session_add(
        self, state: _KeyState, t: int, args: list[Any], watermark: int | None
    ) -> bool:
        gap = self.spec.gap
        if watermark is not None and t + gap + self.spec.allowed_lateness <= watermark:
            touching = [s for s in state.sessions if s[0] - gap <= t <= s[1] + gap]
            if not touching:
                return False
        accs = self._fresh()
        self._add(accs, args, t)
        start, last = t, t
        keep = []
        # Sessions are always more than a gap apart, so those within a gap of t are exactly
        # the ones t joins (two of them when t bridges them).
        for session in state.sessions:
            if session[0] - gap <= t <= session[1] + gap:
                start, last = min(start, session[0]), max(last, session[1])
                accs = [
                    agg.merge(a, b)
                    for (_, agg), a, b in zip(self.aggregates, accs, session[2], strict=True)
                ]
            else:
                keep.append(session)
        keep.append([start, last, accs])
        state.sessions = sorted(keep, key=lambda s: s[0])
        return True

    def _fire_sessions(self, key: str, state: _KeyState, watermark: int) -> list[WindowResult]:
        out = []
        keep = []
        for start, last, accs in state.sessions:
            end = last + self.spec.gap
            if end <= watermark:
                out.append(WindowResult(key, start, end, self.values(accs, start, end)))
            else:
                keep.append([start, last, accs])
        state.sessions = keep
        return out

    # Count -----------------------------------------------------------------------------------

    def _count(self, key: str, state: _KeyState, t: int, args: list[Any]) -> list[WindowResult]:
        size, step = self.spec.size, self.spec.hop or self.spec.size
        state.buffer.append((t, args))
        if len(state.buffer) > size:
            del state.buffer[: len(state.buffer) - size]
        state.arrivals += 1
        if state.arrivals < size or (state.arrivals - size) % step:
            return []
        accs = self._fresh()
        for when, a in state.buffer:
            self._add(accs, a, when)
        start = min(w for w, _ in state.buffer)
        end = max(w for w, _ in state.buffer)
        return [WindowResult(key, start, end, self.values(accs, start, end))]

    # State -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain data (copied: accumulators change in place) from which `restore` resumes."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict[str, Any]:
        return {
            "max_time": self.max_time,
            "clocks": self.clocks,
            "late": self.late_count,
            "keys": {key: state.dump() for key, state in self.keys.items()},
        }

    def restore(self, data: dict[str, Any]) -> None:
        data = copy.deepcopy(data)
        self.max_time = data["max_time"]
        self.late_count = data["late"]
        clocks = data.get("clocks")
        if clocks is None:  # a snapshot from before per-key clocks: every key had this one
            clocks = {} if self.max_time is None else dict.fromkeys(data["keys"], self.max_time)
        self.clocks = dict(clocks)
        self.keys = {key: kernels.KeyState.load(k) for key, k in data["keys"].items()}
        self._reindex()
