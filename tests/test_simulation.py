"""The irrigation simulator: reproducible, physically plausible, valid for its objects."""

from __future__ import annotations

import random

from cloudlet.demo import scenario_dir
from edge_objects.faults import Fault, corrupt
from edge_objects.irrigation import HOUR_MS, IrrigationModel, IrrigationSite
from processors.ingest import Ingest, RawMessage
from streams import TopicScheme, encode_update
from streams.catalog import Catalog

HOME = scenario_dir("irrigation")
SITE = IrrigationSite.load(HOME / "site.yaml")
START = 1_700_006_400_000  # a midnight, UTC


def _moisture(model: IrrigationModel, field: int) -> float:
    return model.fields[field].moisture


def test_runs_are_reproducible() -> None:
    a = IrrigationModel(SITE, seed=3, start_ms=START)
    b = IrrigationModel(SITE, seed=3, start_ms=START)
    assert [a.step(300) for _ in range(50)] == [b.step(300) for _ in range(50)]


def test_every_reading_is_valid_for_the_scenario_objects() -> None:
    registry = Catalog.load([HOME / "objects"]).registry
    assert sorted(registry.objects) == sorted(SITE.device_ids)
    ingest = Ingest(registry)
    model = IrrigationModel(SITE, seed=1, start_ms=START)
    topics = TopicScheme()
    messages = [
        RawMessage(topics.device_update(*key), encode_update(update))
        for _ in range(24 * 12)
        for key, update in model.step(300)
    ]
    out = ingest.batch(messages)
    assert out.dead_letters == []
    assert len(out.accepted) == 24 * 12 * len(SITE.device_ids)


def test_soil_dries_by_day_and_recovers_under_the_open_valve() -> None:
    model = IrrigationModel(SITE, seed=1, start_ms=START + 10 * HOUR_MS)
    model._rain_until = 0
    model.rng = random.Random(0)  # a dry spell: rain starts with probability 0.08/h
    before = _moisture(model, 0)
    for _ in range(12):
        model.step(300)  # one hour
    dried = _moisture(model, 0)
    assert dried < before
    model.set_valve(SITE.fields[0].valve, True)
    for _ in range(12):
        model.step(300)
    assert _moisture(model, 0) > dried
    assert model.step(300)[1][1].channels == {"open": True}


def test_faults_produce_the_rejection_they_name() -> None:
    registry = Catalog.load([HOME / "objects"]).registry
    ingest = Ingest(registry)
    topics = TopicScheme()
    key, update = IrrigationModel(SITE, seed=1, start_ms=START).step(300)[0]
    for fault in Fault:
        topic, payload = corrupt(fault, key, update, topics)
        out = ingest.batch([RawMessage(topic, payload)])
        assert [d.rejection.reason for d in out.dead_letters] == [fault.expected_reason], fault
