"""Everything a cloudlet runs, loaded and checked at once: service objects and the compiled
composite streams (and, with flow files, windows). Every problem is reported, each naming the
file, the object, the field and the reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from streams.composite import CompositePlan
from streams.registry import Problem, Registry, RegistryError


@dataclass(frozen=True)
class Catalog:
    registry: Registry
    plan: CompositePlan

    @classmethod
    def check(cls, paths: Iterable[Path | str]) -> tuple[Catalog, list[Problem]]:
        parsed, problems = Registry.parse(list(paths))
        # Expressions are checked on every object that parsed, so that all problems show;
        # only objects without any problem are run.
        problems += CompositePlan.build(parsed)[1]
        registry = parsed.without({p.object_id for p in problems})
        plan, _ = CompositePlan.build(registry)
        return cls(registry, plan), problems

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> Catalog:
        catalog, problems = cls.check(paths)
        if problems:
            raise RegistryError(problems)
        return catalog
