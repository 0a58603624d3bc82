"""The echo of a batch's accepted device updates (`republish`), as (topic, body) messages to
publish: per device message (a message's updates as it carried them, one or a list, byte for
byte `encode_batch` of them), per update, or per stream (a list). Encoded from the runs'
columns by the echo kernel, rows not made; a failure of the kernel costs speed, not the echo:
it is logged once and the batch echoed the pure-Python way."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from processors.config import RepublishSettings
from processors.ingest import TOPIC_CACHE
from processors.pipeline import Outputs
from streams import SensorUpdate, StreamKey, encode_update, kernels
from streams.accepted import Updates
from streams.kernels import _echo_py
from streams.topics import TopicScheme

log = logging.getLogger(__name__)
Messages = list[tuple[str, bytes]]


class Echo:
    """A unit's echo: its settings, the topics it publishes to, the most bytes of a list."""

    def __init__(
        self, republish: RepublishSettings, topics: TopicScheme, limit: Callable[[], int],
        window: int,
    ) -> None:  # fmt: skip
        self.republish = republish
        self.topics = topics
        self.limit = limit  # the most bytes an echo list holds (the broker's packet size, ...)
        self.window = window  # per update: at most this many echoes made at a time
        self._topics: dict[StreamKey, str] = {}  # each stream's echo topic, made once
        self._kernel_failed = False

    def messages(self, result: Outputs) -> Iterator[Messages]:
        """The echo of a batch, in slices to publish one after the other."""
        updates, mode = result.updates, self.republish.mode
        if not self.republish.updates or not updates:
            return
        if mode == "message" and len(result.origins) == len(updates):
            # as many echoes as device messages (a long one in lists within the packet size)
            yield self._encode(updates, 0, len(updates), result.origins)
            return
        if mode != "stream":  # a window at a time: 100-reading messages echo 100,000 updates
            for i in range(0, len(updates), self.window):
                yield self._encode(updates, i, i + self.window)
            return
        yield self._by_stream(updates)

    def _by_stream(self, updates: Sequence[tuple[StreamKey, SensorUpdate]]) -> Messages:
        """Per stream, in the order the streams came: the kernel lists each stretch of a
        stream's updates, and the stretches of a stream are joined (a list's brackets off),
        a list at most the packet size allows."""
        limit = self.limit()
        by_topic: dict[str, list[list[bytes]]] = {}
        room: dict[str, int] = {}
        for topic, body in self._encode(updates, 0, len(updates), by_stream=True):
            piece = body[1:-1] if body[:1] == b"[" else body
            lists = by_topic.setdefault(topic, [[]])
            if lists[-1] and room[topic] + len(piece) + 1 > limit:
                lists.append([])
            if not lists[-1]:
                room[topic] = 1
            lists[-1].append(piece)
            room[topic] += len(piece) + 1
        return [(topic, _listed(pieces)) for topic, lists in by_topic.items()
                for pieces in lists]  # fmt: skip

    def _encode(
        self,
        updates: Sequence[tuple[StreamKey, SensorUpdate]],
        start: int,
        stop: int,
        origins: Sequence[object] | None = None,
        *,
        by_stream: bool = False,
    ) -> Messages:
        """The (topic, body) echo of updates `start` to `stop`: one message per update, or
        with `origins` one per device message."""
        if len(self._topics) > TOPIC_CACHE:
            self._topics.clear()
        parts = updates.parts if isinstance(updates, Updates) else [list(updates)]
        args = (parts, start, stop, self._topics, self._topic, encode_update, origins,
                by_stream, self.limit())  # fmt: skip
        try:
            echoes: Messages = kernels.echo_updates(*args)
        except Exception:  # a bug of the kernel's costs speed, not the echo or the worker
            if not self._kernel_failed:
                self._kernel_failed = True
                log.exception("the echo kernel failed; echoing the pure-Python way")
            echoes = _echo_py.echo_updates(*args)
        return echoes

    def _topic(self, key: StreamKey) -> str:
        return self.topics.updates(key.so, key.stream)


def _listed(bodies: list[bytes]) -> bytes:
    """Update documents as one list (ServIoTicy's batch form): `encode_batch` of them."""
    return b"[" + b",".join(bodies) + b"]"
