"""EfficientNet-Lite0 at 224x224: size and per-image latency of the float32, float16 and int8 bundles in
ai-edge-litert with 1 and 2 threads, measured in one run (alternating rounds: medians and spread), beside TensorFlow's
published Pixel 4 figures for the same model (6.5 ms int8, 12 ms float32), the phone reference.

With --plain-int8 it also converts the run's model to int8 without the high-fidelity step (every layer int8, weight
bias correction only; about a minute) and times it in the same rounds: what keeping the sensitive layers in float
costs the int8 bundle.

    python benchmarks/pretrained_bench.py [--run runs/efficientnet_lite0] [--plain-int8]

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
    parser.add_argument("--plain-int8", action="store_true", help="also time int8 without float layers (converts)")
    args = parser.parse_args()
    bundles = {mode: args.run / "export" / f"{args.run.name}_{mode}.tflite" for mode in ("float32", "float16", "int8")}
    if not all(path.is_file() for path in bundles.values()):
        sys.exit(f"{args.run}: bundles missing; run `pipeline pretrained efficientnet-lite0` first")
    sources: dict[str, Path | bytes] = dict(bundles)
    if args.plain_int8:
        sources["int8 plain"] = plain_int8(args.run)
    sizes = {
        mode: len(source) if isinstance(source, bytes) else source.stat().st_size for mode, source in sources.items()
    }
    models = {
        (mode, threads): Classifier(source, num_threads=threads, verify_checksum=isinstance(source, Path))
        for mode, source in sources.items()
        for threads in (1, 2)
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
    for mode in sources:
        cells = []
        for threads in (1, 2):
            medians = round_medians[(mode, threads)]
            ratios = [a / b for a, b in zip(medians, round_medians[("float32", threads)])]
            ratio = f", {statistics.median(ratios):.2f}x float32" if mode != "float32" else ""
            cells.append(f"{statistics.median(medians):.2f} ms ({min(medians):.2f}-{max(medians):.2f}){ratio}")
        phone = f"{PIXEL4_MS[mode]} ms" if mode in PIXEL4_MS else "-"
        lines.append(f"| {mode} | {sizes[mode] / 2**20:.2f} MiB | {cells[0]} | {cells[1]} | {phone} |")
    if args.plain_int8:
        for threads in (1, 2):
            ratios = [a / b for a, b in zip(round_medians[("int8", threads)], round_medians[("int8 plain", threads)])]
            lines.append(
                f"\nint8 bundle / int8 plain, {threads} thread(s): {statistics.median(ratios):.3f}x "
                f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
            )
    table = "\n".join(lines)
    print(table)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "pretrained.md").write_text(table + "\n")
    (ROOT / "benchmarks" / "results" / "pretrained.json").write_text(
        json.dumps({f"{mode} x{threads}": values for (mode, threads), values in round_medians.items()}, indent=2)
    )


def plain_int8(run: Path) -> bytes:
    """The run's model as int8 with every layer integer: the conversion before its high-fidelity step."""
    from pipeline.tensorflow_env import prepare

    prepare()
    import tf_keras as keras

    from quantize.client_input import for_clients
    from quantize.convert import post_training_int8
    from train.pretrained import calibration_images

    model = keras.models.load_model(run / "best.keras", compile=False)
    return post_training_int8(for_clients(model), calibration_images(), agreement_target=0.0)


if __name__ == "__main__":
    main()
