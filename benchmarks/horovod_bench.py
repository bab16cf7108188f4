"""Data-parallel training measured in one run on this machine: 1 process against 2 Horovod workers at the same
model and global batch, fp16 against no compression, and the pipeline against a bare Horovod Keras script.

    python benchmarks/horovod_bench.py [--per-class 1000] [--batch-size 64] [--epochs 4]

Prints a table and writes it to benchmarks/results/horovod.md. Two CPU cores cannot show scaling: two workers
share the cores one process already uses; the GPU figures have to come from a machine that has GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PIPELINE = [sys.executable, "-m", "pipeline"]
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")


def pipeline_run(runs: Path, name: str, workers: int, batch_size: int, compression: str, args) -> dict:
    command = [
        *PIPELINE,
        "train",
        "--name",
        name,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(batch_size),
        "--compression",
        compression,
        "--set",
        f"runs_dir={runs}",
        "--set",
        f"max_images_per_class={args.per_class}",
    ]
    if workers > 1:
        command += ["--workers", str(workers)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    history = json.loads((runs / name / "metrics.json").read_text())
    summary = json.loads((runs / name / "summary.json").read_text())
    return {
        "images_per_second": statistics.median(row["images_per_second"] for row in history[1:]),
        "allreduce_bytes_per_step": history[0]["allreduce_bytes_per_step"],
        "fit_seconds": summary["train_seconds"],
    }


def bare_run(out: Path, batch_size: int, args) -> float:
    command = [
        HOROVODRUN,
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
        sys.executable,
        str(ROOT / "benchmarks" / "bare_horovod.py"),
        str(out),
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(args.epochs),
        "--per-class",
        str(args.per_class),
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return json.loads(out.read_text())["fit_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=1000, help="Fashion-MNIST images per class")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker; 1 process gets twice this")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="pipeline-vs-bare pairs, interleaved")
    args = parser.parse_args()
    B = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        alone = pipeline_run(runs, "alone", 1, 2 * B, "none", args)
        pair_none = pipeline_run(runs, "none", 2, B, "none", args)
        pair_fp16 = pipeline_run(runs, "fp16", 2, B, "fp16", args)
        pipeline_seconds, bare_seconds = [pair_fp16["fit_seconds"]], []
        for i in range(args.repeats):
            bare_seconds.append(bare_run(runs / f"bare{i}.json", B, args))
            if i:
                pipeline_seconds.append(pipeline_run(runs, f"again{i}", 2, B, "fp16", args)["fit_seconds"])
    overhead = statistics.median(pipeline_seconds) / statistics.median(bare_seconds) - 1
    rows = [
        (f"1 process, batch {2 * B}", f"{alone['images_per_second']:.0f}", "-", "1.00x"),
        (
            f"2 workers x batch {B}, no compression",
            f"{pair_none['images_per_second']:.0f}",
            f"{pair_none['allreduce_bytes_per_step'] / 1024:.0f} KiB",
            f"{pair_none['images_per_second'] / alone['images_per_second']:.2f}x",
        ),
        (
            f"2 workers x batch {B}, fp16",
            f"{pair_fp16['images_per_second']:.0f}",
            f"{pair_fp16['allreduce_bytes_per_step'] / 1024:.0f} KiB",
            f"{pair_fp16['images_per_second'] / alone['images_per_second']:.2f}x",
        ),
    ]
    lines = [
        f"Horovod on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: small_cnn, Fashion-MNIST "
        f"{args.per_class} images/class, global batch {2 * B}, {args.epochs} epochs; images/s = median over "
        "epochs 2.. (validation included)",
        "",
        "| setup | images/s (global) | allreduce bytes/step/worker | vs 1 process |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Pipeline (`pipeline train --workers 2`, fp16) against a bare Horovod Keras script of the same model: "
        f"model.fit wall time {statistics.median(pipeline_seconds):.1f} s against "
        f"{statistics.median(bare_seconds):.1f} s (medians of {len(pipeline_seconds)} and {len(bare_seconds)}), "
        f"overhead {100 * overhead:+.1f}% (target: within 5%).",
        "",
        "Two CPU cores cannot show scaling: two workers split the cores one process already uses, and pay for the "
        "allreduce on top. The GPU figures have to come from a machine with GPUs.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "horovod.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
