"""Built-in processors that clean a stream, each keeping a history per stream with its own
undo log: dedupe (drop repeats), downsample (a rate per stream) and zscore (anomalies)."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator

from processors.builtins import DURATION, _Config, _duration, _number
from processors.plugin import Batch, Output, Processor, ProcessorError, Setup
from processors.undo import TransactionalDict
from streams.codec import update_document

_NEW, _NONE = object(), object()  # ZScore's undo log: a new stream; nothing pushed out


class Dedupe(Processor["Dedupe.Config"]):
    """Drop repeats: an update equal to one seen on the same stream within `within` of event
    time (by default equal = same lastUpdate and same channel values, the duplicate a QoS 1
    redelivery or a device's retry makes; `by` compares only the channels named). Memory is
    bounded by `max_entries` per stream: the oldest are forgotten first."""

    class Config(_Config):
        by: list[str] | None = None
        within: int = Field(3_600_000, json_schema_extra=DURATION)
        max_entries: int = Field(default=10_000, ge=1)

        _within = field_validator("within", mode="before")(lambda cls, v: _duration(v))

    def setup(self, ctx: Setup) -> None:
        for key in ctx.inputs:
            missing = set(self.config.by or ()) - set(ctx.channels(key))
            if missing:
                raise ProcessorError(f"by: {key.so}/{key.stream} has no channel"
                                     f" {', '.join(sorted(missing))}")  # fmt: skip
        # stream -> fingerprint -> (event time, entry number), and the entries in the order
        # they were made; an entry whose number is no longer its fingerprint's is stale
        self.seen: dict[str, dict[str, tuple[int, int]]] = {}
        self.order: dict[str, deque[tuple[str, int, int]]] = {}
        self._made = 0
        # While a batch may still be undone: what it changed, to take back in reverse. A copy
        # of the whole state per batch would cost max_entries x streams (0.8 s at 200 streams).
        self._undo: list[tuple[Any, ...]] | None = None

    def _fingerprint(self, update: Any) -> str:
        doc = update_document(update)
        if self.config.by is None:
            shown = [doc["lastUpdate"], doc["channels"]]
        else:
            shown = [doc["channels"].get(c) for c in self.config.by]
        data = orjson.dumps(shown, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(data, digest_size=12).hexdigest()

    def process(self, batch: Batch, out: Output) -> None:
        undo = self._undo
        within, most = self.config.within, self.config.max_entries
        for key, update in batch:
            stream = f"{key.so}/{key.stream}"
            seen = self.seen.get(stream)
            if seen is None:
                seen = self.seen[stream] = {}
                order = self.order[stream] = deque()
                if undo is not None:
                    undo.append(("stream", stream))
            else:
                order = self.order[stream]
            t = update.last_update
            fp = self._fingerprint(update)
            last = seen.get(fp)
            if last is not None and abs(t - last[0]) <= within:
                continue
            self._made += 1
            seen[fp] = (t, self._made)
            order.append((fp, t, self._made))
            if undo is not None:
                undo.append(("seen", stream, fp, last))
            horizon = t - within
            while order:  # forget the oldest while too many, or too old
                entry = order[0]
                live = seen.get(entry[0]) == (entry[1], entry[2])  # else seen again since
                if live and len(seen) <= most and entry[1] >= horizon:
                    break
                order.popleft()
                if undo is not None:
                    undo.append(("popped", stream, entry))
                if live:
                    del seen[entry[0]]
                    if undo is not None:
                        undo.append(("forgot", stream, entry))
            if undo is None:
                self._compact(stream)
            out.emit(key, update.channels, t)

    def _compact(self, stream: str) -> None:
        """Keep stale entries from outgrowing the live ones (a stream whose updates repeat
        outside `within` re-enters the same fingerprints)."""
        order, seen = self.order[stream], self.seen[stream]
        if len(order) > 2 * len(seen) + 64:
            self.order[stream] = deque(e for e in order if seen.get(e[0]) == (e[1], e[2]))

    def begin(self) -> bool:
        self._undo = []
        return True

    def commit(self) -> None:
        undo, self._undo = self._undo or [], None
        for stream in {step[1] for step in undo}:
            if stream in self.order:
                self._compact(stream)

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for step in reversed(undo):
            kind, stream = step[0], step[1]
            if kind == "stream":
                del self.seen[stream], self.order[stream]
            elif kind == "seen":
                fp, last = step[2], step[3]
                self.order[stream].pop()
                if last is None:
                    del self.seen[stream][fp]
                else:
                    self.seen[stream][fp] = last
            elif kind == "popped":
                self.order[stream].appendleft(step[2])
            else:  # "forgot"
                fp, t, n = step[2]
                self.seen[stream][fp] = (t, n)

    def snapshot(self) -> Any:
        # fingerprint -> event time, oldest first (the order they would be forgotten in)
        return {
            stream: {fp: t for fp, t, n in self.order[stream] if seen.get(fp) == (t, n)}
            for stream, seen in self.seen.items()
        }

    def restore(self, state: Any) -> None:
        self.seen, self.order, self._undo, self._made = {}, {}, None, 0
        for stream, entries in (state or {}).items():
            order: deque[tuple[str, int, int]] = deque()
            for fp, t in entries.items():
                self._made += 1
                order.append((fp, t, self._made))
            self.order[stream] = order
            self.seen[stream] = {fp: (t, n) for fp, t, n in order}


class Downsample(Processor["Downsample.Config"]):
    """At most one update per stream per `every` of event time: the first of each aligned
    interval (align: true), or the first at least `every` after the last one passed
    (align: false, a rate limit)."""

    class Config(_Config):
        every: int = Field(json_schema_extra=DURATION)
        align: bool = True

        _every = field_validator("every", mode="before")(lambda cls, v: _duration(v))

        @field_validator("every")
        @classmethod
        def _positive(cls, value: int) -> int:
            if value <= 0:
                raise ValueError("every must be a positive duration")
            return value

    def setup(self, ctx: Setup) -> None:
        self.last: TransactionalDict[str, int] = TransactionalDict()

    def process(self, batch: Batch, out: Output) -> None:
        every = self.config.every
        for key, update in batch:
            name = f"{key.so}/{key.stream}"
            t = update.last_update
            mark = t - t % every if self.config.align else t
            last = self.last.get(name)
            if last is not None and (mark <= last if self.config.align else mark - last < every):
                continue
            self.last[name] = mark
            out.emit(key, update.channels, t)

    def begin(self) -> bool:
        return self.last.begin()

    def commit(self) -> None:
        self.last.commit()

    def rollback(self) -> None:
        self.last.rollback()

    def snapshot(self) -> Any:
        return self.last.data

    def restore(self, state: Any) -> None:
        self.last = TransactionalDict(state or {})


class ZScore(Processor["ZScore.Config"]):
    """Anomalies by z-score: each value against the mean and standard deviation of the
    stream's previous `samples` values; |z| >= `threshold` is an anomaly. Emits anomalies only
    (emit: anomalies) or every scored value (emit: all)."""

    class Config(_Config):
        value: str
        samples: int = Field(default=100, ge=2, le=100_000)
        threshold: float = Field(default=3.0, gt=0)
        min_samples: int = Field(default=10, ge=2)
        emit: Literal["anomalies", "all"] = "anomalies"

    def setup(self, ctx: Setup) -> None:
        self.value = ctx.expression(self.config.value, expect="number", what="value")
        ctx.produces({"value": "number", "mean": "number", "stddev": "number",
                      "zscore": "number", "anomaly": "boolean"})  # fmt: skip
        self.history: dict[str, deque[float]] = {}
        # While a batch may still be undone: per value added, its stream and what it pushed
        # out of the full history (_NEW: the stream's first value; _NONE: nothing)
        self._undo: list[tuple[str, Any]] | None = None

    def process(self, batch: Batch, out: Output) -> None:
        c = self.config
        for key, update in batch:
            v = _number(self.value[key].evaluate({"": update}), "value")
            if v is None or not math.isfinite(v):
                continue
            name = f"{key.so}/{key.stream}"
            history = self.history.get(name)
            if history is None:
                history = self.history[name] = deque(maxlen=c.samples)
                if self._undo is not None:
                    self._undo.append((name, _NEW))
            if len(history) >= c.min_samples:
                n = len(history)
                mean = math.fsum(history) / n
                std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / (n - 1))
                # A constant history: any other value is an anomaly, its z-score unbounded.
                z = (v - mean) / std if std else None
                anomaly = abs(z) >= c.threshold if z is not None else v != mean
                if anomaly or c.emit == "all":
                    out.emit(key, {"value": v, "mean": mean, "stddev": std, "zscore": z,
                                   "anomaly": anomaly}, update.last_update)  # fmt: skip
            if self._undo is not None:
                self._undo.append((name, history[0] if len(history) == c.samples else _NONE))
            history.append(v)

    def begin(self) -> bool:
        self._undo = []
        return True

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for name, before in reversed(undo):
            if before is _NEW:
                del self.history[name]
                continue
            history = self.history[name]
            history.pop()
            if before is not _NONE:
                history.appendleft(before)

    def snapshot(self) -> Any:
        return {k: list(v) for k, v in self.history.items()}

    def restore(self, state: Any) -> None:
        n = self.config.samples
        self.history = {k: deque(v, maxlen=n) for k, v in (state or {}).items()}
        self._undo = None
