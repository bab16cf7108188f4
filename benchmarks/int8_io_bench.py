"""Does the int8 model's input/output type change its speed? XNNPACK runs an int8 graph's QUANTIZE (uint8 -> int8
input) and int8 SOFTMAX outside its partition; int8 input or a float32 output (softmax in float) could keep them
inside. Each variant of the same model is converted here and timed against the others and float32 in alternating
rounds (median, and the lowest and highest round median), 1 and 2 threads.

    python benchmarks/int8_io_bench.py [--run runs/efficientnet_lite0] [--run runs/demo] [--rounds 10]

Variants: the input clients can feed (MediaPipe Tasks, LiteRT.js and the Task Library take uint8 or float32,
not int8) and the output (int8 softmax in steps of 1/256, or float32 scores from a float softmax). Prints a table
and writes benchmarks/results/int8_io.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.tensorflow_env import prepare

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# name: (input type, output type, softmax in float)
VARIANTS = {
    "uint8 in, uint8 out (int8 softmax)": ("uint8", "uint8", False),
    "int8 in, int8 out (int8 softmax)": ("int8", "int8", False),
    "uint8 in, float32 out (float softmax): the bundles": ("uint8", "float32", True),
    "int8 in, float32 out (float softmax)": ("int8", "float32", True),
    "float32 in, float32 out (float softmax)": ("float32", "float32", True),
}


def variants(run: Path) -> dict[str, bytes]:
    """float32 and every VARIANTS conversion of the run's model, behind the bundles' batch-1 RGB input."""
    import tensorflow as tf
    import tf_keras as keras

    from quantize.client_input import for_clients
    from quantize.tflite_internals import softmax_in_float

    model = for_clients(keras.models.load_model(run / "best.keras", compile=False))
    # Activation ranges do not change the speed: a few random images calibrate.
    calibration = np.random.default_rng(0).integers(0, 256, (8, *model.input_shape[1:])).astype(np.float32)
    models = {"float32": tf.lite.TFLiteConverter.from_keras_model(model).convert()}
    for name, (input_type, output_type, float_softmax) in VARIANTS.items():
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = getattr(tf, input_type)
        converter.inference_output_type = getattr(tf, output_type)
        flat = converter.convert()
        models[name] = softmax_in_float(flat) if float_softmax else flat
    return models


def interleaved_latency(models: dict[str, bytes], threads: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """Per model, the median ms of each round; every round times all models in turn (order reversed every other
    round), `runs` invocations each after 3 warm-up ones."""
    from ai_edge_litert.interpreter import Interpreter

    interpreters = {}
    for name, flat in models.items():
        interpreter = Interpreter(model_content=flat, num_threads=threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        pixels = np.random.default_rng(1).integers(0, 256, detail["shape"])
        value = pixels - 128 if detail["dtype"] == np.int8 else pixels
        interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]))
        interpreters[name] = interpreter
    medians: dict[str, list[float]] = {name: [] for name in models}
    for round_number in range(rounds):
        order = list(interpreters) if round_number % 2 == 0 else list(reversed(interpreters))
        for name in order:
            interpreter, times = interpreters[name], []
            for i in range(runs + 3):
                started = time.perf_counter()
                interpreter.invoke()
                if i >= 3:
                    times.append(1000 * (time.perf_counter() - started))
            medians[name].append(statistics.median(times))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", help="run directories (default: both below)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20, help="timed invocations per model per round")
    args = parser.parse_args()
    runs = args.run or [ROOT / "runs" / "efficientnet_lite0", ROOT / "runs" / "demo"]
    missing = [str(run) for run in runs if not (run / "best.keras").is_file()]
    if missing:
        sys.exit(f"{', '.join(missing)}: no best.keras; run `pipeline pretrained efficientnet-lite0` / `make demo`")
    prepare()
    lines = [
        f"int8 input/output types on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: ms per image (ai-edge-"
        f"litert, XNNPACK), median of {args.rounds} alternating rounds of {args.runs} runs, (lowest-highest round "
        "median), and the ratio to float32 within each round (median)",
        "",
        "| model | variant | 1 thread | / float32 | 2 threads | / float32 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    for run in runs:
        models = variants(run)
        by_threads = {threads: interleaved_latency(models, threads, args.rounds, args.runs) for threads in (1, 2)}
        results[run.name] = by_threads
        for name in models:
            cells = []
            for threads in (1, 2):
                medians, reference = by_threads[threads][name], by_threads[threads]["float32"]
                ratio = statistics.median(a / b for a, b in zip(medians, reference))
                cells.append(f"{statistics.median(medians):.3f} ({min(medians):.3f}-{max(medians):.3f})")
                cells.append(f"{ratio:.2f}x")
            lines.append(f"| {run.name} | {name} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_io.md").write_text(table + "\n")
    (RESULTS / "int8_io.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
