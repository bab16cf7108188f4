"""EfficientNet-Lite0 at 224x224: size and per-image latency of the float32, float16 and int8 bundles in
ai-edge-litert with 1 and 2 threads, measured in one run (alternating rounds: medians and spread), beside TensorFlow's
published Pixel 4 figures for the same model (6.5 ms int8, 12 ms float32), the phone reference.

    python benchmarks/pretrained_bench.py [--run runs/efficientnet_lite0]

(after `pipeline pretrained efficientnet-lite0`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from serve import Classifier

ROOT = Path(__file__).resolve().parent.parent
PIXEL4_MS = {"int8": 6.5, "float32": 12.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    bundles = {mode: args.run / "export" / f"{args.run.name}_{mode}.tflite" for mode in ("float32", "float16", "int8")}
    if not all(path.is_file() for path in bundles.values()):
        sys.exit(f"{args.run}: bundles missing; run `pipeline pretrained efficientnet-lite0` first")
    models = {
        (mode, threads): Classifier(path, num_threads=threads) for mode, path in bundles.items() for threads in (1, 2)
    }
    pixels = next(iter(models.values())).preprocess(ROOT / "tests" / "data" / "grace_hopper.jpg")[None]
    round_medians: dict[tuple, list[float]] = {key: [] for key in models}
    for round_number in range(args.rounds):
        # Alternating rounds, the order reversed every other one: machine noise falls on every bundle alike.
        for key in list(models) if round_number % 2 == 0 else list(reversed(models)):
            times = []
            for i in range(25):
                started = time.perf_counter()
                models[key].predict(pixels)
                if i >= 5:  # the first runs of a round warm caches
                    times.append(1000 * (time.perf_counter() - started))
            round_medians[key].append(statistics.median(times))
    lines = [
        f"EfficientNet-Lite0 224x224 on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: ms per image "
        f"(serve.Classifier, ai-edge-litert), median of {args.rounds} alternating rounds of 20 runs (lowest-highest "
        "round median); int8 / float32 within each round (median)",
        "",
        "| bundle | size | 1 thread | 2 threads | Pixel 4 (TensorFlow's published figure) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, path in bundles.items():
        cells = []
        for threads in (1, 2):
            medians = round_medians[(mode, threads)]
            ratios = [a / b for a, b in zip(medians, round_medians[("float32", threads)])]
            ratio = f", {statistics.median(ratios):.2f}x float32" if mode != "float32" else ""
            cells.append(f"{statistics.median(medians):.2f} ms ({min(medians):.2f}-{max(medians):.2f}){ratio}")
        phone = f"{PIXEL4_MS[mode]} ms" if mode in PIXEL4_MS else "-"
        lines.append(f"| {mode} | {path.stat().st_size / 2**20:.1f} MiB | {cells[0]} | {cells[1]} | {phone} |")
    table = "\n".join(lines)
    print(table)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "pretrained.md").write_text(table + "\n")
    (ROOT / "benchmarks" / "results" / "pretrained.json").write_text(
        json.dumps({f"{mode} x{threads}": values for (mode, threads), values in round_medians.items()}, indent=2)
    )


if __name__ == "__main__":
    main()
