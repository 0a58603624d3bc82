"""The window kernel, pure Python: the specification of `_windows.pyx`.

`fold_windows` adds a batch of updates to a tumbling or hopping `WindowOperator`, exactly as
calling `operator.process` for each in turn would, and says which update each window result
and each late update came from. The compiled kernel does the per-update work (window lookup,
lateness, count/sum/avg/min/max accumulation) in C and calls back into the operator only to
fire the windows that became due.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streams.windows.keys import KeyState  # the twin of the kernel's own KeyState

__all__ = ["KeyState", "fold_windows"]


def fold_windows(
    operator: Any, groups: Sequence[str], times: Sequence[int], args: Sequence[Sequence[Any]]
) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """(fired window results, late updates), each tagged with the index of its update."""
    fired: list[tuple[int, Any]] = []
    late: list[tuple[int, Any]] = []
    for i in range(len(groups)):
        results, lates = operator.process(groups[i], times[i], args[i])
        fired.extend((i, r) for r in results)
        late.extend((i, x) for x in lates)
    return fired, late
