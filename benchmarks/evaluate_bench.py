"""`pipeline evaluate` against what a user would write instead, measured side by side in one interleaved run.

    python benchmarks/evaluate_bench.py [--model runs/demo/export/demo_int8.tflite] [--rounds 7] [--images 10000]

The baseline is benchmarks/bare_evaluate.py: Pillow + ai-edge-litert + numpy metrics, one image after another, in
one process. Both evaluate the Fashion-MNIST test images (written by `pipeline samples` as PNGs, then sorted into
one folder per class) with the same int8 bundle, whole runs, start-up included; `pipeline evaluate` also writes its
confusion matrix PNG and evaluation.json. Every round runs the pair back to back, the bare script first in every
other round, so machine noise hits both; the table gives medians with the slowest and fastest round, and the
ratio's median over the rounds. Prints the table and writes it to benchmarks/results/evaluate.md.
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
PIPELINE = str(Path(sys.executable).parent / "pipeline")
BARE = str(ROOT / "benchmarks" / "bare_evaluate.py")
# As on a user's machine: Python caches bytecode (pip compiles it at install) and buffers stdout.
USER_ENV = {
    key: value for key, value in os.environ.items() if key not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")
}


def class_folders(work: Path, count: int) -> Path:
    """`count` Fashion-MNIST test PNGs from `pipeline samples`, moved into one folder per class, named as the
    samples' file names spell the class (0000_ankle_boot.png goes to ankle_boot/)."""
    flat, folder = work / "flat", work / "images"
    subprocess.run(
        [PIPELINE, "samples", "--count", str(count), "--out", str(flat)], check=True, stdout=subprocess.DEVNULL
    )
    for png in flat.glob("*.png"):
        target = folder / png.stem.split("_", 1)[1] / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        png.replace(target)
    return folder


def wall_time(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=USER_ENV)
    return time.perf_counter() - started, result.stdout


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "export" / "demo_int8.tflite")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the pair")
    parser.add_argument("--images", type=int, default=10_000, help="Fashion-MNIST test images (at most 10,000)")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model}: missing; run `make demo` (or pipeline train + quantize) first, or pass --model")
    with tempfile.TemporaryDirectory(prefix="evaluate_bench_") as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    folder = class_folders(work, args.images)
    labels = args.model.parent / "labels.txt"
    if not labels.is_file():
        from serve import Classifier

        labels = work / "labels.txt"
        labels.write_text("\n".join(Classifier(args.model).labels) + "\n")
    out = work / "evaluation"
    sides = {
        "pipeline": [PIPELINE, "evaluate", str(folder), "-m", str(args.model), "--out", str(out), "--worst", "10"],
        "bare": [sys.executable, BARE, str(folder), str(args.model), str(labels)],
    }
    # Warm the page cache and the bytecode cache, and check that both see the same images and agree.
    wall_time(sides["pipeline"])
    _, bare_output = wall_time(sides["bare"])
    evaluation = json.loads((out / "evaluation.json").read_text())
    figures = next(iter(evaluation["bundles"].values()))
    bare_top1 = float(bare_output.split()[1])
    if evaluation["images"] != args.images or abs(bare_top1 - figures["top1"]) > 1e-4:
        sys.exit(f"the two disagree: pipeline {evaluation['images']} images, top-1 {figures['top1']}; bare {bare_top1}")

    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"pipeline": [], "bare": []}
    for round_number in range(args.rounds):
        order = ["pipeline", "bare"] if round_number % 2 == 0 else ["bare", "pipeline"]
        for side in order:
            seconds[side].append(wall_time(sides[side])[0])
    ratios = [b / p for p, b in zip(seconds["pipeline"], seconds["bare"])]
    rates = {side: [args.images / t for t in times] for side, times in seconds.items()}
    ratio = statistics.median(ratios)

    cores = len(os.sched_getaffinity(0))
    load_after = os.getloadavg()[0]
    load = f"load average {load_before:.1f} at the start, {load_after:.1f} at the end"
    if max(load_before, load_after) > cores / 2:
        load += "; a shared machine, other jobs running meanwhile"
    lines = [
        f"`pipeline evaluate` against benchmarks/bare_evaluate.py on {platform.machine()}, {cores} cores ({load}), "
        f"{time.strftime('%Y-%m-%d')}: {args.rounds} interleaved rounds, "
        f"whole runs with start-up, median (slowest-fastest round). {args.images} Fashion-MNIST test PNGs in 10 class "
        f"folders, bundle {args.model.name}; pipeline decodes in {cores} processes and also writes the confusion "
        f"matrix PNG and evaluation.json. Both report top-1 {figures['top1']:.4f}.",
        "",
        "| measure | pipeline evaluate | bare script | ratio (pipeline / bare images/s) | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {args.images} PNGs, seconds | {spread(seconds['pipeline'], 2)} | {spread(seconds['bare'], 2)} | | | |",
        f"| {args.images} PNGs, images/s | {spread(rates['pipeline'], 0)} | {spread(rates['bare'], 0)} | "
        f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | >= 1.5x | {'yes' if ratio >= 1.5 else 'NO'} |",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from serve.files import write_atomic

    write_atomic(RESULTS / "evaluate.md", table + "\n")


if __name__ == "__main__":
    main()
