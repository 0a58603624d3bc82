"""The benchmark suite's workload (100 sensors, one flow: `where: t > -50`, a 1-minute
tumbling average per object) and its in-process scenarios: the unit's Ingest and FlowEngine,
the columnar kernel and the window kernel, each compiled beside its pure-Python twin."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from processors.engine import engine_of
from processors.ingest import Ingest, RawMessage
from streams import SensorUpdate, StreamKey, encode_update
from streams.catalog import Catalog
from streams.codec import encode_batch

T0 = 1_700_006_400_000
SENSORS = 100
FLOW = """\
flows:
  minute-average:
    from: "sensor-*/data"
    where: "t > -50"
    window: {tumbling: 1m}
    aggregates: {t: avg(t), n: count()}
    into: "{so}/t_1m"
"""

# the same flow written with expressions the column-expression kernel evaluates over columns
DERIVED_FLOW = """\
flows:
  minute-average:
    from: "sensor-*/data"
    where: "t * 1.8 + 32 > -58 and t < 1000"
    window: {tumbling: 1m}
    aggregates: {f: avg(t * 1.8 + 32), spread: max(abs(t - 21)), n: count()}
    into: "{so}/t_1m"
"""


# a composite stream per object (ServIoTicy's way of deriving a value), beside the flow
COMPOSITE = ", fahrenheit: {channels: {f: {type: number, current-value: 'data.t * 1.8 + 32'}}}"


def objects(directory: Path, flow: str = FLOW, composite: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    extra = COMPOSITE if composite else ""
    docs = [
        f"id: sensor-{i}\nstreams: {{data: {{channels: {{t: {{type: number}}}}}}{extra}}}\n"
        for i in range(SENSORS)
    ]
    (directory / "sensors.yaml").write_text("---\n".join(docs))
    (directory / "bench.flows.yaml").write_text(flow)
    return directory


def readings(n: int) -> list[tuple[StreamKey, SensorUpdate]]:
    return [
        (
            StreamKey(f"sensor-{i % SENSORS}", "data"),
            SensorUpdate({"t": 20.0 + (i % 17) * 0.5}, T0 + (i // SENSORS) * 1000),
        )
        for i in range(n)
    ]


def payloads(
    data: list[tuple[StreamKey, SensorUpdate]], per_message: int
) -> list[tuple[str, bytes]]:
    """Device messages of `per_message` readings (columnar form when more than one)."""
    if per_message == 1:
        return [(f"{k.so}/streams/{k.stream}", encode_update(u)) for k, u in data]
    payloads = []
    for i in range(0, len(data), per_message):
        chunk = data[i : i + per_message]
        key = chunk[0][0]
        body = encode_batch([u for _, u in chunk], columnar=True)
        payloads.append((f"{key.so}/streams/{key.stream}", body))
    return payloads


# 1. kernel -------------------------------------------------------------------------------------


@contextlib.contextmanager
def twins() -> Iterator[None]:
    """Every kernel swapped for its pure-Python twin (what CLOUDLET_NO_EXTENSIONS=1 runs)."""
    from streams import kernels
    from streams.kernels import _columnar_py, _inputs_py, _vector_py, _windows_py

    names = {
        "derive_columns": _vector_py.derive_columns,
        "column_inputs": _inputs_py.column_inputs,
        "take_inputs": _inputs_py.take_inputs,
        "fold_parts": _inputs_py.fold_parts,
        "ingest_rows": _columnar_py.ingest_rows,
        "row_updates": _columnar_py.row_updates,
        "columnar_updates": _columnar_py.columnar_updates,
        "columnar_fits": _columnar_py.columnar_fits,
        "fold_windows": _windows_py.fold_windows,
        "KeyState": _windows_py.KeyState,
    }
    saved = {name: getattr(kernels, name) for name in names}
    for name, twin in names.items():
        setattr(kernels, name, twin)
    try:
        yield
    finally:
        for name, compiled in saved.items():
            setattr(kernels, name, compiled)


@contextlib.contextmanager
def expressions() -> Iterator[None]:
    """The compiled kernels, but a derived flow's expressions evaluated update by update (as
    before the column-expression kernel): every run handed back to the row path."""
    from streams import kernels

    saved = kernels.derive_columns
    kernels.derive_columns = lambda *args: None
    try:
        yield
    finally:
        kernels.derive_columns = saved


def kernel(work: Path, n: int, per_message: int, variant: str = "plain") -> dict[str, Any]:
    """The unit's Ingest and FlowEngine over batches of 1000 messages, compiled and twins
    (the best of three passes each), with the garbage collector tuned as `cloudlet unit run`
    tunes it. Variants: "derived flow" (the flow's `where` and arguments are expressions) and
    "composite" (a composite stream per object besides); their reference is the compiled
    kernels with the expressions evaluated update by update (the twins in the note)."""
    from processors.unit import tune_gc
    from streams import kernels

    tune_gc()

    derived_flow = variant != "plain"
    folder = work / variant.replace(" ", "-")
    flow = DERIVED_FLOW if variant == "derived flow" else FLOW
    catalog = Catalog.load([objects(folder, flow, composite=variant == "composite")])
    messages = [RawMessage(t, p) for t, p in payloads(readings(n), per_message)]
    started = time.perf_counter()
    for m in messages:
        orjson.loads(m.payload)
    floor = n / (time.perf_counter() - started)
    rates: dict[str, float] = {}
    derived: dict[str, int] = {}
    names = ("compiled", "expressions", "twin") if derived_flow else ("compiled", "twin")
    for name in names:
        modes = {"twin": twins, "expressions": expressions}
        with modes[name]() if name in modes else contextlib.nullcontext():
            for _ in range(3):  # the best of three passes, each from a fresh unit's state
                ingest = Ingest(catalog.registry)
                engine = engine_of(catalog, clock=lambda: 0.0)
                started = time.perf_counter()
                out = 0
                for i in range(0, len(messages), 1000):
                    batch = ingest.batch(messages[i : i + 1000]).accepted
                    out += len(engine.process(batch).derived)
                rates[name] = max(rates.get(name, 0.0), n / (time.perf_counter() - started))
                derived[name] = out
    assert derived["compiled"] == derived["twin"], derived
    if derived_flow:
        assert derived["compiled"] == derived["expressions"], derived
        what = ("as kernel; where and avg of t * 1.8 + 32, max of abs(t - 21)"
                if variant == "derived flow" else
                "as kernel; and a composite stream per object, f = data.t * 1.8 + 32")  # fmt: skip
        return {
            "scenario": f"kernel, {variant} ({per_message} per message)",
            "what": what,
            "ours": rates["compiled"],
            "reference": rates["expressions"],
            "reference_is": "the same, expressions update by update",
            "unit": "readings/s",
            "ratio": rates["compiled"] / rates["expressions"],
            "note": f"twins {rates['twin']:,.0f}/s ({rates['compiled'] / rates['twin']:.1f}x);"
            f" {derived['compiled']} results",
        }
    return {
        "scenario": f"kernel ({per_message} per message)",
        "what": "decode+validate+filter+1m avg by object",
        "ours": rates["compiled"],
        "reference": rates["twin"],
        "reference_is": "the pure-Python twins",
        "unit": "readings/s",
        "ratio": rates["compiled"] / rates["twin"],
        "note": f"compiled={kernels.COMPILED}; orjson.loads alone {floor:,.0f}/s;"
        f" {derived['compiled']} window results",
    }


def columnar(n: int) -> dict[str, Any]:
    """The columnar kernel: validating 100-reading batches, compiled vs its pure twin."""
    from streams import kernels
    from streams.kernels import _columnar_py
    from streams.objects import Stream
    from streams.updates import StreamValidator

    stream = Stream.model_validate(
        {"channels": {"t": {"type": "number"}, "ok": {"type": "boolean"}}}
    )
    validator = StreamValidator("s1", "data", stream)
    docs = [
        {
            "lastUpdate": [T0 + b * 100 + i for i in range(100)],
            "channels": {
                "t": [20.0 + i * 0.1 for i in range(100)],
                "ok": [i % 2 == 0 for i in range(100)],
            },
        }
        for b in range(n // 100)
    ]
    rates = {}
    compiled = kernels.columnar_updates
    for name, kernel in (("compiled", compiled), ("twin", _columnar_py.columnar_updates)):
        kernels.columnar_updates = kernel
        try:
            started = time.perf_counter()
            for doc in docs:
                validator.document(doc)
            rates[name] = n / (time.perf_counter() - started)
        finally:
            kernels.columnar_updates = compiled
    return {
        "scenario": "columnar kernel (validate 100-reading batches)",
        "ours": rates["compiled"],
        "reference": rates["twin"],
        "reference_is": "its pure-Python twin",
        "unit": "readings/s",
        "ratio": rates["compiled"] / rates["twin"],
        "note": f"compiled={kernels.COMPILED}",
    }


def windows(n: int) -> dict[str, Any]:
    """The window kernel alone: avg + count over 1-minute tumbling windows of 100 keys."""
    from processors.engine.windows import WindowOperator
    from streams import kernels
    from streams.kernels import _windows_py
    from streams.windows.aggregates import AGGREGATES
    from streams.windows.model import Windowing

    groups = [f"sensor-{i % SENSORS}" for i in range(n)]
    times = [T0 + (i // SENSORS) * 1000 for i in range(n)]
    args = [[20.0 + (i % 17) * 0.5, True] for i in range(n)]
    rates = {}
    for name, fold in (("compiled", kernels.fold_windows), ("twin", _windows_py.fold_windows)):
        aggregates = [("t", AGGREGATES["avg"]), ("n", AGGREGATES["count"])]
        operator = WindowOperator(Windowing("tumbling", 60_000), aggregates)
        started = time.perf_counter()
        for i in range(0, n, 100_000):
            fold(operator, groups[i : i + 100_000], times[i : i + 100_000], args[i : i + 100_000])
        rates[name] = n / (time.perf_counter() - started)
    return {
        "scenario": "window kernel (fold_windows, avg + count, 100 keys)",
        "ours": rates["compiled"],
        "reference": rates["twin"],
        "reference_is": "its pure-Python twin",
        "unit": "updates/s",
        "ratio": rates["compiled"] / rates["twin"],
        "note": f"compiled={kernels.COMPILED}",
    }
