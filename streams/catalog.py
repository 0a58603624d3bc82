"""Everything a cloudlet runs, loaded and checked at once: service objects, the composite
streams compiled from them, and the windowed flows of the flow files beside them. Every
problem is reported, each naming the file, the object or flow, the field and the reason."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from streams.composite import CompositeEngine, CompositePlan
from streams.flows.compile import CompiledFlow, compile_flows, load_flow_files
from streams.flows.engine import Clock, FlowEngine
from streams.registry import Problem, Registry, RegistryError


@dataclass(frozen=True)
class Catalog:
    registry: Registry  # includes the streams flows add
    plan: CompositePlan
    flows: tuple[CompiledFlow, ...]

    @classmethod
    def check(cls, paths: Iterable[Path | str]) -> tuple[Catalog, list[Problem]]:
        paths = list(paths)
        parsed, problems = Registry.parse(paths)
        definitions = load_flow_files(paths, problems)
        # Expressions are checked on every object that parsed, so that all problems show;
        # only objects (and flows) without any problem are run.
        extended, _ = compile_flows(parsed, definitions, problems)
        problems += extended.cross_check()
        problems += CompositePlan.build(extended)[1]
        bad = {p.object_id for p in problems}
        registry, flows = compile_flows(parsed.without(bad), definitions, [])
        plan, _ = CompositePlan.build(registry)
        return cls(registry, plan, tuple(flows)), problems

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> Catalog:
        catalog, problems = cls.check(paths)
        if problems:
            raise RegistryError(problems)
        return catalog

    def engine(self, clock: Clock = time.time) -> FlowEngine:
        """A fresh engine running this catalog's composite streams and flows."""
        return FlowEngine(CompositeEngine(self.plan), self.flows, clock=clock)
