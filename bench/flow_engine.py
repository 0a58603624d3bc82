"""Flow engine throughput on the irrigation site (pure Python, one core).

    .venv/bin/python bench/flow_engine.py [--minutes 10000]

Feeds simulated readings (10 devices, one reading a minute each) through the site's composite
streams, windows and rules in one batch and prints updates per second. A first figure for the
compiled kernels of issue 7 to beat; run it on an idle machine, and compare runs side by side.
"""

from __future__ import annotations

import argparse
import time

from cloudlet.demo import scenario_dir
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from streams.catalog import Catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10_000)
    args = parser.parse_args()
    home = scenario_dir("irrigation")
    model = IrrigationModel(
        IrrigationSite.load(home / "site.yaml"), seed=1, start_ms=1_700_006_400_000
    )
    readings = [r for _ in range(args.minutes) for r in model.step(60)]
    engine = Catalog.load([home / "objects"]).engine(clock=lambda: 0.0)
    started = time.perf_counter()
    out = engine.process(readings)
    seconds = time.perf_counter() - started
    print(
        f"{len(readings)} updates -> {len(out.derived)} derived, {len(out.actuations)} commands"
        f" in {seconds:.2f} s: {len(readings) / seconds:,.0f} updates/s"
    )


if __name__ == "__main__":
    main()
