"""Run a catalog's flows offline over a file of updates: the engine of `cloudlet flow test`.

Input, one JSON object per line: {"so": "<soId>", "stream": "<streamId>", "update": <sensor
update, or a batch>}. Output, one JSON object per line, in the order things happened:
{"kind": "derived" | "late" | "rejected" | "discarded", "so", "stream", ...}, with "reason"
and "message" for all but derived updates. Processing time follows the input's event time, so
a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from processors.engine import engine_of
from processors.engine.flows import FlowResult
from streams.catalog import Catalog
from streams.codec import update_document
from streams.registry import Registry
from streams.rejections import InvalidUpdate, Rejection, RejectReason, no_updates
from streams.updates import StreamKey

if TYPE_CHECKING:
    from processors.chain import Chain

Record = dict[str, Any]


class _EventClock:
    """Processing time offline: the newest event time seen (seconds, like time.time)."""

    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> float:
        return self.now_ms / 1000.0


def _rejected(line: int, rejection: Rejection, update: Any = None) -> Record:
    record: Record = {
        "kind": "rejected",
        "so": rejection.so_id,
        "stream": rejection.stream_id,
        "reason": rejection.reason.value,
        "message": rejection.message,
        "line": line,
    }
    if update is not None:
        record["update"] = update
    return record


def _records(result: FlowResult) -> Iterator[Record]:
    for key, update in result.derived:
        yield {"kind": "derived", "so": key.so, "stream": key.stream,
               "update": update_document(update)}  # fmt: skip
    for late in result.late:
        yield {"kind": "late", "so": late.key.so, "stream": late.key.stream,
               "update": update_document(late.update), "reason": late.rejection.reason.value,
               "message": late.rejection.message}  # fmt: skip
    for rejection in result.rejected:
        yield {"kind": "rejected", "so": rejection.so_id, "stream": rejection.stream_id,
               "reason": rejection.reason.value, "message": rejection.message}  # fmt: skip
    for command in result.actuations:
        yield {"kind": "actuation", "so": command.so, "action": command.action,
               "parameters": command.parameters, "issuedAt": command.issued_at}  # fmt: skip
    for key, update, rejection in result.failed:  # by a processor
        kind = "late" if rejection.reason is RejectReason.LATE else "rejected"
        yield {"kind": kind, "so": key.so, "stream": key.stream,
               "update": update_document(update), "reason": rejection.reason.value,
               "message": rejection.message}  # fmt: skip
    for d in result.discarded:
        yield {"kind": "discarded", "so": d.key.so, "stream": d.key.stream,
               "trigger": f"{d.trigger.so}/{d.trigger.stream}", "lastUpdate": d.last_update,
               "reason": "stale", "message": d.message}  # fmt: skip


def run_offline(
    catalog: Catalog,
    lines: Iterable[str | bytes],
    *,
    flush: bool = True,
    chain: Chain | None = None,
    registry: Registry | None = None,
) -> Iterator[Record]:
    """Feed each input line to the graph (the flows, and a unit's processors: `chain`);
    yield what comes out. With `flush`, windows still open at the end of the input are closed
    and their results emitted. `registry` (default the catalog's) validates the input: a
    unit's processors add streams to it."""
    registry = registry or catalog.registry
    clock = _EventClock()
    engine = engine_of(catalog, clock=clock, chain=chain)

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc})") from None
            if not isinstance(item, dict) or not {"so", "stream", "update"} <= item.keys():
                raise ValueError('expected {"so": ..., "stream": ..., "update": ...}')
            so, stream = item["so"], item["stream"]
            if not isinstance(so, str) or not isinstance(stream, str):
                raise ValueError("so and stream must be strings")
        except ValueError as exc:
            yield _rejected(number, Rejection(RejectReason.MALFORMED, f"line {number}: {exc}"))
            continue
        try:
            validator = registry.validator(so, stream)
        except InvalidUpdate as exc:
            yield _rejected(number, exc.rejection, item["update"])
            continue
        accepted, rejections = validator.document(item["update"])
        if not accepted and not rejections:  # as the unit does
            rejections = [no_updates(so, stream)]
        for rejection in rejections:
            yield _rejected(number, rejection, item["update"])
        for update in accepted:
            clock.now_ms = max(clock.now_ms, update.last_update)
            key = StreamKey(so, stream)
            yield from _records(engine.process([(key, update)]))
    if flush:
        yield from _records(engine.flush())
