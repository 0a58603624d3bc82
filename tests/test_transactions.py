"""State with a contract: the window operators, the composite streams, the flow engine and the
unit's batches commit or roll back as a whole, without copying all state; a rolled-back batch
leaves exactly what a run that never saw it leaves; and a bug on one message of a batch costs
that message only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudlet.demo import scenario_dir
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.chain import Item
from processors.engine import engine_of
from processors.engine.flows import FlowEngine, FlowResult
from processors.engine.windows import WindowOperator
from processors.ingest import Ingest, RawMessage
from processors.runtime import UnitRuntime
from processors.undo import TransactionalDict
from streams import RejectReason, SensorUpdate, StreamKey, kernels
from streams.catalog import Catalog
from streams.codec import encode_update
from streams.registry import Registry
from streams.transport.mqtt import MqttSettings
from streams.windows.aggregates import AGGREGATES, percentile_aggregate
from streams.windows.model import Windowing
from tests.test_flows import FOLDED, T0, _catalog, numbers, su
from tests.test_processors import OBJECTS, S1, S2, PerMinute, chain_of

IRRIGATION = scenario_dir("irrigation")
AGGS = [("n", AGGREGATES["count"]), ("avg", AGGREGATES["avg"]), ("sum", AGGREGATES["sum"]),
        ("p50", percentile_aggregate(50)), ("sd", AGGREGATES["stddev"]),
        ("rate", AGGREGATES["rate"]), ("last", AGGREGATES["last"])]  # fmt: skip
SPECS = [
    Windowing("tumbling", 10_000, allowed_lateness=5_000),
    Windowing("tumbling", 10_000, delay=3_000, emit_empty=True),
    Windowing("hopping", 20_000, hop=5_000),
    Windowing("sliding", 10_000, allowed_lateness=2_000),
    Windowing("session", 0, gap=3_000),
    Windowing("count", 3, hop=2),
    Windowing("tumbling", 5_000, idle=4_000),
    Windowing("tumbling", 5_000, processing_time=True),
]
_batches = st.lists(
    st.tuples(
        st.booleans(),  # roll this batch back
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c"]), st.integers(0, 60_000), st.integers(-50, 50)
            ),
            max_size=12,
        ),
    ),
    max_size=12,
)


def _feed(op: WindowOperator, batch: list[tuple[str, int, int]], now: int) -> list[Any]:
    out: list[Any] = []
    for key, t, v in batch:
        out.append(op.process(key, t, [True, v, v, v, v, v, v]))
    out.append(op.advance(now))
    out.append(op.fire_idle(now))
    return out


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.kind}{'-pt' if s.processing_time else ''}"
)
@settings(max_examples=120, deadline=None)
@given(batches=_batches)
def test_a_rolled_back_batch_leaves_the_operator_as_if_it_never_came(
    spec: Windowing, batches: list[tuple[bool, list[tuple[str, int, int]]]]
) -> None:
    txn, reference = WindowOperator(spec, AGGS), WindowOperator(spec, AGGS)
    for i, (undo, batch) in enumerate(batches):
        now = i * 7_000
        txn.begin()
        got = _feed(txn, batch, now)
        if undo:
            txn.rollback()
            assert txn.snapshot() == reference.snapshot()
            continue
        txn.commit()
        assert got == _feed(reference, batch, now)
    assert txn.snapshot() == reference.snapshot()
    assert txn.flush() == reference.flush()


def _outcome(r: FlowResult) -> Any:
    late = [(x.key, x.update, x.rejection) for x in r.late]
    acts = [(a.so, a.action, a.parameters) for a in r.actuations]
    return (r.derived, r.derived_at, late, r.late_at, r.rejected, r.rejected_at, acts)


def _run_both(
    txn: FlowEngine, reference: FlowEngine,
    batches: list[tuple[bool, list[tuple[StreamKey, SensorUpdate]]]],
) -> None:  # fmt: skip
    for undo, batch in batches:
        txn.begin()
        got = txn.process(batch)
        if undo:
            txn.rollback()
            assert txn.snapshot() == reference.snapshot()
            continue
        txn.commit()
        assert _outcome(got) == _outcome(reference.process(batch))
    assert txn.snapshot() == reference.snapshot()
    assert _outcome(txn.flush()) == _outcome(reference.flush())


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2"]),
            st.integers(0, 120_000),
            st.one_of(numbers, st.none()),
            st.sampled_from(["a", "b"]),
        ),
        max_size=60,
    ),
    undo=st.lists(st.booleans(), min_size=12, max_size=12),
    folded=st.booleans(),
)
def test_the_flow_engine_rolls_back_folded_and_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[tuple[str, int, Any, str]], undo: list[bool], folded: bool,
) -> None:  # fmt: skip
    """Both ways a batch goes through the windows (kernels.fold_windows on whole batches, and
    update by update) save what they change."""
    catalog, problems = _catalog(tmp_path_factory.mktemp("txn"),
                                 FOLDED % {"delay": "3s", "lateness": "15s"})  # fmt: skip
    assert problems == []
    updates = [(StreamKey(so, "data"), su(T0 + t, **({"t": v} if v is not None else {}), zone=z))
               for so, t, v, z in events]  # fmt: skip
    txn, reference = engine_of(catalog, clock=lambda: 0.0), engine_of(catalog, clock=lambda: 0.0)
    if not folded:
        for node in [*txn.windows.values(), *reference.windows.values()]:
            node.fold = False
    batches = [(undo[i // 5], updates[i : i + 5]) for i in range(0, len(updates), 5)]
    _run_both(txn, reference, batches)


def test_composite_streams_and_rules_roll_back_too() -> None:
    """The irrigation site: latest values, composite streams (`irrigate`), windows and the
    rule's last command, batch after batch, every other batch rolled back."""
    site = IrrigationSite.load(IRRIGATION / "site.yaml")
    model = IrrigationModel(site, seed=5, start_ms=T0)
    readings = [r for _ in range(180) for r in model.step(60)]
    catalog = Catalog.load([IRRIGATION / "objects"])
    txn, reference = engine_of(catalog, clock=lambda: 0.0), engine_of(catalog, clock=lambda: 0.0)
    batches = [(i % 20 == 10, readings[i : i + 37]) for i in range(0, len(readings), 37)]
    # the batches rolled back are sent again, as a unit would, so the results stay complete
    replayed = [b for undo, batch in batches for b in ([(True, batch), (False, batch)] if undo
                                                       else [(False, batch)])]  # fmt: skip
    _run_both(txn, reference, replayed)
    assert txn.last_command  # the rule fired (and its rolled-back firings were undone)
    assert txn.composite.counts == reference.composite.counts


def _messages(readings: list[tuple[StreamKey, SensorUpdate]]) -> list[RawMessage]:
    return [RawMessage(f"{k.so}/streams/{k.stream}", encode_update(u), "application/json")
            for k, u in readings]  # fmt: skip


def test_a_bug_on_one_message_of_a_batch_costs_that_message_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = IrrigationSite.load(IRRIGATION / "site.yaml")
    model = IrrigationModel(site, seed=9, start_ms=T0)
    readings = [r for _ in range(40) for r in model.step(60)]
    soil2 = StreamKey("field-2-soil", "soil")
    poison_at = next(i for i, (k, _) in enumerate(readings) if k == soil2 and i > 150)
    poison_time = readings[poison_at][1].last_update
    catalog = Catalog.load([IRRIGATION / "objects"])
    runtime = UnitRuntime(Ingest(catalog.registry), MqttSettings(url="mqtt://127.0.0.1:1"),
                          client_id="u-txn",
                          engine=engine_of(catalog, clock=lambda: 0.0))  # fmt: skip
    engine = runtime.engine
    assert engine is not None
    operator = engine.operators["soil-moisture-10min"]
    engine.windows["soil-moisture-10min"].fold = False  # update by update: through `process`
    real = operator.process

    def buggy(key: str, t: int, args: Any) -> Any:
        out = real(key, t, args)  # the state changed, then the bug: the batch must roll back
        if key == "field-2-soil" and t == poison_time:
            raise ZeroDivisionError("a bug of ours")
        return out

    monkeypatch.setattr(operator, "process", buggy)
    messages = _messages(readings)
    bad = RawMessage("field-1-soil/streams/soil", b'{"channels": 1}', "application/json")
    messages.insert(5, bad)  # an ordinary rejection in a batch that is run twice
    outputs = [runtime._process(messages[i : i + 100]) for i in range(0, len(messages), 100)]

    letters = [orjson.loads(x.body) for _, out in outputs for x in out.dead_letters]
    poison = messages[poison_at + 1]  # after `bad`
    assert [(x["reason"], x["payload"]) for x in letters] == [
        ("missing_last_update", '{"channels": 1}'),
        ("internal_error", poison.payload.decode()),
    ]
    assert letters[1]["message"] == (
        "field-2-soil/soil: the message could not be handled (ZeroDivisionError: a bug of ours)"
    )
    accepted = [u for result, _ in outputs for u in result.accepted]
    expected = readings[:poison_at] + readings[poison_at + 1 :]
    assert accepted == expected
    # the state, the derived updates and the counts are those of a run without the poison
    reference = engine_of(catalog, clock=lambda: 0.0)
    derived = [d for i in range(0, len(expected), 100)
               for d in reference.process(expected[i : i + 100]).derived]  # fmt: skip
    assert engine.snapshot() == reference.snapshot()
    assert [d for _, out in outputs for d in out.derived] == derived
    assert runtime.ingest.counts.messages == len(messages) - 1  # the poison: never counted
    assert runtime.ingest.counts.accepted == len(expected)


def test_a_single_failing_message_is_dead_lettered_with_its_payload() -> None:
    catalog = Catalog.load([IRRIGATION / "objects"])
    runtime = UnitRuntime(Ingest(catalog.registry), MqttSettings(url="mqtt://127.0.0.1:1"),
                          client_id="u-txn1",
                          engine=engine_of(catalog, clock=lambda: 0.0))  # fmt: skip
    assert runtime.engine is not None
    runtime.engine.process = lambda batch: (_ for _ in ()).throw(RuntimeError("flow bug"))  # type: ignore[method-assign]
    message = _messages([(StreamKey("field-1-soil", "soil"), su(T0, moisture=20.0,
                                                                  temperature=15.0))])  # fmt: skip
    result, out = runtime._process(message)
    assert result.accepted == [] and out.updates == []
    letters = [orjson.loads(x.body) for x in out.dead_letters]
    assert [(x["reason"], x["message"], x["payload"]) for x in letters] == [
        (
            "internal_error",
            "field-1-soil/soil: the message could not be handled (RuntimeError: flow bug)",
            message[0].payload.decode(),
        )
    ]


class PerMinuteUndone(PerMinute):
    """`PerMinute`, whose only state is its windows: it undoes a batch without a copy."""

    def begin(self) -> bool:
        return True


STAGES = {
    "threshold": "{use: threshold, from: 's*/data', into: alert,"
    " config: {value: t, high: 20, low: -20}}",
    "downsample": "{use: downsample, from: 's*/data', into: sampled, config: {every: 7s}}",
    "rate-limit": "{use: downsample, from: 's*/data', into: sampled,"
    " config: {every: 7s, align: false}}",
    "zscore": "{use: zscore, from: 's*/data', into: odd,"
    " config: {value: t, samples: 5, min_samples: 3, threshold: 1.5, emit: all}}",
    "dedupe": "{use: dedupe, from: 's*/data', into: once,"
    " config: {by: [zone], within: 20s, max_entries: 4}}",
    "plugin-windows": "{use: 'tests.test_transactions:PerMinuteUndone', from: 's*/data',"
    " into: per_minute}",
}
_readings = st.lists(
    st.tuples(
        st.sampled_from([S1, S2]),
        st.integers(0, 300_000),
        st.integers(-40, 40),
        st.sampled_from(["a", "a", "b", "c", "poison"]),
    ),
    max_size=15,
)


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(_readings, max_size=10))
def test_processors_undo_a_failed_batch_without_copying_their_state(
    tmp_path_factory: pytest.TempPathFactory, stage: str,
    batches: list[list[tuple[StreamKey, int, int, str]]],
) -> None:  # fmt: skip
    """A processor that fails on one update of a batch (after changing its state) costs that
    update only: the batch is undone by the processor's own log, never a copy of its state,
    and the state and outputs end as in a run that never saw the poison."""
    directory = tmp_path_factory.mktemp("objects")
    (directory / "objects.yaml").write_text(OBJECTS)
    registry = Registry.load([directory])
    txn, reference = (chain_of(registry, f"- {STAGES[stage]}")[0] for _ in range(2))
    copies: list[int] = []
    save = txn.stages[0].save
    txn.stages[0].save = lambda: copies.append(1) or save()  # type: ignore[method-assign]
    processor: Any = txn.stages[0].processor
    process = processor.process

    def poisoned(batch: Any, out: Any) -> None:
        process(batch, out)  # the state changed, then the bug
        if any(u.channels["zone"] == "poison" for _, u in batch):
            raise RuntimeError("poison")

    processor.process = poisoned

    def shown(items: list[Item]) -> list[str]:
        return sorted(repr((i.key, i.update)) for i in items)

    for readings in batches:
        items = [Item(k, su(T0 + t, t=v, zone=z)) for k, t, v, z in readings]
        got = txn.process(items)
        want = reference.process([i for i in items if i.update.channels["zone"] != "poison"])
        assert shown(got.derived) == shown(want.derived)
        failed = [f.item for f in got.failed if f.rejection.reason is RejectReason.PROCESSOR_FAILED]
        assert failed == [i for i in items if i.update.channels["zone"] == "poison"]
        late = [f for f in got.failed if f.rejection.reason is not RejectReason.PROCESSOR_FAILED]
        assert sorted(repr(f) for f in late) == sorted(repr(f) for f in want.failed)
        assert copies == []
        assert txn.snapshot() == reference.snapshot()
        copies.clear()  # (the snapshot just taken is one)


def test_a_transactional_dict_puts_back_what_a_batch_changed() -> None:
    d: TransactionalDict[str, int] = TransactionalDict({"a": 1, "b": 2})
    d["a"] = 10  # outside a transaction: kept
    assert d.begin() is True
    d["a"], d["c"] = 11, 3
    d["a"] = 12
    del d["b"]
    assert dict(d) == {"a": 12, "c": 3} and len(d) == 2 and "b" not in d
    d.rollback()
    assert d.data == {"a": 10, "b": 2} and list(d) == ["a", "b"]
    d.begin()
    d["b"] = 20
    d.commit()
    d.rollback()  # nothing open: nothing to undo
    assert d.data == {"a": 10, "b": 20} and d.get("z", 0) == 0


def test_a_message_of_many_bad_or_late_readings_makes_a_bounded_number_of_letters() -> None:
    """Each rejected reading of a message is counted, but at most MAX_LETTERS_PER_MESSAGE of
    them are dead-lettered one by one (each carries the payload); the rest are summed up, one
    letter per reason. Without the bound, a message of 100,000 bad readings made 100,000 copies
    of its payload."""
    from processors.ingest import MAX_LETTERS_PER_MESSAGE

    catalog = Catalog.load([IRRIGATION / "objects"])
    runtime = UnitRuntime(Ingest(catalog.registry), MqttSettings(url="mqtt://127.0.0.1:1"),
                          client_id="u-letters",
                          engine=engine_of(catalog, clock=lambda: 0.0))  # fmt: skip
    topic = "field-1-soil/streams/soil"
    n = 5_000
    times = [T0 + 3_600_000 + i for i in range(n)]
    bad = {"lastUpdate": times, "channels": {"moisture": ["wet"] * n, "temperature": [1.0] * n}}
    now = RawMessage(topic, orjson.dumps({"lastUpdate": T0 + 7_200_000, "channels": {
        "moisture": {"current-value": 30.0}, "temperature": {"current-value": 15.0}}}))  # fmt: skip
    late = {"lastUpdate": times, "channels": {"moisture": [1.0] * n, "temperature": [1.0] * n}}
    messages = [RawMessage(topic, orjson.dumps(bad)), now, RawMessage(topic, orjson.dumps(late))]
    result, out = runtime._process(messages)
    runtime._count(messages, result, out)
    letters = [(orjson.loads(x.body), x.count) for x in out.dead_letters]
    # each carries its message (an excerpt: these are over MAX_DEAD_LETTER_PAYLOAD)
    reasons = Counter((x["reason"], m.payload.decode().startswith(x["payload"]), count)
                      for (x, count), m in zip(letters, [messages[0]] * 21 + [messages[2]] * 21,
                                               strict=True))  # fmt: skip
    assert reasons == {
        ("wrong_type", True, 1): MAX_LETTERS_PER_MESSAGE,
        ("wrong_type", True, n - MAX_LETTERS_PER_MESSAGE): 1,
        ("late", True, 1): MAX_LETTERS_PER_MESSAGE,
        ("late", True, n - MAX_LETTERS_PER_MESSAGE): 1,
    }
    summary = letters[MAX_LETTERS_PER_MESSAGE][0]
    assert summary["message"].startswith(
        f"{n - MAX_LETTERS_PER_MESSAGE} more wrong_type rejections of this message, summed up"
        f" here (at most {MAX_LETTERS_PER_MESSAGE} dead letters per message); the first:"
        f" field-1-soil/soil update {MAX_LETTERS_PER_MESSAGE}: channel 'moisture'"
    )
    assert runtime.ingest.counts.rejected == {RejectReason.WRONG_TYPE: n}
    metrics = runtime.metrics.render().decode()
    for line in (
        f'cloudlet_updates_rejected_total{{reason="wrong_type",unit="u-letters"}} {n}.0',
        f'cloudlet_updates_rejected_total{{reason="late",unit="u-letters"}} {n}.0',
        f'cloudlet_updates_late_total{{unit="u-letters"}} {n}.0',
        f'cloudlet_dead_letters_total{{unit="u-letters"}} {2 * MAX_LETTERS_PER_MESSAGE + 2}.0',
    ):
        assert line in metrics, [x for x in metrics.splitlines() if "total{" in x]


def test_taking_a_batch_keeps_the_inbox_bound_on_memory(tmp_path: Path) -> None:
    """Messages of 200 KB each, 20 MB of them, queued while the worker was busy: the inbox
    keeps 1 MiB in memory and the rest in its file, and a batch takes from it only up to its
    bytes, so what is in memory at any time is the inbox's bound, a batch and one message (the
    batch took up to `batch_size` messages, the file's included: 100+ MB with 1 MB ones). All
    come out, in order."""
    catalog = Catalog.load([IRRIGATION / "objects"])
    runtime = UnitRuntime(Ingest(catalog.registry), MqttSettings(url="mqtt://127.0.0.1:1"),
                          client_id="u-spill", batch_bytes=256 * 1024, inbox_bytes=1 << 20,
                          spill_dir=tmp_path)  # fmt: skip
    size = 200_000
    sent = [(f"field-{i}-soil/streams/soil", bytes([i]) * size) for i in range(100)]
    for packet_id, (topic, payload) in enumerate(sent, 1):  # one list per read, as it comes
        runtime._inbox.put([kernels.Publish(topic, payload, 1, False, packet_id, None, 0)])
    assert runtime._inbox.spilled > 90
    taken = []
    while batch := runtime._take_batch():
        in_memory = (runtime._inbox.held_bytes + sum(len(m.payload) for m in runtime._carry)
                     + sum(len(m.payload) for m in batch))  # fmt: skip
        assert in_memory <= (1 << 20) + 256 * 1024 + size
        assert len(batch) == 1 or sum(len(m.payload) for m in batch) <= 256 * 1024
        taken += [(m.topic, m.payload) for m in batch]
    assert taken == sent
    runtime._inbox.close()


def test_a_batch_ends_at_its_message_count_or_its_bytes() -> None:
    """Messages of many readings make few, small batches rather than one that holds tens of
    thousands of readings (and their outputs) in memory at once; a message larger than the
    bound still makes a batch of its own, and nothing is lost or reordered."""
    catalog = Catalog.load([IRRIGATION / "objects"])
    runtime = UnitRuntime(Ingest(catalog.registry), MqttSettings(url="mqtt://127.0.0.1:1"),
                          client_id="u-bytes", batch_size=50, batch_bytes=10_000)  # fmt: skip
    sizes = [100] * 120 + [25_000] + [3_000] * 7 + [10] * 60
    messages = [RawMessage(f"s/streams/{i}", b"x" * n, None) for i, n in enumerate(sizes)]
    for i in range(0, len(messages), 37):  # as the network thread hands them over
        runtime._inbox.put(messages[i : i + 37])
    batches = []
    while batch := runtime._take_batch():
        batches.append(batch)
    assert [m for b in batches for m in b] == messages
    for batch in batches:
        assert len(batch) <= 50
        assert len(batch) == 1 or sum(len(m.payload) for m in batch) <= 10_000
    assert [len(b) for b in batches][:4] == [50, 50, 20, 1]  # 100-byte ones, then the big one
