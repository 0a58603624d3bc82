"""Built-in processors' throughput on the simulated city (pure Python, one core).

    .venv/bin/python bench/processor_throughput.py [--steps 2000] [--batch 500]

Feeds smart-city readings (12 devices, one reading a minute each) in unit-sized batches
through each built-in processor alone, and prints, for each, the updates of the streams it
reads per second (the time includes the chain picking them out of every batch), side by side
in one run, with a pass-through filter as the reference for the chain's own cost.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from cloudlet.demo import scenario_dir
from edge_objects.smart_city import SmartCityModel
from processors.chain import Item, ProcessorSpec, build_chain
from streams.catalog import Catalog

SPECS: dict[str, dict[str, Any]] = {
    "pass-through": {"use": "filter", "from": "bay-*/occupancy", "config": {"where": "true"}},
    "filter": {"use": "filter", "from": "junction-*/traffic",
               "config": {"where": "vehicles > 30"}},
    "derive": {"use": "derive", "from": "air-*/air", "config": {"channels": {"aqi": "pm25 * 4"}}},
    "threshold": {"use": "threshold", "from": "air-*/air",
                  "config": {"value": "noise", "high": 70, "low": 65}},
    "dedupe": {"use": "dedupe", "from": "bay-*/occupancy", "config": {"by": ["occupied"]}},
    "downsample": {"use": "downsample", "from": "bay-*/occupancy", "config": {"every": "10m"}},
    "zscore": {"use": "zscore", "from": "junction-*/traffic", "config": {"value": "vehicles"}},
    "window": {"use": "window", "from": "junction-*/traffic",
               "config": {"window": {"tumbling": "5m"}, "aggregates": {"v": "sum(vehicles)"}}},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    objects = scenario_dir("smart-city") / "objects"
    registry = Catalog.load([objects]).registry
    model = SmartCityModel(registry, seed=1, start_ms=1_700_006_400_000)
    items = [Item(k, u) for _ in range(args.steps) for k, u in model.step(60)]
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    for name, text in SPECS.items():
        spec = ProcessorSpec.model_validate({**text, "into": "out"})
        chain, _, problems = build_chain(registry, [spec], "bench")
        assert not problems, problems
        emitted = 0
        started = time.perf_counter()
        for batch in batches:
            result: Any = chain.process(batch)
            emitted += len(result.derived)
        seconds = time.perf_counter() - started
        read = chain.stages[0].counts.received  # the updates of the streams it reads
        print(f"{name:>12}: {read:>6,} updates in {seconds:.3f} s: {read / seconds:>9,.0f}"
              f" updates/s ({emitted:,} emitted)")  # fmt: skip


if __name__ == "__main__":
    main()
