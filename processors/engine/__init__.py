"""The engine: what runs a catalog's composite streams, windowed flows and rules, and a
unit's processors, over batches of accepted updates, as one graph of batch operators
(`FlowEngine`, `graph`), and the nodes it is made of. What it runs is defined in `streams`
(objects, flow definitions, expressions); how updates reach it is the unit's business
(`processors.runtime`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from processors.engine.composite import CompositeEngine
from processors.engine.flows import Clock, FlowEngine, FlowResult, Late
from streams.catalog import Catalog

if TYPE_CHECKING:
    from processors.chain import Chain

__all__ = ["Clock", "FlowEngine", "FlowResult", "Late", "engine_of"]


def engine_of(catalog: Catalog, clock: Clock = time.time, chain: Chain | None = None) -> FlowEngine:
    """A fresh engine running `catalog`'s composite streams, flows and rules, and the
    processors of `chain` after them, as one graph."""
    return FlowEngine(CompositeEngine(catalog.plan), catalog.flows, catalog.rules, clock=clock,
                      processors=chain.nodes() if chain is not None else ())  # fmt: skip
