"""What making a batch undoable costs a processor with a large state, side by side.

    .venv/bin/python bench/chain_rollback.py [--processor dedupe|zscore] [--streams 200]
        [--entries 10000] [--batch 500]

A `dedupe` at its default `max_entries` (10,000 per stream), or a `zscore` keeping as many
`samples`, over `--streams` streams, filled, then fed batches of `--batch` new readings through
the processor chain: once with the chain copying the whole state through msgpack before every
batch (what any processor without an undo log gets), once with the processor's own undo log.
Prints milliseconds per batch for each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from processors.chain import Chain, Item, ProcessorSpec, build_chain
from streams import Registry, SensorUpdate, StreamKey

T0 = 1_700_006_400_000


SPECS = {
    "dedupe": '{use: dedupe, from: "s*/data", into: once, config: {max_entries: %d}}',
    "zscore": '{use: zscore, from: "s*/data", into: odd, config: {value: v, samples: %d}}',
}


def _chain(processor: str, streams: int, entries: int) -> tuple[Chain, list[StreamKey]]:
    folder = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
    (folder / "objects.yaml").write_text("\n---\n".join(
        f"id: s{i}\nstreams: {{data: {{channels: {{v: {{type: number}}}}}}}}"
        for i in range(streams)
    ))  # fmt: skip
    registry = Registry.load([folder])
    specs = yaml.safe_load(f"- {SPECS[processor] % entries}")
    chain, _, problems = build_chain(registry, [ProcessorSpec.model_validate(s) for s in specs],
                                     "bench")  # fmt: skip
    assert not problems, problems
    return chain, [StreamKey(f"s{i}", "data") for i in range(streams)]


def _run(chain: Chain, keys: list[StreamKey], batch: int, batches: int, start: int) -> float:
    n = start
    took = 0.0
    for _ in range(batches):
        items = []
        for _ in range(batch):
            n += 1
            items.append(Item(keys[n % len(keys)], SensorUpdate({"v": float(n)}, T0 + n)))
        began = time.perf_counter()
        chain.process(items)
        took += time.perf_counter() - began
    return took / batches * 1000


MODES = {"copy": "copy (msgpack, before every batch)", "undo": "own undo log"}


def measure(
    mode: str, processor: str, streams: int, entries: int, batch: int, batches: int
) -> float:
    chain, keys = _chain(processor, streams, entries)
    dedupe: Any = chain.stages[0].processor
    if mode == "copy":
        dedupe.begin = lambda: False  # what a processor without an undo log gets
    fill = streams * entries + 10_000
    stage = chain.stages[0]  # filled straight, without the chain: every stream at max_entries
    for start in range(0, fill, 10_000):
        readings = [(keys[n % len(keys)], SensorUpdate({"v": float(n)}, T0 + n))
                    for n in range(start + 1, start + 10_001)]  # fmt: skip
        dedupe.process(readings, stage.output())
    return _run(chain, keys, batch, batches, fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", choices=sorted(SPECS), default="dedupe")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [str(v) for v in (args.streams, args.entries, args.batch, args.batches)]
    if args.mode:  # one mode, in a process of its own (heaps of both would skew the other)
        print(measure(args.mode, args.processor, args.streams, args.entries, args.batch,
                      args.batches))  # fmt: skip
        return
    results = {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--processor", args.processor,
             "--streams", sizes[0], "--entries",
             sizes[1], "--batch", sizes[2], "--batches", sizes[3]],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[mode] = float(done.stdout.split()[-1])
    for mode, ms in results.items():
        print(f"{MODES[mode]:40s} {ms:10.2f} ms per batch of {args.batch}")
    print(f"{'ratio':40s} {results['copy'] / results['undo']:10.1f}x")


if __name__ == "__main__":
    main()
