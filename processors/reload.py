"""Hot reload: a running unit takes a change to its registry (the descriptor and flow files of
its `objects` folders) within seconds, without a restart and without losing state.

A watcher thread looks at the folders every `reload` seconds (their files' names, sizes and
modification times). When they change and have settled, it loads and checks everything as
`cloudlet so validate` does; with any problem it says what and where, counts it, and the unit
keeps running what it had. Otherwise it builds the new ingest, graph and processors and hands
them to the unit's worker, which swaps them in between two batches:

- a new object's updates are accepted from the next batch, a removed object's are refused
  (`unknown_object`), a changed stream is validated against its new channels;
- the windows of every flow whose definition did not change carry on (a flow whose pattern now
  matches one more object included; a removed object's windows go), and so do the latest
  values of every stream still there and the rules' last commands: the engine's state is
  moved as a checkpoint would move it; a flow whose definition changed starts afresh (said in
  the log), because its old windows hold other aggregates;
- the processors keep their state and their counts.

The swap happens in the worker, so a batch is processed entirely before or entirely after it;
the next checkpoint saves the new engine's state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processors.chain import Chain
from processors.config import ConfigError
from processors.engine.flows import FlowEngine
from processors.ingest import Ingest
from streams.catalog import Catalog
from streams.flows.compile import CompiledFlow
from streams.registry import Registry

log = logging.getLogger(__name__)
SETTLE_SECONDS = 0.2  # a change is taken once the files have stopped changing for this long


@dataclass
class Rebuilt:
    """What a change of the registry gives a running unit, ready to swap in."""

    catalog: Catalog
    ingest: Ingest
    engine: FlowEngine
    chain: Chain

    def adopt(self, engine: FlowEngine | None, chain: Chain | None) -> None:
        """Take over the state of the running engine and processors (see the module)."""
        if engine is not None:
            self.engine.restore(carried(engine.snapshot(), engine, self.engine,
                                        self.ingest.registry))  # fmt: skip
        if chain is not None:
            self.chain.restore(chain.snapshot())
            counts = {stage.name: stage.counts for stage in chain.stages}
            for stage in self.chain.stages:
                stage.counts = counts.get(stage.name, stage.counts)
            chain.teardown()


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            # what the loader reads: not dot-named files or folders (a copy's bookkeeping,
            # files being written)
            yield from (
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.exists():
            yield path


def fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Each file under `paths` with its size and modification time."""
    out = []
    for path in _files(paths):
        try:
            st = path.stat()
        except OSError:  # removed while looking
            continue
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)


def flow_signature(flow: CompiledFlow) -> tuple[Any, ...]:
    """What a flow's windows depend on: its windowing, keying, output and expressions (not
    which streams match its pattern: a new object matching it joins the same windows)."""
    sources = frozenset(
        e.source
        for program in flow.inputs.values()
        for e in (program.where, program.key, *program.args)
        if e is not None
    )
    return (flow.windowing, flow.key_mode, flow.into_so, flow.into_stream,
            tuple(flow.output_channels.items()), tuple(n for n, _ in flow.aggregates),
            sources)  # fmt: skip


def carried(state: dict[str, Any], old: FlowEngine, new: FlowEngine,
            registry: Registry) -> dict[str, Any]:  # fmt: skip
    """The engine state `state` (of `old`) as `new` takes it: unchanged flows' windows, the
    latest values of streams still there (and a flow keyed by object, the windows of objects
    still there), the rules' last commands."""
    changed = [name for name, node in new.windows.items() if name in old.windows
               and flow_signature(old.windows[name].flow) != flow_signature(node.flow)]  # fmt: skip
    for name in changed:
        log.warning("flow %r changed: its windows start afresh", name)
    windows = {}
    for name, data in state["windows"].items():
        if name not in new.windows or name in changed:
            continue
        if new.windows[name].flow.key_mode == "so":  # a removed object's windows go with it
            data = {**data, "keys": {k: v for k, v in data["keys"].items()
                                     if k in registry.objects},
                    "clocks": {k: v for k, v in data["clocks"].items()
                               if k in registry.objects}}  # fmt: skip
        windows[name] = data

    def there(so: str, stream: str) -> bool:
        found = registry.objects.get(so)
        return found is not None and (stream in found.streams or stream in found.groups)

    composite = state["composite"]
    return {
        **state,
        "windows": windows,
        "composite": {
            "latest": [entry for entry in composite["latest"] if there(entry[0], entry[1])],
            "groups": [entry for entry in composite["groups"] if there(entry[0], entry[1])],
        },
    }


class RegistryWatcher:
    """Polls the registry's folders; builds and hands over what a change gives."""

    def __init__(
        self,
        paths: list[Path],
        build: Callable[[Catalog], Rebuilt],
        hand_over: Callable[[Rebuilt], None],
        every: float,
        failed: Callable[[], None] = lambda: None,
    ) -> None:
        self.paths = paths
        self.build = build
        self.hand_over = hand_over
        self.every = every
        self.failed = failed  # counts a change that could not be taken
        self._seen = fingerprint(paths)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudlet-registry", daemon=True)

    def start(self) -> RegistryWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def alive(self) -> bool:
        return self._stop.is_set() or self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.check()
            except Exception:  # a bug of ours: said, and the unit runs what it has
                log.exception("the registry could not be reloaded")
                self.failed()

    def check(self) -> bool:
        """Take a change of the files, if any; True when one was handed over."""
        now = fingerprint(self.paths)
        if now == self._seen:
            return False
        while True:  # an editor writes in steps: wait until the files settle
            time.sleep(SETTLE_SECONDS)
            again = fingerprint(self.paths)
            if again == now:
                break
            now = again
        self._seen = now
        catalog, problems = Catalog.check(self.paths)
        if problems:
            for problem in problems:
                log.error("registry not reloaded: %s", problem)
            self.failed()
            return False
        try:
            rebuilt = self.build(catalog)
        except ConfigError as exc:  # the unit's processors no longer fit the registry
            for problem in exc.problems:
                log.error("registry not reloaded: %s", problem)
            self.failed()
            return False
        self.hand_over(rebuilt)
        return True
