"""Compiled kernels and their pure-Python twins, chosen here and nowhere else.

Each kernel has one signature and two implementations: `_<name>.pyx` (Cython, built by
`pip install`) and `_<name>_py.py`, which is the specification and the fallback.
`CLOUDLET_NO_EXTENSIONS=1` forces pure Python; if the compiled module is missing otherwise, the
import says so loudly (a warning on every start, and `COMPILED` is False), and
`CLOUDLET_REQUIRE_EXTENSIONS=1` turns that into an error (the test command sets it).
"""

from __future__ import annotations

import os
import warnings

from streams.kernels import _columnar_py

NO_EXTENSIONS = os.environ.get("CLOUDLET_NO_EXTENSIONS") == "1"
COMPILED = False
columnar_updates = _columnar_py.columnar_updates

if not NO_EXTENSIONS:
    try:
        from streams.kernels import _columnar  # type: ignore[attr-defined]
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
            stacklevel=2,
        )
    else:
        columnar_updates = _columnar.columnar_updates
        COMPILED = True

__all__ = ["COMPILED", "NO_EXTENSIONS", "columnar_updates"]
