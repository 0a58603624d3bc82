"""The engine: what runs a catalog's composite streams, windowed flows and rules over batches
of accepted updates (`FlowEngine`), and the window operator and composite-stream engine it is
made of. What it runs is defined in `streams` (objects, flow definitions, expressions); how
updates reach it is the unit's business (`processors.runtime`)."""

from __future__ import annotations

import time

from processors.engine.composite import CompositeEngine
from processors.engine.flows import Clock, FlowEngine, FlowResult, Late
from streams.catalog import Catalog

__all__ = ["Clock", "FlowEngine", "FlowResult", "Late", "engine_of"]


def engine_of(catalog: Catalog, clock: Clock = time.time) -> FlowEngine:
    """A fresh engine running `catalog`'s composite streams, flows and rules."""
    return FlowEngine(CompositeEngine(catalog.plan), catalog.flows, catalog.rules, clock=clock)
