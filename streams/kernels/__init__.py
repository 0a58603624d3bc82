"""Compiled kernels and their pure-Python twins, chosen here and nowhere else.

Each kernel has one signature and two implementations: `_<name>.pyx` (Cython, built by
`pip install`) and `_<name>_py.py`, which is the specification and the fallback.
`CLOUDLET_NO_EXTENSIONS=1` forces pure Python; if a compiled module is missing otherwise, the
import says so loudly (a warning on every start, and `COMPILED` is False), and
`CLOUDLET_REQUIRE_EXTENSIONS=1` turns that into an error (the test command sets it).

- columnar: device messages read a batch at a time (topic, content type, size, decoding,
  values) into message runs and column runs of typed columns, and decoded documents validated
  column by column;
- echo: the echo of accepted updates written from the runs' columns, byte for byte orjson's;
- frames: MQTT v5 packets cut from the broker's bytes, and PUBLISH/PUBACK packets built in bulk;
- vector: a flow's `where` and arguments (arithmetic, comparisons, logic over number
  channels) evaluated a column at a time over a run's doubles;
- windows: a batch of updates folded into a tumbling or hopping window operator;
- inputs: the inputs of flows with a column plan (`where: t > 5`, `avg(t)`) read from a
  batch's rows and runs without expressions, and folded;
  `KeyState`, the state of a window key, is the kernel's own type (a C structure compiled).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from streams.kernels import (
    _columnar_py,
    _echo_py,
    _frames_py,
    _inputs_py,
    _vector_py,
    _windows_py,
)

NO_EXTENSIONS = os.environ.get("CLOUDLET_NO_EXTENSIONS") == "1"
FrameError = _frames_py.FrameError  # both implementations raise this one


def _compiled() -> tuple[ModuleType, ...] | None:
    if NO_EXTENSIONS:
        return None
    try:
        from streams.kernels import (  # type: ignore[attr-defined]
            _columnar,
            _echo,
            _frames,
            _inputs,
            _vector,
            _windows,
        )
    except ImportError as exc:
        if os.environ.get("CLOUDLET_REQUIRE_EXTENSIONS") == "1":
            raise ImportError(
                f"the compiled kernels are missing ({exc}); reinstall with a C compiler and"
                " the Python headers (pip install -e .), or set CLOUDLET_NO_EXTENSIONS=1"
            ) from exc
        warnings.warn(
            f"cloudlet's compiled kernels are missing ({exc}): running pure Python, several"
            " times slower; reinstall with a C compiler (pip install -e .)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _columnar, _echo, _frames, _inputs, _vector, _windows


_modules = _compiled()
COMPILED = _modules is not None
columnar, echo, frames, inputs, vector, windows = _modules or (
    _columnar_py,
    _echo_py,
    _frames_py,
    _inputs_py,
    _vector_py,
    _windows_py,
)
columnar_updates = columnar.columnar_updates
columnar_fits = columnar.columnar_fits
row_updates = columnar.row_updates
ingest_rows = columnar.ingest_rows
echo_updates = echo.echo_updates
split_frames = frames.split_frames
publish_frames = frames.publish_frames
puback_frames = frames.puback_frames
Publish = frames.Publish
fold_windows = windows.fold_windows
column_inputs = inputs.column_inputs
take_inputs = inputs.take_inputs
fold_parts = inputs.fold_parts
derive_columns = vector.derive_columns
KeyState = windows.KeyState  # a window key's state: the kernel's own type (its twin: keys.py)

__all__ = [
    "COMPILED",
    "NO_EXTENSIONS",
    "FrameError",
    "KeyState",
    "Publish",
    "column_inputs",
    "columnar_fits",
    "columnar_updates",
    "derive_columns",
    "echo_updates",
    "fold_parts",
    "fold_windows",
    "ingest_rows",
    "puback_frames",
    "publish_frames",
    "row_updates",
    "split_frames",
    "take_inputs",
]
