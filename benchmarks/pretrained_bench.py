"""EfficientNet-Lite0 at 224x224: size and per-image latency of the float32, float16 and int8 bundles in
ai-edge-litert with 1 and 2 threads, measured in one run (interleaved rounds, medians), beside TensorFlow's
published Pixel 4 figures for the same model (6.5 ms int8, 12 ms float32), the phone reference.

    python benchmarks/pretrained_bench.py [--run runs/efficientnet_lite0]

(after `pipeline pretrained efficientnet-lite0`).
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bundles = {mode: args.run / "export" / f"{args.run.name}_{mode}.tflite" for mode in ("float32", "float16", "int8")}
    if not all(path.is_file() for path in bundles.values()):
        sys.exit(f"{args.run}: bundles missing; run `pipeline pretrained efficientnet-lite0` first")
    models = {
        (mode, threads): Classifier(path, num_threads=threads) for mode, path in bundles.items() for threads in (1, 2)
    }
    pixels = next(iter(models.values())).preprocess(ROOT / "tests" / "data" / "grace_hopper.jpg")[None]
    times: dict[tuple, list[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, classifier in models.items():
            for i in range(25):
                started = time.perf_counter()
                classifier.predict(pixels)
                if i >= 5:  # the first runs of a round warm caches
                    times[key].append(1000 * (time.perf_counter() - started))
    lines = [
        f"EfficientNet-Lite0 224x224 on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: median ms per image "
        f"over {len(times[('int8', 1)])} runs each (serve.Classifier, ai-edge-litert), interleaved",
        "",
        "| bundle | size | 1 thread | 2 threads | Pixel 4 (TensorFlow's published figure) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, path in bundles.items():
        one, two = (statistics.median(times[(mode, t)]) for t in (1, 2))
        phone = f"{PIXEL4_MS[mode]} ms" if mode in PIXEL4_MS else "-"
        lines.append(f"| {mode} | {path.stat().st_size / 2**20:.1f} MiB | {one:.2f} ms | {two:.2f} ms | {phone} |")
    table = "\n".join(lines)
    print(table)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "pretrained.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
