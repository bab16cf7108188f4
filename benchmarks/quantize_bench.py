"""`pipeline quantize RUN` (float32 + int8 bundles) against benchmarks/bare_quantize.py, a plain TFLiteConverter
script doing the same two conversions and the same 10,000-image evaluation: wall time of each in fresh
processes, alternating (pipeline, script, pipeline, ...), median and spread, and the ratio within each pair.

    python benchmarks/quantize_bench.py [--run runs/demo] [--repeats 5]

(after `make demo`; the run must be a Fashion-MNIST run). Prints a table and writes
benchmarks/results/quantize.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def wall_time(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command")
    args = parser.parse_args()
    if not (args.run / "best.keras").is_file():
        sys.exit(f"{args.run}: no trained model (best.keras); run `make demo` first")
    config = (args.run / "config.yaml").read_text()
    if "fashion-mnist" not in config:
        sys.exit(f"{args.run}: not a Fashion-MNIST run; the plain script reads Fashion-MNIST")

    from train.data import find_fashion_mnist

    data_dir = find_fashion_mnist(None)
    with tempfile.TemporaryDirectory() as scratch:
        commands = {
            "pipeline quantize": [str(Path(sys.executable).parent / "pipeline"), "quantize", str(args.run)],
            "plain TFLiteConverter script": [
                sys.executable,
                str(ROOT / "benchmarks" / "bare_quantize.py"),
                str(args.run / "best.keras"),
                str(data_dir),
                scratch,
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(wall_time(command))
    pipeline, plain = times["pipeline quantize"], times["plain TFLiteConverter script"]
    ratios = [a / b for a, b in zip(pipeline, plain)]
    ratio = statistics.median(ratios)
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    lines = [
        f"`pipeline quantize` (float32 + int8) against a plain TFLiteConverter script, {args.run.name}, {machine}, "
        f"{time.strftime('%Y-%m-%d')}: wall seconds over {args.repeats} runs each, alternating",
        "",
        "| command | median s | fastest - slowest |",
        "| --- | --- | --- |",
        *[f"| {name} | {statistics.median(t):.1f} | {min(t):.1f} - {max(t):.1f} |" for name, t in times.items()],
        f"| ratio within each pair | {ratio:.2f}x | {min(ratios):.2f}x - {max(ratios):.2f}x (target <= 1.1x: "
        f"{'met' if ratio <= 1.1 else 'NOT met'}) |",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantize.md").write_text(table + "\n")
    (RESULTS / "quantize.json").write_text(json.dumps({"seconds": times, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
