"""The plug-in API and the built-in processors, without a broker (the unit runs them over
Mosquitto in test_unit.py)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import BaseModel

from processors.chain import Chain, Item, ProcessorSpec, build_chain, installed
from processors.plugin import Batch, ClosedWindow, Output, Processor, Setup, processor
from streams import InvalidUpdate, RejectReason, SensorUpdate, StreamKey
from streams.registry import Registry
from tests.test_cli import run

T0 = 1_700_006_400_000  # a midnight, UTC
OBJECTS = """\
id: s1
streams: {data: {channels: {t: {type: number}, zone: {type: string}}}}
actions: [{name: cool}]
---
id: s2
streams: {data: {channels: {t: {type: number}, zone: {type: string}}}}
actions: [{name: cool}]
---
id: hub
streams: {status: {channels: {ok: {type: boolean}}}}
"""
S1, S2 = StreamKey("s1", "data"), StreamKey("s2", "data")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    (tmp_path / "objects.yaml").write_text(OBJECTS)
    return Registry.load([tmp_path])


def chain_of(registry: Registry, specs: str) -> tuple[Chain, Registry]:
    parsed = [ProcessorSpec.model_validate(s) for s in yaml.safe_load(textwrap.dedent(specs))]
    chain, extended, problems = build_chain(registry, parsed, "unit.yaml")
    assert problems == []
    return chain, extended


def problems_of(registry: Registry, specs: str) -> list[str]:
    parsed = [ProcessorSpec.model_validate(s) for s in yaml.safe_load(textwrap.dedent(specs))]
    return [str(p) for p in build_chain(registry, parsed, "unit.yaml")[2]]


def su(at: int, /, **channels: Any) -> SensorUpdate:
    return SensorUpdate(channels, at)


def feed(chain: Chain, items: Sequence[tuple[StreamKey, SensorUpdate]]) -> list[tuple[Any, ...]]:
    """Each item in its own batch; what came out, as (so, stream, lastUpdate, channels)."""
    out = []
    for key, update in items:
        result = chain.process([Item(key, update)])
        out += [(i.key.so, i.key.stream, i.update.last_update, i.update.channels)
                for i in result.derived]  # fmt: skip
    return out


def test_the_built_ins_are_installed_plug_ins() -> None:
    assert {"filter", "derive", "window", "threshold", "dedupe", "downsample", "zscore",
            "actuate"} <= set(installed())  # fmt: skip


def test_filter_passes_what_matches(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: filter, from: "s*/data", into: hot, config: {where: "t > 30"}}
    """,
    )
    items = [(S1, su(T0, t=31, zone="a")), (S2, su(T0 + 1, t=30)), (S2, su(T0 + 2, t=40))]
    out = feed(chain, items)
    assert out == [("s1", "hot", T0, {"t": 31, "zone": "a"}), ("s2", "hot", T0 + 2, {"t": 40})]


def test_derive_adds_a_typed_stream_devices_cannot_post_to(registry: Registry) -> None:
    chain, extended = chain_of(
        registry,
        """
        - use: derive
          from: "s1/data"
          into: fahrenheit
          config: {channels: {f: "t * 9 / 5 + 32", warm: "t > 20"}, keep: true}
    """,
    )
    assert feed(chain, [(S1, su(T0, t=25, zone="a"))]) == [
        ("s1", "fahrenheit", T0, {"t": 25, "zone": "a", "f": 77.0, "warm": True})
    ]
    channels = extended.objects["s1"].streams["fahrenheit"].channels
    assert {c: ch.type.value for c, ch in channels.items()} == {
        "f": "number", "warm": "boolean", "t": "number", "zone": "string"}  # fmt: skip
    with pytest.raises(InvalidUpdate) as caught:
        extended.validator("s1", "fahrenheit")
    assert caught.value.reason is RejectReason.DERIVED_STREAM


def test_each_processor_reads_what_the_ones_before_it_produce(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: derive, from: "s*/data", into: f, config: {channels: {f: "t * 9 / 5 + 32"}}}
        - {use: filter, from: "s*/f", into: hot_f, config: {where: "f >= 100"}}
    """,
    )
    out = feed(chain, [(S1, su(T0, t=40)), (S1, su(T0 + 1, t=10))])
    assert out == [("s1", "f", T0, {"f": 104.0}), ("s1", "hot_f", T0, {"f": 104.0}),
                   ("s1", "f", T0 + 1, {"f": 50.0})]  # fmt: skip


def test_window_is_a_flow_as_a_processor(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - use: window
          from: "s*/data"
          into: t_1m
          config: {window: {tumbling: 1m}, aggregates: {mean: avg(t), n: count()}}
    """,
    )
    minute = 60_000
    out = feed(chain, [(S1, su(T0, t=10)), (S1, su(T0 + 10, t=20)), (S2, su(T0 + 5, t=7)),
                       (S1, su(T0 + minute, t=0))])  # fmt: skip
    # each object's clock moves its own windows: s1's minute closes, s2's waits for s2
    assert out == [("s1", "t_1m", T0 + minute - 1, {"mean": 15.0, "n": 2})]
    result = chain.process([Item(S1, su(T0 + 1, t=99), origin="late one")])
    assert [(f.item.origin, f.rejection.reason) for f in result.failed] == [
        ("late one", RejectReason.LATE)
    ]
    assert [i.update.channels for i in chain.flush().derived] == [
        {"mean": 7.0, "n": 1},  # s2's first minute
        {"mean": 0.0, "n": 1},
    ]


def test_threshold_has_hysteresis(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - use: threshold
          from: "s1/data"
          into: alert
          config: {value: t, high: 40, low: 30}
    """,
    )
    values = [10, 39, 40, 35, 31, 30, 29, 41, 39]
    out = feed(chain, [(S1, su(T0 + i, t=v)) for i, v in enumerate(values)])
    assert [(at - T0, ch["active"], ch["value"]) for *_, at, ch in out] == [
        (0, False, 10.0), (2, True, 40.0), (5, False, 30.0), (7, True, 41.0)]  # fmt: skip


def test_threshold_below_for_a_low_level(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: threshold, from: "s1/data", into: low, config:
            {value: t, low: 5, high: 10, direction: below, emit: all}}
    """,
    )
    out = feed(chain, [(S1, su(T0 + i, t=v)) for i, v in enumerate([12, 5, 9, 10, 4])])
    assert [ch["active"] for *_, ch in out] == [False, True, True, False, True]


def test_dedupe_drops_redeliveries_and_repeats(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: dedupe, from: "s*/data", into: once}
        - {use: dedupe, name: new-zone, from: "s*/data", into: zone_changes,
           config: {by: [zone], within: 1m}}
    """,
    )
    items = [(S1, su(T0, t=1, zone="a")), (S1, su(T0, t=1, zone="a")),  # a redelivery
             (S2, su(T0, t=1, zone="a")),  # another stream: not a duplicate
             (S1, su(T0 + 1, t=1, zone="a")),  # a new reading, same zone
             (S1, su(T0 + 61_000, t=2, zone="a"))]  # fmt: skip
    out = [(so, stream, at - T0) for so, stream, at, _ in feed(chain, items)]
    assert out == [("s1", "once", 0), ("s1", "zone_changes", 0), ("s2", "once", 0),
                   ("s2", "zone_changes", 0), ("s1", "once", 1), ("s1", "once", 61_000),
                   ("s1", "zone_changes", 61_000)]  # fmt: skip


def test_downsample_aligned_and_as_a_rate_limit(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: downsample, from: "s1/data", into: per_10s, config: {every: 10s}}
        - {use: downsample, name: limit, from: "s1/data", into: limited,
           config: {every: 10s, align: false}}
    """,
    )
    times = [0, 3_000, 9_999, 10_000, 15_000, 20_500, 31_000]
    out = feed(chain, [(S1, su(T0 + t, t=1)) for t in times])
    assert [(stream, at - T0) for _, stream, at, _ in out] == [
        ("per_10s", 0), ("limited", 0), ("per_10s", 10_000), ("limited", 10_000),
        ("per_10s", 20_500), ("limited", 20_500), ("per_10s", 31_000),
        ("limited", 31_000)]  # fmt: skip


def test_zscore_flags_a_spike(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: zscore, from: "s1/data", into: anomalies,
           config: {value: t, samples: 10, min_samples: 5, threshold: 3}}
    """,
    )
    values = [10, 11, 9, 10, 11, 9, 10, 30, 10]
    out = feed(chain, [(S1, su(T0 + i, t=v)) for i, v in enumerate(values)])
    assert len(out) == 1
    _, _, at, channels = out[0]
    history = [10, 11, 9, 10, 11, 9, 10]
    mean = sum(history) / 7
    std = (sum((x - mean) ** 2 for x in history) / 6) ** 0.5
    assert at == T0 + 7
    assert channels == pytest.approx({"value": 30.0, "mean": mean, "stddev": std,
                                      "zscore": (30 - mean) / std, "anomaly": True})  # fmt: skip


def test_actuate_commands_at_most_once_per_interval(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: actuate, from: "s*/data", config:
            {if: "t > 30", so: "{so}", action: cool, parameters: {minutes: 5}, min_interval: 10m}}
    """,
    )
    commands = []
    for key, at, t in [(S1, 0, 31), (S1, 60_000, 35), (S2, 60_000, 40), (S1, 600_000, 33),
                       (S1, 700_000, 20)]:  # fmt: skip
        commands += chain.process([Item(key, su(T0 + at, t=t))]).actuations
    assert [(c.so, c.action, c.parameters, c.issued_at - T0) for c in commands] == [
        ("s1", "cool", {"minutes": 5}, 0), ("s2", "cool", {"minutes": 5}, 60_000),
        ("s1", "cool", {"minutes": 5}, 600_000)]  # fmt: skip


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ('[{use: nope, from: "s1/data", into: x}]',
         "unit.yaml: processors[0].use: processor 'nope': unknown processor 'nope' (installed:"),
        ('[{use: threshold, from: "s1/data", into: x, config: {value: t, high: 1, low: 2}}]',
         "processors[0].config: processor 'threshold': low (2.0) must not exceed high (1.0)"),
        ('[{use: threshold, from: "s1/data", into: x, config: {value: t, high: 1}}]',
         "processors[0].config.low: processor 'threshold': Field required"),
        ('[{use: filter, from: "s1/data", into: x, config: {where: "temp > 1"}}]',
         "processors[0].config: processor 'filter': on s1/data: unknown channel 'temp'"),
        ('[{use: filter, from: "nothing/*", into: x, config: {where: "t > 1"}}]',
         "processors[0].from: processor 'filter': from nothing/* matches no stream"),
        ('[{use: filter, from: "s1/data", config: {where: "t > 1"}}]',
         "processors[0].into: processor 'filter': needs into"),
        ('[{use: filter, from: "s1/data", into: data, config: {where: "t > 1"}}]',
         "processors[0].into: processor 'filter': into s1/data: the stream already exists"),
        ('[{use: actuate, from: "s1/data", config: {if: "t > 1", so: hub, action: cool}}]',
         "processor 'actuate': on s1/data: 'hub' has no action 'cool'"),
        ('[{use: "json:loads", from: "s1/data", into: x}]',
         "processor 'json:loads': 'json:loads' is not a Processor subclass"),
    ],
)  # fmt: skip
def test_configuration_problems_name_the_field(
    registry: Registry, specs: str, message: str
) -> None:
    problems = problems_of(registry, specs)
    assert len(problems) == 1
    assert message in problems[0]


# plug-ins written against the API ------------------------------------------------------------


class Running(Processor["Running.Config"]):
    """A running total that fails on negative readings."""

    class Config(BaseModel):
        channel: str = "t"

    def setup(self, ctx: Setup) -> None:
        ctx.produces({"total": "number"})
        self.total = 0.0

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            value = update.channels[self.config.channel]
            self.total += value
            if value < 0:
                raise ValueError(f"negative reading {value}")
            out.emit(key, {"total": self.total}, update.last_update)

    def snapshot(self) -> Any:
        return self.total

    def restore(self, state: Any) -> None:
        self.total = state or 0.0


def test_a_failing_update_is_dead_lettered_and_rolled_back(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: "tests.test_processors:Running", from: "s1/data", into: total}
    """,
    )
    batch = [Item(S1, su(T0 + i, t=v), origin=f"m{i}") for i, v in enumerate([1, 2, -5, 3])]
    result = chain.process(batch)
    assert [i.update.channels["total"] for i in result.derived] == [1, 3, 6]
    assert [(f.item.origin, f.rejection.reason, f.rejection.message) for f in result.failed] == [
        ("m2", RejectReason.PROCESSOR_FAILED,
         "s1/data: processor 'tests.test_processors:Running' failed: ValueError: negative"
         " reading -5")]  # fmt: skip
    assert chain.stages[0].counts.failed == 1


class PerMinute(Processor[Any]):
    """Counts per object per minute, through windows the unit keeps."""

    def setup(self, ctx: Setup) -> None:
        ctx.produces({"n": "number", "max": "number"})
        self.windows = ctx.window({"tumbling": "1m"})

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            self.windows.add(key.so, key, update, update.channels["t"])

    def on_window_close(self, closed: Sequence[ClosedWindow], out: Output) -> None:
        for w in closed:
            out.emit(w.key, {"n": len(w.values), "max": max(w.values)}, w.end - 1)


def test_plugin_windows_close_and_survive_a_restart(registry: Registry) -> None:
    spec = """
        - {use: "tests.test_processors:PerMinute", from: "s*/data", into: per_minute}
    """
    times = [0, 20_000, 59_999, 60_000, 61_000, 130_000, 5_000]
    items = [(S1, su(T0 + t, t=i)) for i, t in enumerate(times)]
    whole, _ = chain_of(registry, spec)
    expected = feed(whole, items)
    assert [(at - T0, ch) for *_, at, ch in expected] == [
        (59_999, {"n": 3, "max": 2}), (119_999, {"n": 2, "max": 4})]  # fmt: skip
    first, _ = chain_of(registry, spec)
    part = feed(first, items[:4])
    second, _ = chain_of(registry, spec)
    second.restore(orjson.loads(orjson.dumps(first.snapshot())))
    assert part + feed(second, items[4:-1]) == expected
    late = second.process([Item(*items[-1])])
    assert [f.rejection.reason for f in late.failed] == [RejectReason.LATE]


@processor(produces={"f": "number"})
def fahrenheit(key: StreamKey, update: SensorUpdate) -> dict[str, Any] | None:
    t = update.channels.get("t")
    return None if t is None else {"f": t * 9 / 5 + 32}


def test_a_decorated_function_is_a_processor(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: "tests.test_processors:fahrenheit", from: "s1/data", into: f}
    """,
    )
    assert feed(chain, [(S1, su(T0, t=100)), (S1, su(T0 + 1, zone="a"))]) == [
        ("s1", "f", T0, {"f": 212.0})
    ]


@processor
def renamed(key: StreamKey, update: SensorUpdate) -> dict[str, Any]:
    return {"celsius": update.channels["t"]}  # its output has the input's channels: t, zone


def test_emitting_an_undeclared_channel_is_a_failure_of_that_update(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: "tests.test_processors:renamed", name: bad, from: "s1/data", into: c}
    """,
    )
    result = chain.process([Item(S1, su(T0, t=1))])
    assert [f.rejection.message for f in result.failed] == [
        "s1/data: processor 'bad' failed: ProcessorOutputError: emitted channel 'celsius', which"
        " the output does not declare (it has: t, zone)"
    ]


# flow test --unit ----------------------------------------------------------------------------


def test_flow_test_runs_a_units_processors(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "objects.yaml").write_text(OBJECTS)
    (tmp_path / "unit.yaml").write_text(
        textwrap.dedent("""\
        name: test-unit
        objects: [objects/]
        processors:
          - {use: threshold, from: "s1/data", into: alert, config: {value: t, high: 40, low: 30}}
    """)
    )
    lines = [{"so": "s1", "stream": "data", "update": {"channels": {"t": {"current-value": v}},
                                                       "lastUpdate": T0 + i}}
             for i, v in enumerate([35, 45, 20])]  # fmt: skip
    lines.append({"so": "s1", "stream": "alert", "update": {"channels": {
        "active": {"current-value": True}}, "lastUpdate": T0}})  # fmt: skip
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in lines))
    done = run("flow", "test", "--unit", str(tmp_path / "unit.yaml"), "-i",
               str(tmp_path / "in.jsonl"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [orjson.loads(x) for x in done.stdout.splitlines()]
    assert [(r["kind"], r["stream"], r.get("reason")) for r in records] == [
        ("derived", "alert", None), ("derived", "alert", None), ("derived", "alert", None),
        ("rejected", "alert", "derived_stream")]  # fmt: skip
    assert [r["update"]["channels"]["active"]["current-value"] for r in records[:3]] == [
        False, True, False]  # fmt: skip


class Unsaveable(Processor[Any]):
    """Keeps a set once it has seen a zone: not plain data."""

    def setup(self, ctx: Setup) -> None:
        self.zones: list[str] | set[str] = []

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            if "zone" in update.channels:
                self.zones = {*self.zones, update.channels["zone"]}  # type: ignore[misc]
            out.emit(key, update.channels, update.last_update)

    def snapshot(self) -> Any:
        return self.zones


def test_state_that_cannot_be_saved_fails_updates_not_the_unit(registry: Registry) -> None:
    chain, _ = chain_of(
        registry,
        """
        - {use: "tests.test_processors:Unsaveable", name: keeper, from: "s1/data", into: copy}
    """,
    )
    first = chain.process([Item(S1, su(T0, t=1, zone="a"))])
    assert len(first.derived) == 1  # its state went bad after this batch
    good = chain.snapshot()  # the checkpoint keeps the last good state
    second = chain.process([Item(S1, su(T0 + 1, t=2), origin="m2")])
    assert [(f.item.origin, f.rejection.reason) for f in second.failed] == [
        ("m2", RejectReason.PROCESSOR_FAILED)
    ]
    assert "its state cannot be saved" in second.failed[0].rejection.message
    assert good == chain.snapshot() == {"keeper": {"state": [], "windows": []}}


class _DedupeSpec:
    """The dedupe as first written (a dict per stream, oldest first): the specification the
    undo-logged one must match."""

    def __init__(self, within: int, max_entries: int) -> None:
        self.within, self.max_entries = within, max_entries
        self.seen: dict[str, dict[str, int]] = {}

    def passes(self, stream: str, fp: str, t: int) -> bool:
        seen = self.seen.setdefault(stream, {})
        last = seen.get(fp)
        if last is not None and abs(t - last) <= self.within:
            return False
        seen.pop(fp, None)
        seen[fp] = t
        horizon = t - self.within
        while seen and (len(seen) > self.max_entries or next(iter(seen.values())) < horizon):
            del seen[next(iter(seen))]
        return True


@pytest.mark.parametrize("seed", range(8))
def test_dedupe_keeps_its_own_undo_log_and_matches_its_specification(
    registry: Registry, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    within, max_entries = rng.choice([0, 5, 50]), rng.choice([1, 3, 20])
    chain, _ = chain_of(registry, f"""
        - {{use: dedupe, from: "s*/data", into: once,
           config: {{by: [zone], within: {within}, max_entries: {max_entries}}}}}
    """)  # fmt: skip
    stage = chain.stages[0]
    dedupe: Any = stage.processor
    spec = _DedupeSpec(within, max_entries)
    for _ in range(40):
        batch = [(rng.choice([S1, S2]), su(T0 + rng.randrange(200), t=1,
                                           zone=rng.choice("abcdef")))
                 for _ in range(rng.randrange(1, 30))]  # fmt: skip
        before = dedupe.snapshot()
        if rng.random() < 0.3:  # a batch undone: the state is exactly what it was
            assert dedupe.begin()
            dedupe.process(batch, stage.output())
            dedupe.rollback()
            assert [(k, list(v.items())) for k, v in dedupe.snapshot().items()] == [
                (k, list(v.items())) for k, v in before.items()
            ]
        got = [(so, at) for so, _s, at, _ in feed(chain, batch)]
        want = [
            (k.so, u.last_update)
            for k, u in batch
            if spec.passes(f"{k.so}/{k.stream}", dedupe._fingerprint(u), u.last_update)
        ]
        assert got == want
        ordered = {k: list(v.items()) for k, v in spec.seen.items()}
        assert {k: list(v.items()) for k, v in dedupe.snapshot().items()} == ordered
    restored = chain_of(registry, f"""
        - {{use: dedupe, from: "s*/data", into: once,
           config: {{by: [zone], within: {within}, max_entries: {max_entries}}}}}
    """)[0]  # fmt: skip
    restored.restore(chain.snapshot())
    assert restored.stages[0].processor.snapshot() == spec.seen


def test_a_window_processor_undoes_a_failed_batch_through_its_engine(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window (a flow engine inside) keeps no copy of its state per batch: the engine's
    transaction undoes what a failing batch changed, and the chain retries the updates one at
    a time; the windows end as in a run without the poison update."""
    spec = """
        - use: window
          from: "s*/data"
          into: t_1m
          config: {window: {tumbling: 1m}, aggregates: {mean: avg(t), n: count()}}
    """
    chain, reference = chain_of(registry, spec)[0], chain_of(registry, spec)[0]
    window: Any = chain.stages[0].processor
    assert window.begin() is True
    window.commit()
    copies: list[Any] = []
    monkeypatch.setattr(window, "snapshot", lambda: copies.append(1) or window.engine.snapshot())
    real = window.engine.process

    def poisoned(batch: Any) -> Any:
        out = real(batch)  # the windows changed, then the bug
        if any(u.channels.get("t") == 666 for _, u in batch):
            raise RuntimeError("a bug in the window")
        return out

    monkeypatch.setattr(window.engine, "process", poisoned)
    items = [(S1 if i % 2 else S2, su(T0 + i * 7_000, t=i)) for i in range(40)]
    poison = (S1, su(T0 + 100_000, t=666))
    batch = [Item(k, u, origin=i) for i, (k, u) in enumerate(items)]
    result = chain.process([*batch[:20], Item(*poison, origin="poison"), *batch[20:]])
    assert [(f.item.origin, f.rejection.reason) for f in result.failed] == [
        ("poison", RejectReason.PROCESSOR_FAILED)
    ]
    assert copies == []  # never copied through snapshot()
    expected = reference.process([Item(k, u) for k, u in items])
    assert [(i.key, i.update) for i in result.derived] == [
        (i.key, i.update) for i in expected.derived
    ]
    assert window.engine.snapshot() == reference.stages[0].processor.engine.snapshot()  # type: ignore[attr-defined]


class BatchMean(Processor[Any]):
    """Reads its batch by column: the mean of t over each stream's updates in the batch."""

    def setup(self, ctx: Setup) -> None:
        ctx.produces({"mean": "number", "n": "number"})

    def process(self, batch: Batch, out: Output) -> None:
        columns = batch.columns("t", "nope")
        assert columns.values["nope"] == [None] * len(batch)
        sums: dict[StreamKey, list[float]] = {}
        for key, t, value in zip(columns.keys, columns.times, columns.values["t"], strict=True):
            if value is not None:
                got = sums.setdefault(key, [0.0, 0, 0])
                got[0] += value
                got[1] += 1
                got[2] = max(got[2], t)
        for key, (total, n, at) in sums.items():
            out.emit(key, {"mean": total / n, "n": n}, at)


def test_a_processor_may_read_its_batch_by_column(registry: Registry) -> None:
    """`Batch.columns`: each update's stream and time, and the values of the channels asked
    for (None where an update lacks one), in the batch's order."""
    chain, _ = chain_of(
        registry,
        """
        - {use: "tests.test_processors:BatchMean", from: "s*/data", into: mean}
    """,
    )
    batch = [Item(S1, su(T0, t=1.0)), Item(S2, su(T0 + 1, t=10)), Item(S1, su(T0 + 2, t=2.0)),
             Item(S1, su(T0 + 3, zone="a"))]  # fmt: skip
    result = chain.process(batch)
    derived = [(i.key.so, i.key.stream, i.update.last_update, i.update.channels)
               for i in result.derived]  # fmt: skip
    assert derived == [("s1", "mean", T0 + 2, {"mean": 1.5, "n": 2}),
                       ("s2", "mean", T0 + 1, {"mean": 10.0, "n": 1})]  # fmt: skip
    columns = Batch([(S1, su(T0, t=1.0, zone="a")), (S2, su(T0 + 5, zone="b"))]).columns("zone")
    assert (columns.keys, list(columns.times), columns.values) == (
        [S1, S2], [T0, T0 + 5], {"zone": ["a", "b"]})  # fmt: skip
