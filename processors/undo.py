"""State a batch can undo without a copy: what a processor keeps per key, with an undo log.

A processor that keeps its state in a `TransactionalDict` and forwards `begin`, `commit` and
`rollback` to it lets the unit undo a failing batch at the cost of what the batch changed,
where the default (a copy of the whole state before every batch) costs what the state holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_ABSENT: Any = object()


class TransactionalDict(MutableMapping[K, V]):
    """A dict whose changes between `begin` and `rollback` are undone: each key gets back
    the value it had before its first change (or goes, if it had none). Values are replaced,
    never changed in place: a change made inside a value is not seen, so it is not undone."""

    __slots__ = ("_undo", "data")

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self.data: dict[K, V] = dict(data or {})  # plain data, for `snapshot`
        self._undo: dict[K, V] | None = None  # the open transaction: values before it

    def __getitem__(self, key: K) -> V:
        return self.data[key]

    def get(self, key: K, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __setitem__(self, key: K, value: V) -> None:
        undo = self._undo
        if undo is not None and key not in undo:
            undo[key] = self.data.get(key, _ABSENT)
        self.data[key] = value

    def __delitem__(self, key: K) -> None:
        undo = self._undo
        if undo is not None and key not in undo and key in self.data:
            undo[key] = self.data[key]
        del self.data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"TransactionalDict({self.data!r})"

    def begin(self) -> bool:
        """Start saving what changes; True, for a processor's `begin` to return."""
        self._undo = {}
        return True

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo, None
        for key, value in (undo or {}).items():
            if value is _ABSENT:
                self.data.pop(key, None)
            else:
                self.data[key] = value
