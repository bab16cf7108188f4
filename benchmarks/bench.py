"""Benchmarks for the first slice, measured in one run on this machine (ratios, medians).

    python benchmarks/bench.py [--run runs/demo] [--repeats 15]

Reads the accuracy and sizes `make demo` recorded in the run directory, then measures, interleaved:
per-image latency of the int8 and float32 bundles in ai-edge-litert, and the cold start of
`pipeline label` against benchmarks/bare_label.py. Prints a table and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serve import Classifier

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def wall_time(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def latency_ms(classifier: Classifier, images: np.ndarray) -> list[float]:
    times = []
    for image in images:
        started = time.perf_counter()
        classifier.predict(image[None])
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--repeats", type=int, default=15, help="cold starts of each command")
    args = parser.parse_args()
    run = args.run
    report_path = run / "quantize_report.json"
    if not report_path.is_file():
        sys.exit(f"{report_path}: missing; run `make demo` first")
    report = json.loads(report_path.read_text())
    summary = json.loads((run / "summary.json").read_text())
    float32, int8 = report["bundles"]["float32"], report["bundles"]["int8"]
    if not int8["accepted"]:
        sys.exit(f"{run}: the int8 bundle was rejected by the accuracy gate")

    image = next((run / "samples").glob("*.png"), None)
    if image is None:
        subprocess.run(
            [sys.executable, "-m", "pipeline", "samples", "--count", "1", "--out", str(run / "samples")],
            check=True,
            capture_output=True,
        )
        image = next((run / "samples").glob("*.png"))

    # Latency: both bundles over the same images, interleaved in rounds so machine noise hits both.
    models = {
        f"{mode} x{threads}": Classifier(report["bundles"][mode]["bundle"], num_threads=threads)
        for mode in ("float32", "int8")
        for threads in (1, 2)
    }
    pixels = np.stack([models["int8 x1"].preprocess(image)] * 200)
    latencies: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(5):
        for name, classifier in models.items():
            latencies[name] += latency_ms(classifier, pixels)
    median = {name: statistics.median(values[20:]) for name, values in latencies.items()}

    # Cold start: a fresh process each time, alternating the two commands.
    pipeline = [str(Path(sys.executable).parent / "pipeline"), "label", str(image), "-m", int8["bundle"]]
    bare = [
        sys.executable,
        str(ROOT / "benchmarks" / "bare_label.py"),
        str(image),
        int8["bundle"],
        str(run / "export" / "labels.txt"),
    ]
    wall_time(pipeline), wall_time(bare)  # warm the page cache
    cold = {"pipeline label": [], "bare ai-edge-litert script": []}
    for _ in range(args.repeats):
        cold["pipeline label"].append(wall_time(pipeline))
        cold["bare ai-edge-litert script"].append(wall_time(bare))
    cold_median = {name: statistics.median(values) for name, values in cold.items()}

    drop = 100 * (float32["top1"] - int8["top1"])
    size_ratio = int8["size_bytes"] / float32["size_bytes"]
    latency_ratio = median["int8 x1"] / median["float32 x1"]
    cold_ratio = cold_median["pipeline label"] / cold_median["bare ai-edge-litert script"]
    rows = [
        ("Fashion-MNIST test top-1, float32", f"{100 * float32['top1']:.2f}%", ">= 92%", float32["top1"] >= 0.92),
        ("Fashion-MNIST test top-1, int8", f"{100 * int8['top1']:.2f}%", "", None),
        ("int8 drop against float32", f"{drop:.2f} points", "<= 0.5 points", drop <= 0.5),
        ("int8 / float32 top-1 agreement", f"{100 * int8['agreement']:.2f}%", "", None),
        (
            "bundle size float32 / int8",
            f"{float32['size_bytes'] / 1024:.1f} / {int8['size_bytes'] / 1024:.1f} KiB",
            "",
            None,
        ),
        ("int8 size / float32 size", f"{100 * size_ratio:.1f}%", "<= 30%", size_ratio <= 0.30),
        *[(f"latency {name} (median ms/image)", f"{median[name]:.4f}", "", None) for name in models],
        ("int8 / float32 latency, 1 thread", f"{latency_ratio:.2f}x", "< 1", latency_ratio < 1),
        *[(f"cold start, {name} (median s)", f"{cold_median[name]:.3f}", "", None) for name in cold],
        ("pipeline label / bare script cold start", f"{cold_ratio:.2f}x", "<= 1.2x", cold_ratio <= 1.2),
        ("training time (15 epochs)", f"{summary['train_seconds'] / 60:.1f} min", "", None),
        ("quantize time (float32 + int8)", f"{float32['convert_seconds'] + int8['convert_seconds']:.0f} s", "", None),
    ]
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    lines = [
        f"Benchmark of {run.name} on {machine}, {time.strftime('%Y-%m-%d')} "
        f"(latency: median of {len(latencies['int8 x1']) - 20} single-image runs; cold start: median of "
        f"{args.repeats} runs each, interleaved)",
        "",
        "| measure | value | target | met |",
        "| --- | --- | --- | --- |",
        *[
            f"| {name} | {value} | {target} | {'' if ok is None else ('yes' if ok else 'NO')} |"
            for name, value, target, ok in rows
        ],
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_slice.md").write_text(table + "\n")
    (RESULTS / "first_slice.json").write_text(
        json.dumps({"latency_ms": median, "cold_start_s": cold_median, "report": report, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
