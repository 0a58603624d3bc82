"""What a unit does with a batch of device messages, between the broker and its outputs:
ingest (decode, validate), then the engine's graph (composite streams, windows, rules and the
processors), as one transaction over the flows' state.

A bug of ours on one message costs that message: the batch rolls back and its messages run one
at a time, and the one that fails alone is dead-lettered `internal_error` with its payload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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
    origins: Sequence[object] = ()  # the device message of each of `updates`


class Pipeline:
    """Ingest, then the engine's graph, over one batch at a time."""

    def __init__(
        self, ingest: Ingest, engine: FlowEngine | None, clock: Callable[[], float]
    ) -> None:
        self.ingest = ingest
        self.engine = engine
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
        outputs = Outputs(updates=result.accepted, dead_letters=result.dead_letters,
                          origins=result.origins)  # fmt: skip
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
            outputs = self._outputs(IngestBatch(), engine.tick())
        except Exception:
            engine.rollback()
            raise
        engine.commit()
        return outputs

    def _run_flows(self, result: IngestBatch) -> Outputs:
        """The graph over the batch's accepted updates, in one call."""
        if self.engine is None:
            return Outputs(result.accepted, [], result.dead_letters, [], result.origins)
        return self._outputs(result, self.engine.process(result.accepted))

    def _outputs(self, result: IngestBatch, flows: FlowResult) -> Outputs:
        """What the graph derived and commanded, and its dead letters: what it rejected,
        found late or failed on is traced back to the message that caused it (a dead letter
        carries that message's payload)."""
        origins, letter, letters = result.origins, self.ingest.letter, result.dead_letters
        for late, at in zip(flows.late, flows.late_at, strict=True):
            letter(origins[at], late.rejection, letters)
        for rejection, at in zip(flows.rejected, flows.rejected_at, strict=True):
            letter(origins[at] if at >= 0 else self._no_message(rejection), rejection, letters)
        for (key, update, rejection), at in zip(flows.failed, flows.failed_at, strict=True):
            if at >= 0:
                origin = origins[at]
            else:  # an update no message caused: it is what failed
                origin = RawMessage(self.ingest.topics.updates(key.so, key.stream),
                                    encode_update(update), Codec.JSON.content_type,
                                    int(self.clock() * 1000))  # fmt: skip
            letter(origin, rejection, letters)
        return Outputs(result.accepted, flows.derived, letters, flows.actuations, result.origins)

    def _no_message(self, rejection: Rejection) -> RawMessage:
        """The origin of a rejection no device message caused (a processing-time window
        firing): its stream's topic, no payload."""
        so, stream = rejection.so_id or "<unknown>", rejection.stream_id or "<unknown>"
        topic = self.ingest.topics.updates(so, stream)
        return RawMessage(topic, b"", None, int(self.clock() * 1000))
