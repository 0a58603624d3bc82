"""The compiled kernels: loaded when they should be, and the same outputs as their pure-Python
twins (and as the row-by-row path they replace) on random batches."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streams import InvalidUpdate, SensorUpdate, kernels
from streams.kernels import _columnar_py
from streams.objects import Stream
from streams.updates import StreamValidator

STREAM = Stream.model_validate({"channels": {
    "t": {"type": "number"}, "label": {"type": "string"}, "on": {"type": "boolean"},
}})  # fmt: skip
T0 = 1_700_006_400_000


def test_the_compiled_kernels_are_in_use_unless_turned_off() -> None:
    if os.environ.get("CLOUDLET_NO_EXTENSIONS") == "1":
        assert not kernels.COMPILED
        assert kernels.columnar_updates is _columnar_py.columnar_updates
        assert kernels.row_updates is _columnar_py.row_updates
        assert kernels.fold_windows.__module__ == "streams.kernels._windows_py"
    else:
        assert kernels.COMPILED, "the compiled kernels did not load: pip install -e . failed?"
        assert kernels.columnar_updates.__module__ == "streams.kernels._columnar"
        assert kernels.row_updates.__module__ == "streams.kernels._columnar"
        assert kernels.split_frames.__module__ == "streams.kernels._frames"
        assert kernels.fold_windows.__module__ == "streams.kernels._windows"


values = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
)  # fmt: skip
times = st.one_of(
    st.integers(T0, T0 + 10**9), st.integers(0, 2 * 10**9), st.floats(0, 2e12),
    st.just(10**18), st.text(max_size=3), st.none(),
)  # fmt: skip


@st.composite
def batches(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(0, 12))
    names = draw(st.lists(st.sampled_from(["t", "label", "on", "x"]), min_size=1, max_size=3,
                          unique=True))  # fmt: skip
    typed = {"t": st.one_of(st.floats(-1e6, 1e6), st.integers(-100, 100)),
             "label": st.text(max_size=4), "on": st.booleans(), "x": values}  # fmt: skip
    column = {name: draw(st.lists(st.one_of(typed[name], values), min_size=n, max_size=n))
              for name in names}  # fmt: skip
    return {"lastUpdate": draw(st.lists(st.one_of(st.integers(T0, T0 + 10**6), times),
                                        min_size=n, max_size=n)), "channels": column}  # fmt: skip


def _row_path(validator: StreamValidator, doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    rows = [{"lastUpdate": t,
             "channels": {n: {"current-value": c[i]} for n, c in doc["channels"].items()}}
            for i, t in enumerate(doc["lastUpdate"])]  # fmt: skip
    return validator._each(enumerate(rows))


@settings(max_examples=400, deadline=None)
@given(batches())
def test_compiled_twin_and_row_path_agree(doc: dict[str, Any]) -> None:
    validator = StreamValidator("s1", "data", STREAM)
    compiled = validator.document(doc)
    names = list(doc["channels"])
    if all(n in validator._kinds for n in names):
        twin = _columnar_py.columnar_updates(
            doc["lastUpdate"], names, list(doc["channels"].values()),
            [validator._kinds[n] for n in names], SensorUpdate,
            lambda i: validator.update(validator._row(doc["lastUpdate"], names,
                                                      list(doc["channels"].values()), i), i),
            InvalidUpdate,
        )  # fmt: skip
        assert compiled == twin
    assert compiled == _row_path(validator, doc)


channel_entries = st.one_of(
    st.builds(lambda v: {"current-value": v}, st.one_of(values, st.floats(-1e6, 1e6))),
    st.builds(lambda v: {"current-value": v, "unit": "C"}, st.integers(-5, 5)),
    st.just({}), st.none(), st.integers(),
)  # fmt: skip
row_docs = st.one_of(
    st.fixed_dictionaries({
        "lastUpdate": st.one_of(st.integers(T0, T0 + 10**6), times),
        "channels": st.dictionaries(st.sampled_from(["t", "label", "on", "x"]), channel_entries,
                                    max_size=3),
    }),
    st.fixed_dictionaries({"lastUpdate": st.integers(T0, T0 + 10), "channels": st.just({}),
                           "extra": st.just(1)}),
    values, st.lists(st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(row_docs, max_size=8))
def test_row_kernel_compiled_twin_and_validator_agree(docs: list[Any]) -> None:
    """A document the row kernel takes gives the validator's SensorUpdate; the others are left
    to the validator (None), the same in both implementations."""
    validator = StreamValidator("s1", "data", STREAM)
    kinds = [validator.kinds] * len(docs)
    twin = _columnar_py.row_updates(docs, kinds, SensorUpdate)
    assert kernels.row_updates(docs, kinds, SensorUpdate) == twin
    for doc, fast in zip(docs, twin, strict=True):
        if fast is not None:
            assert validator.document(doc) == ([fast], [])
