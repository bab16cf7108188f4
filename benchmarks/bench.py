"""Benchmarks for the first slice, measured in one run on this machine (ratios, medians).

    python benchmarks/bench.py [--run runs/demo] [--repeats 15]

Reads the accuracy and sizes `make demo` recorded in the run directory, then measures, interleaved:
per-image latency of the int8 and float32 bundles in ai-edge-litert (alternating rounds: median, spread, and the
int8/float32 ratio within each round), and the cold start of `pipeline label` against benchmarks/bare_label.py.
Prints a table and writes it to benchmarks/results/.
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
    parser.add_argument("--rounds", type=int, default=20, help="alternating latency rounds of 50 images each")
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
    # Latency: every bundle over the same images in alternating rounds (the order reversed every other round),
    # so machine noise hits all alike; each round's median kept, and int8/float32 compared within each round.
    pixels = np.stack([models["int8 x1"].preprocess(image)] * 50)
    round_medians: dict[str, list[float]] = {name: [] for name in models}
    for round_number in range(args.rounds):
        for name in list(models) if round_number % 2 == 0 else list(reversed(models)):
            latency_ms(models[name], pixels[:5])  # warm again: the others ran in between
            round_medians[name].append(statistics.median(latency_ms(models[name], pixels)))
    median = {name: statistics.median(values) for name, values in round_medians.items()}
    spread = {name: (min(values), max(values)) for name, values in round_medians.items()}
    ratios = {
        threads: [a / b for a, b in zip(round_medians[f"int8 x{threads}"], round_medians[f"float32 x{threads}"])]
        for threads in (1, 2)
    }

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
    cold_ratios = [a / b for a, b in zip(cold["pipeline label"], cold["bare ai-edge-litert script"])]

    drop = 100 * (float32["top1"] - int8["top1"])
    size_ratio = int8["size_bytes"] / float32["size_bytes"]
    latency_ratio = {threads: statistics.median(values) for threads, values in ratios.items()}
    cold_ratio = statistics.median(cold_ratios)
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
        *[
            (
                f"latency {name} (median ms/image)",
                f"{median[name]:.4f} ({spread[name][0]:.4f}-{spread[name][1]:.4f})",
                "",
                None,
            )
            for name in models
        ],
        *[
            (
                f"int8 / float32 latency, {threads} thread{'s' if threads > 1 else ''}",
                f"{latency_ratio[threads]:.2f}x ({min(ratios[threads]):.2f}-{max(ratios[threads]):.2f}x)",
                "< 1",
                latency_ratio[threads] < 1,
            )
            for threads in (1, 2)
        ],
        *[
            (f"cold start, {name} (median s)", f"{cold_median[name]:.3f} ({min(t):.3f}-{max(t):.3f})", "", None)
            for name, t in cold.items()
        ],
        (
            "pipeline label / bare script cold start",
            f"{cold_ratio:.2f}x ({min(cold_ratios):.2f}-{max(cold_ratios):.2f}x)",
            "<= 1.1x",
            cold_ratio <= 1.1,
        ),
        ("training time (15 epochs)", f"{summary['train_seconds'] / 60:.1f} min", "", None),
        ("quantize time (float32 + int8)", f"{float32['convert_seconds'] + int8['convert_seconds']:.0f} s", "", None),
    ]
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    lines = [
        f"Benchmark of {run.name} on {machine}, {time.strftime('%Y-%m-%d')} (latency: median of {args.rounds} "
        f"alternating rounds of {len(pixels)} single-image runs, (lowest-highest round median); ratios: median "
        f"within each round or pair; cold start: median of {args.repeats} runs each, alternating)",
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
        json.dumps(
            {
                "latency_round_medians_ms": round_medians,
                "int8_float32_ratios": ratios,
                "cold_start_s": cold,
                "report": report,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
