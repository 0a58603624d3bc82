"""The echo kernel, pure Python: the specification of `_echo.pyx`. Accepted updates as the
(topic, body) messages that echo them, each body what `streams.codec.encode_update` (orjson)
makes of an update; the compiled kernel writes them from the runs' columns without making
the rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def echo_updates(
    parts: Sequence[Any],
    start: int,
    stop: int,
    topics: dict[Any, str],
    topic_of: Callable[[Any], str],
    encode_row: Callable[[Any], bytes],
    origins: Sequence[Any] | None = None,
    by_stream: bool = False,
    max_list: int = 0,
) -> list[tuple[str, bytes]]:
    """The (topic, body) echo of rows `start` to `stop` of `parts` (`streams.accepted` parts:
    lists of rows, column and message runs), each body `encode_row(update)`
    (`streams.codec.encode_update`); `topics` caches `topic_of(key)`. With `origins` (the
    device message of each row), one message per device message: the rows of one message
    and stream that follow each other as one list (`encode_batch` of them), a single row as
    itself; with `by_stream`, the rows of one stream that follow each other, whatever their
    message. A list is ended (the next row starts another) once it holds `max_list` bytes
    (0: no end): within the broker's packet size. The compiled kernel writes a run's bodies
    from its columns, byte for byte the same, without making its rows."""
    out: list[tuple[str, bytes]] = []
    held: list[bytes] = []
    held_topic, held_origin, size = "", None, 0

    def flush() -> None:
        if held:
            out.append((held_topic, held[0] if len(held) == 1 else b"[" + b",".join(held) + b"]"))

    at = 0
    for part in parts:
        n = len(part)
        low, high = max(start - at, 0), min(stop - at, n)
        for i in range(low, high):
            key, update = part[i] if type(part) is list else part.row(i)
            topic = topics.get(key)
            if topic is None:
                topic = topics[key] = topic_of(key)
            body = encode_row(update)
            origin = None if origins is None or by_stream else origins[at + i]
            grouped = by_stream or origins is not None
            full = max_list > 0 and size >= max_list  # size: "[", the bodies, the commas
            if grouped and held and not full and origin is held_origin and topic == held_topic:
                held.append(body)
                size += len(body) + 1
                continue
            flush()
            held, held_topic, held_origin, size = [body], topic, origin, 1 + len(body)
        at += n
    flush()
    return out
