"""Ingest: raw device messages in, validated updates and dead letters out, a batch at a time.

This is the first stage of every processing unit and knows nothing of MQTT: the runtime hands
it batches of `RawMessage`s and publishes what comes back. Every message ends up either as
accepted updates or as dead letters carrying the original payload and the reason; nothing is
dropped, and every outcome is counted.
"""

from __future__ import annotations

import functools
import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import orjson

from streams import (
    InvalidUpdate,
    Registry,
    Rejection,
    RejectReason,
    SensorUpdate,
    StreamKey,
    TopicScheme,
    dead_letter_record,
    decode,
    kernels,
)
from streams.accepted import ColumnRun, Part, Shape, Updates
from streams.codec import DEFAULT_MAX_PAYLOAD
from streams.kernels._columnar_py import typed
from streams.rejections import no_updates
from streams.updates import StreamValidator

TOPIC_CACHE = 100_000  # device topics whose parse is kept
_unpack = functools.partial(msgpack.unpackb, raw=False, strict_map_key=True)  # as decode()
DEFAULT_MAX_FUTURE_MS = 5 * 60_000
"""How far ahead of the unit's clock an update may be dated before it is refused."""
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as it came off the broker (or the HTTP gateway)."""

    topic: str
    payload: bytes
    content_type: str | None = None
    received_at: int = 0  # ms since the epoch, from the runtime's clock


class Incoming(Protocol):
    """What ingest reads of a message: a `RawMessage`, or the MQTT client's `Publish`."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def received_at(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    body: bytes
    rejection: Rejection
    count: int = 1  # the rejections it stands for (a summary of one message's: more than 1)


MAX_LETTERS_PER_MESSAGE = 20
"""Dead letters made one by one for the rejections of one message; past that, one letter per
reason sums up the rest (each carries the payload: without a bound, a message of 100,000 bad
or late readings would make 100,000 copies of it)."""


@dataclass(slots=True)
class IngestBatch:
    # rows, and the columnar messages' readings as column runs (streams.accepted)
    accepted: Updates = field(default_factory=Updates)
    origins: list[Incoming] = field(default_factory=list)  # the message of each accepted
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass(slots=True)
class IngestCounts:
    """Running totals: messages received, updates accepted, rejections by reason."""

    messages: int = 0
    accepted: int = 0
    rejected: Counter[RejectReason] = field(default_factory=Counter)

    def snapshot(self) -> IngestCounts:
        return IngestCounts(self.messages, self.accepted, Counter(self.rejected))


class Ingest:
    """Decodes and validates device messages against the registry."""

    def __init__(
        self,
        registry: Registry,
        topics: TopicScheme | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_future_ms: int | None = DEFAULT_MAX_FUTURE_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.topics = topics or TopicScheme()
        self.max_payload = max_payload
        self.max_future_ms = max_future_ms
        self.clock = clock
        self.counts = IngestCounts()
        self._keys: dict[str, StreamKey] = {}  # device topic -> (so, stream), parsed once
        # device topic -> (its stream, its channels' shape): known streams, for the kernel
        self._routes: dict[str, tuple[StreamKey, Shape]] = {}
        self._shapes: dict[tuple[tuple[str, int], ...], Shape] = {}
        # this batch's dead letters per message (by identity), and the rejections past
        # MAX_LETTERS_PER_MESSAGE: (message, reason) -> [the first of them, how many]
        self._letters_of: dict[int, int] = {}
        self._overflow: dict[tuple[int, RejectReason], tuple[Incoming, list[Any]]] = {}

    def batch(self, messages: Sequence[Incoming]) -> IngestBatch:
        """Decode and validate a batch. Messages of known streams whose body holds good updates
        (JSON or msgpack; one update, a list of them, or the columnar form) go through one
        compiled call (`kernels.ingest_rows`) into runs of typed columns; anything else (a
        bad value, a unit, seconds, an unknown topic) through the validator, which words the
        rejections. Accepted updates keep the messages' order.

        Whatever a message holds, it ends as updates or dead letters: an unexpected exception
        while reading one (a bug of ours) dead-letters that message as `internal_error`."""
        horizon = (
            None if self.max_future_ms is None else int(self.clock() * 1000) + self.max_future_ms
        )
        self._letters_of, self._overflow = {}, {}
        try:
            parts, origins, slow, starts = kernels.ingest_rows(
                messages, self._routes, self.max_payload, horizon, SensorUpdate, orjson.loads,
                _unpack,
            )  # fmt: skip
        except Exception:  # the slow path below words every message on its own
            log.exception("ingest kernel failed on a batch; validating its messages one by one")
            parts, origins, slow, starts = [], [], list(range(len(messages))), []
        if not slow:
            out = IngestBatch(Updates(), origins)
            for part in parts:
                out.accepted.add_part(part)
        else:
            out = self._merge(parts, starts, origins, slow,
                              self._slow([messages[i] for i in slow], horizon))  # fmt: skip
        out.dead_letters += self.summaries()
        self.counts.accepted += len(out.accepted)
        self.counts.messages += len(messages)
        return out

    def _merge(
        self,
        parts: list[Part],
        starts: list[int],
        origins: list[Incoming],
        slow: list[int],
        slowly: list[IngestBatch],
    ) -> IngestBatch:
        """The fast and the slow results, in the messages' order: each part (whose first
        message is `starts[k]`; none spans a slow message) after the slow messages before
        it."""
        out = IngestBatch()
        waiting = iter(zip(slow, slowly, strict=True))
        pending = next(waiting, None)
        at = 0
        for part, start in zip(parts, starts, strict=True):
            while pending is not None and pending[0] < start:
                self._splice(out, pending[1])
                pending = next(waiting, None)
            n = len(part)
            out.accepted.add_part(part)
            out.origins += origins[at : at + n]
            at += n
        while pending is not None:
            self._splice(out, pending[1])
            pending = next(waiting, None)
        return out

    @staticmethod
    def _splice(out: IngestBatch, one: IngestBatch) -> None:
        out.accepted += one.accepted
        out.origins += one.origins
        out.dead_letters += one.dead_letters

    def _slow(self, messages: list[Incoming], horizon: int | None) -> list[IngestBatch]:
        """Each message the validator's way: its updates and its dead letters."""
        outs = []
        entries = [self._guarded_decode(message) for message in messages]
        decoded = [e for e in entries if type(e) is tuple]
        try:
            fast: Any = iter(kernels.row_updates(
                [doc for *_, doc in decoded], [v.kinds for _, _, v, _ in decoded], SensorUpdate
            ))  # fmt: skip
        except Exception:  # the validator below words every message on its own
            log.exception("row kernel failed on a batch; validating its messages one by one")
            fast = iter([None] * len(decoded))
        for message, entry in zip(messages, entries, strict=True):
            out = IngestBatch()
            outs.append(out)
            if isinstance(entry, Rejection):
                self._reject(message, entry, out)
                continue
            _, key, validator, doc = entry
            update = next(fast)
            rejections: list[Rejection] = []
            if update is not None:
                accepted = [update]
            else:
                try:
                    columns = validator.valid_columns(doc)
                    if columns is not None and (horizon is None or max(columns[0]) <= horizon):
                        # a columnar batch, all good (msgpack, or JSON the kernel did not
                        # read): kept as columns, typed as the kernel types them
                        times, names, cells = columns
                        kinds = validator.kinds
                        out.accepted = Updates.of_run(
                            ColumnRun(
                                key,
                                array("q", times),
                                names,
                                [typed(c, kinds[n]) for n, c in zip(names, cells, strict=True)],
                            )
                        )
                        out.origins = [message] * len(out.accepted)
                        continue
                    accepted, rejections = validator.document(doc)
                except Exception as exc:
                    accepted, rejections = [], [internal_error(exc, key)]
                if not accepted and not rejections:
                    rejections = [no_updates(*key)]
            if horizon is None or all(u.last_update <= horizon for u in accepted):
                out.accepted = Updates((key, u) for u in accepted)  # a batch of many readings
                out.origins = [message] * len(accepted)
            else:
                for u in accepted:
                    if u.last_update > horizon:
                        self._reject(message, _from_the_future(key, u.last_update, horizon), out)
                        continue
                    out.accepted.append((key, u))
                    out.origins.append(message)
            for rejection in rejections:
                self._reject(message, rejection, out)
        return outs

    def _guarded_decode(
        self, message: Incoming
    ) -> tuple[Incoming, StreamKey, StreamValidator, Any] | Rejection:
        try:
            return self._decode(message)
        except Exception as exc:
            return internal_error(exc, None)

    def _decode(
        self, message: Incoming
    ) -> tuple[Incoming, StreamKey, StreamValidator, Any] | Rejection:
        key = self._keys.get(message.topic)
        if key is None:
            key = self.topics.parse_device_update(message.topic)
            if key is not None:
                if len(self._keys) >= TOPIC_CACHE:
                    self._keys.clear()  # a fleet larger than the cache: start over, stay bounded
                self._keys[message.topic] = key
        if key is None:
            return Rejection(
                RejectReason.MALFORMED,
                f"topic {message.topic!r} is not a device topic"
                f" ({self.topics.device_update('<so>', '<stream>')})",
            )
        try:
            validator = self.registry.validator(key.so, key.stream)
            if message.topic not in self._routes:
                if len(self._routes) >= TOPIC_CACHE:
                    self._routes.clear()
                    self._shapes.clear()
                kinds = validator.kinds  # streams of the same channels share a shape (a run)
                shape = self._shapes.setdefault(tuple(kinds.items()), Shape(kinds))
                self._routes[message.topic] = (key, shape)  # the fast path's way in
            doc = decode(message.payload, message.content_type, max_bytes=self.max_payload)
        except InvalidUpdate as exc:
            rejection = exc.rejection
            if rejection.so_id is None:  # codec errors do not know where the message went
                rejection = Rejection(
                    rejection.reason,
                    f"{key.so}/{key.stream}: {rejection.message}",
                    key.so,
                    key.stream,
                )
            return rejection
        return message, key, validator, doc

    def _reject(self, message: Incoming, rejection: Rejection, out: IngestBatch) -> None:
        self.counts.rejected[rejection.reason] += 1
        self.letter(message, rejection, out.dead_letters)

    def letter(self, message: Incoming, rejection: Rejection, into: list[DeadLetter]) -> None:
        """Dead-letter `rejection` of `message` into `into`, within the batch's budget per
        message (`MAX_LETTERS_PER_MESSAGE`); past it, the rejection waits in a summary
        (`summaries`)."""
        made = self._letters_of.get(id(message), 0)
        if made < MAX_LETTERS_PER_MESSAGE:
            self._letters_of[id(message)] = made + 1
            into.append(self.dead_letter(message, rejection))
            return
        held = self._overflow.get((id(message), rejection.reason))
        if held is None:
            self._overflow[(id(message), rejection.reason)] = (message, [rejection, 1])
        else:
            held[1][1] += 1

    def summaries(self) -> list[DeadLetter]:
        """One dead letter per message and reason for the rejections past the budget held so
        far, standing for all of them (`count`). The batch's budget goes on (later stages
        dead-letter within what is left of it) until the next batch."""
        out = []
        for message, (first, n) in self._overflow.values():
            summary = Rejection(
                first.reason,
                f"{n} more {first.reason.value} rejections of this message, summed up here"
                f" (at most {MAX_LETTERS_PER_MESSAGE} dead letters per message); the first:"
                f" {first.message}",
                first.so_id,
                first.stream_id,
                first.index,
            )
            letter = self.dead_letter(message, summary)
            out.append(DeadLetter(letter.topic, letter.body, summary, n))
        self._overflow = {}
        return out

    def dead_letter(self, message: Incoming, rejection: Rejection) -> DeadLetter:
        """The dead letter for `rejection`, carrying `message` as it arrived (or an excerpt
        of it, past `MAX_DEAD_LETTER_PAYLOAD`)."""
        return DeadLetter(
            self.topics.dead_letter(rejection.so_id, rejection.stream_id),
            dead_letter_record(
                rejection,
                topic=message.topic,
                payload=message.payload,
                received_at=message.received_at,
            ),
            rejection,
        )


_logged: set[str] = set()  # internal errors whose traceback was logged (once each)


def internal_error(exc: BaseException, key: StreamKey | None) -> Rejection:
    """The rejection of a message that a bug of ours failed on: the message costs itself,
    never the unit. The traceback is logged once per kind of failure."""
    where = type(exc).__name__ + ":" + str(exc.__traceback__ and exc.__traceback__.tb_lineno)
    if where not in _logged and len(_logged) < 1000:
        _logged.add(where)
        log.error("internal error on a message (dead-lettered)", exc_info=exc)
    text = f"{type(exc).__name__}: {str(exc)[:200]}"
    if key is None:
        return Rejection(RejectReason.INTERNAL_ERROR, f"the message could not be handled ({text})")
    return Rejection(
        RejectReason.INTERNAL_ERROR,
        f"{key.so}/{key.stream}: the message could not be handled ({text})",
        key.so,
        key.stream,
    )


def _from_the_future(key: StreamKey, at: int, horizon: int) -> Rejection:
    def iso(ms: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"

    return Rejection(
        RejectReason.FUTURE_TIMESTAMP,
        f"{key.so}/{key.stream}: lastUpdate {at} ({iso(at)}) is more than max_future ahead of"
        f" the unit's clock (accepted up to {horizon}, {iso(horizon)}): is the device's clock"
        " right?",
        key.so,
        key.stream,
    )
