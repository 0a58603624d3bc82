"""What a unit does with a batch of device messages, between the broker and its outputs:
ingest (decode, validate), the flow engine (composite streams, windows, rules) and the
processors, as one transaction over the flows' state.

A bug of ours on one message costs that message: the batch rolls back and its messages run one
at a time, and the one that fails alone is dead-lettered `internal_error` with its payload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from processors.chain import Chain, Item
from processors.engine.flows import FlowEngine, FlowResult
from processors.ingest import DeadLetter, Ingest, IngestBatch, RawMessage, internal_error
from streams import Codec, Rejection, SensorUpdate, StreamKey, encode_update
from streams.actuation import Actuation

log = logging.getLogger(__name__)
Message = Any  # a `streams.kernels.Publish`: compiled or its twin, the same attributes


@dataclass(slots=True)
class Outputs:
    """What one batch produced, ready to publish."""

    updates: Sequence[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    derived: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    actuations: list[Actuation] = field(default_factory=list)


class Pipeline:
    """Ingest, then the flows, then the processors, over one batch at a time."""

    def __init__(
        self,
        ingest: Ingest,
        engine: FlowEngine | None,
        chain: Chain | None,
        clock: Callable[[], float],
    ) -> None:
        self.ingest = ingest
        self.engine = engine
        self.chain = chain
        self.clock = clock

    def process(self, batch: list[Message]) -> tuple[IngestBatch, Outputs]:
        """Ingest, flows and processors over a batch, as one transaction: its changes to the
        flows' state are kept together or not at all. An unexpected exception (a bug of ours)
        rolls the batch back and runs its messages one at a time: one that fails alone is
        dead-lettered `internal_error` with its payload, and the others count exactly as if
        it had never come."""
        try:
            return self._attempt(batch)
        except Exception as exc:
            if len(batch) == 1:
                return self._failed(batch[0], exc)
            log.warning("a batch of %d messages failed (%s: %s); rolled back, running its"
                        " messages one at a time", len(batch), type(exc).__name__,
                        str(exc)[:200])  # fmt: skip
            return self._one_at_a_time(batch)

    def _attempt(self, batch: list[Message]) -> tuple[IngestBatch, Outputs]:
        engine, counts = self.engine, self.ingest.counts
        saved = replace(counts, rejected=counts.rejected.copy())
        if engine is not None:
            engine.begin()
        try:
            result = self.ingest.batch(batch)  # a Publish is shaped like a RawMessage
            outputs = self._run_flows(result)
            outputs.dead_letters.extend(self.ingest.summaries())  # the flows' and processors'
        except Exception:
            if engine is not None:
                engine.rollback()
            self.ingest.counts = saved
            raise
        if engine is not None:
            engine.commit()
        return result, outputs

    def _one_at_a_time(self, batch: list[Message]) -> tuple[IngestBatch, Outputs]:
        result = IngestBatch()
        outputs = Outputs(updates=result.accepted, dead_letters=result.dead_letters)
        for message in batch:
            try:
                one, out = self._attempt([message])
            except Exception as exc:
                one, out = self._failed(message, exc)
            result.accepted += one.accepted
            result.origins += one.origins
            outputs.derived += out.derived
            result.dead_letters += out.dead_letters  # the batch's own, and the processors'
            outputs.actuations += out.actuations
        return result, outputs

    def _failed(self, message: Message, exc: Exception) -> tuple[IngestBatch, Outputs]:
        """A message that fails on its own: dead-lettered `internal_error`, with its payload."""
        failed = internal_error(exc, self.ingest.topics.parse_device_update(message.topic))
        log.error("message to %s dead-lettered: %s", message.topic[:200], failed.message)
        result = IngestBatch(dead_letters=[self.ingest.dead_letter(message, failed)])
        return result, Outputs(dead_letters=result.dead_letters)

    def tick(self) -> Outputs:
        """Processing-time windows due and idle keys' windows, without new input, as a
        transaction too; an exception rolls it back and goes to the caller."""
        engine = self.engine
        assert engine is not None
        engine.begin()
        try:
            ticked = engine.tick()
            items = [Item(k, u) for k, u in ticked.derived]
            outputs = self._run_chain(IngestBatch(), items, ticked)
        except Exception:
            engine.rollback()
            raise
        engine.commit()
        return outputs

    def _run_flows(self, result: IngestBatch) -> Outputs:
        """The flows over the batch's accepted updates, in one call; what they derive,
        reject or find late is traced back to the message that caused it (a dead letter
        carries that message's payload)."""
        origins = result.origins
        if self.engine is None:
            plain = [Item(*u, o) for u, o in zip(result.accepted, origins, strict=True)]
            return self._run_chain(result, plain, FlowResult())
        flows = self.engine.process(result.accepted)
        for late, at in zip(flows.late, flows.late_at, strict=True):
            self.ingest.letter(origins[at], late.rejection, result.dead_letters)
        for rejection, at in zip(flows.rejected, flows.rejected_at, strict=True):
            origin = origins[at] if at >= 0 else self._no_message(rejection)
            self.ingest.letter(origin, rejection, result.dead_letters)
        if self.chain is None:  # no processors: no item per update to make
            return Outputs(result.accepted, flows.derived, result.dead_letters, flows.actuations)
        # for the processors: each update, then what the flows derived from it
        items: list[Item] = []
        derived = iter(zip(flows.derived, flows.derived_at, strict=True))
        pending = next(derived, None)
        for i, (update, origin) in enumerate(zip(result.accepted, origins, strict=True)):
            items.append(Item(*update, origin))
            while pending is not None and pending[1] == i:
                items.append(Item(*pending[0], origin))
                pending = next(derived, None)
        while pending is not None:  # processing-time windows: from no message in particular
            items.append(Item(*pending[0], None))
            pending = next(derived, None)
        return self._run_chain(result, items, flows)

    def _no_message(self, rejection: Rejection) -> RawMessage:
        """The origin of a rejection no device message caused (a processing-time window
        firing): its stream's topic, no payload."""
        so, stream = rejection.so_id or "<unknown>", rejection.stream_id or "<unknown>"
        topic = self.ingest.topics.updates(so, stream)
        return RawMessage(topic, b"", None, int(self.clock() * 1000))

    def _run_chain(self, result: IngestBatch, items: list[Item], flows: FlowResult) -> Outputs:
        """The processors, over the batch's updates and what the flows derived from them."""
        outputs = Outputs(result.accepted, flows.derived, result.dead_letters, flows.actuations)
        if self.chain is None:
            return outputs
        chained = self.chain.process(items)
        outputs.derived = [*flows.derived, *((it.key, it.update) for it in chained.derived)]
        outputs.actuations = [*flows.actuations, *chained.actuations]
        for failure in chained.failed:
            origin = failure.item.origin
            if origin is None:  # a derived update: it is what failed
                key, update = failure.item.key, failure.item.update
                origin = RawMessage(self.ingest.topics.updates(key.so, key.stream),
                                    encode_update(update), Codec.JSON.content_type,
                                    int(self.clock() * 1000))  # fmt: skip
            self.ingest.letter(origin, failure.rejection, outputs.dead_letters)
        return outputs
