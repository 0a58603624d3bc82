"""Everything a cloudlet runs, loaded and checked at once: service objects, the composite
streams compiled from them, and the windowed flows of the flow files beside them. Every
problem is reported, each naming the file, the object or flow, the field and the reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from streams.composite_plan import CompositePlan
from streams.flows.compile import (
    CompiledFlow,
    CompiledRule,
    compile_flows,
    compile_rules,
    load_flow_files,
)
from streams.registry import Problem, Registry, RegistryError
from streams.updates import StreamKey


@dataclass(frozen=True)
class Catalog:
    registry: Registry  # includes the streams flows add
    plan: CompositePlan
    flows: tuple[CompiledFlow, ...]
    rules: tuple[CompiledRule, ...] = ()

    @classmethod
    def check(cls, paths: Iterable[Path | str]) -> tuple[Catalog, list[Problem]]:
        paths = list(paths)
        parsed, problems = Registry.parse(paths)
        files = load_flow_files(paths, problems)
        # Expressions are checked on every object that parsed, so that all problems show;
        # only objects (and flows) without any problem are run.
        extended, checked = compile_flows(parsed, files.flows, problems)
        problems += extended.cross_check()
        plan_all, plan_problems = CompositePlan.build(extended)
        problems += plan_problems + _cycles_through_flows(plan_all, checked)
        compile_rules(extended, files.rules, problems)
        bad = {p.object_id for p in problems}
        registry, flows = compile_flows(parsed.without(bad), files.flows, [])
        plan, _ = CompositePlan.build(registry)
        rules = compile_rules(registry, files.rules, [])
        return cls(registry, plan, tuple(flows), tuple(rules)), problems

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> Catalog:
        catalog, problems = cls.check(paths)
        if problems:
            raise RegistryError(problems)
        return catalog


def _cycles_through_flows(plan: CompositePlan, flows: list[CompiledFlow]) -> list[Problem]:
    """A flow reading, through composite streams, its own results would feed itself forever."""
    edges: dict[StreamKey, set[StreamKey]] = {}
    for d in plan.derived.values():
        for source in d.streams.values():
            if source != d.key:
                edges.setdefault(source, set()).add(d.key)
        for group in d.groups.values():
            for member, groups in plan.groups_of.items():
                if group in groups:
                    edges.setdefault(member, set()).add(d.key)
    outputs: dict[str, set[StreamKey]] = {}
    for flow in flows:
        outputs[flow.name] = {
            StreamKey(flow.into_so or k.so, flow.into_stream) for k in flow.inputs
        }
        for source in flow.inputs:
            edges.setdefault(source, set()).update(outputs[flow.name])
    problems = []
    for flow in flows:
        seen: set[StreamKey] = set()
        frontier = list(outputs[flow.name])
        while frontier:
            key = frontier.pop()
            if key in seen:
                continue
            seen.add(key)
            frontier.extend(edges.get(key, ()))
        if seen & set(flow.inputs):
            loop = sorted(f"{k.so}/{k.stream}" for k in seen & set(flow.inputs))
            problems.append(
                Problem(
                    flow.source,
                    f"the flow reads its own results again through {', '.join(loop)}",
                    None,
                    f"flows.{flow.name}",
                )
            )
    return problems
