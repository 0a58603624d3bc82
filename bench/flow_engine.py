"""Flow engine throughput on the irrigation site (one core), and what transactions cost.

    .venv/bin/python bench/flow_engine.py [--minutes 10000] [--batches 1,10,100,1000]

Feeds simulated readings (10 devices, one reading a minute each) through the site's composite
streams, windows and rules: first in one batch, then in batches of each size, each size twice
side by side: plain, and as the unit runs it (every batch a transaction: `begin()`, then
`commit()`; a rollback would restore what the batch changed). Prints CPU microseconds per
update; compare the two columns of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import time

from cloudlet.demo import scenario_dir
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.engine import engine_of
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog


def _per_update(catalog: Catalog, readings: list[tuple[StreamKey, SensorUpdate]],
                size: int, transactions: bool) -> float:  # fmt: skip
    engine = engine_of(catalog, clock=lambda: 0.0)
    started = time.process_time()
    for i in range(0, len(readings), size):
        if transactions:
            engine.begin()
        engine.process(readings[i : i + size])
        if transactions:
            engine.commit()
    return (time.process_time() - started) / len(readings) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10_000)
    parser.add_argument("--batches", default="1,10,100,1000")
    args = parser.parse_args()
    home = scenario_dir("irrigation")
    model = IrrigationModel(
        IrrigationSite.load(home / "site.yaml"), seed=1, start_ms=1_700_006_400_000
    )
    readings = [r for _ in range(args.minutes) for r in model.step(60)]
    catalog = Catalog.load([home / "objects"])
    engine = engine_of(catalog, clock=lambda: 0.0)
    started = time.perf_counter()
    out = engine.process(readings)
    seconds = time.perf_counter() - started
    print(
        f"{len(readings)} updates -> {len(out.derived)} derived, {len(out.actuations)} commands"
        f" in {seconds:.2f} s: {len(readings) / seconds:,.0f} updates/s"
    )
    print("batch size   plain µs/update   transactional µs/update   overhead")
    for size in (int(s) for s in args.batches.split(",")):
        plain = _per_update(catalog, readings, size, transactions=False)
        txn = _per_update(catalog, readings, size, transactions=True)
        print(f"{size:10d}   {plain:15.2f}   {txn:23.2f}   {txn / plain - 1:+8.1%}")


if __name__ == "__main__":
    main()
