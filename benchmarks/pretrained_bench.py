"""EfficientNet-Lite0, Lite1 and Lite2 at their own input sizes (224, 240, 260): size and per-image latency of the
float32, float16 and int8 bundles in ai-edge-litert with 1 and 2 threads, all models measured in the same alternating
rounds (medians and spread), beside TensorFlow's published Pixel 4 figures for Lite0 (6.5 ms int8, 12 ms float32);
and how faithful int8 is to float32 on HELD_OUT_CROPS random crops of each sample photo that the int8 calibration did
not see: top-1 agreement, top-5 overlap, and the crops where two of int8's top-10 classes score exactly the same
while float32's scores for them differ by more than 1% (train.pretrained.tied_apart). Targets: agreement >= 95%,
no such ties.

With --plain-int8 it also converts each model to int8 without the high-fidelity step (every layer int8, weight bias
correction only; minutes each) and times it in the same rounds: what keeping the sensitive layers in float costs.

    python benchmarks/pretrained_bench.py [--runs-dir runs] [--models efficientnet_lite0 ...] [--plain-int8]

(after `pipeline pretrained efficientnet-lite0`, `... efficientnet-lite1` and `... efficientnet-lite2`).
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

from serve import Classifier

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MODES = ("float32", "float16", "int8")
PIXEL4_MS = {("efficientnet_lite0", "int8"): 6.5, ("efficientnet_lite0", "float32"): 12.0}
# 30 crops of each of the 17 sample photos: 510 images, from a seed that neither the calibration (1) nor the export's
# own held-out check (2) uses.
HELD_OUT_CROPS, HELD_OUT_SEED = 30, 3
AGREEMENT_TARGET = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where runs/<model>/export/ are")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--plain-int8", action="store_true", help="also time int8 without float layers (converts)")
    args = parser.parse_args()
    bundles = {
        (model, mode): args.runs_dir / model / "export" / f"{model}_{mode}.tflite"
        for model in args.models
        for mode in MODES
    }
    missing = sorted({model for (model, _), path in bundles.items() if not path.is_file()})
    if missing:
        sys.exit(f"{args.runs_dir}: bundles missing; run `pipeline pretrained {missing[0].replace('_', '-')}` first")

    from pipeline.tensorflow_env import prepare

    prepare()  # train.pretrained loads TensorFlow (for the crops' helpers only)
    from train.pretrained import random_crops, sample_photos, tied_apart

    sources: dict[tuple[str, str], Path | bytes] = dict(bundles)
    if args.plain_int8:
        for model in args.models:
            sources[(model, "int8 plain")] = plain_int8(args.runs_dir / model)
    load_before = os.getloadavg()[0]
    fidelity, input_sizes = {}, {}
    for model in args.models:
        classifier = Classifier(bundles[(model, "float32")], num_threads=2)
        input_sizes[model] = classifier.height
        crops = random_crops(sample_photos(), HELD_OUT_CROPS, classifier.height, HELD_OUT_SEED)
        reference = classifier.predict(crops)
        fidelity[model] = {
            mode: agreement(Classifier(bundles[(model, mode)], num_threads=2).predict(crops), reference, tied_apart)
            for mode in ("float16", "int8")
        }
    latency, sizes = time_rounds(sources, args.rounds)
    load_after = os.getloadavg()[0]

    lines = [
        f"EfficientNet-Lite0-2 on {os.cpu_count()} CPU cores (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after), {time.strftime('%Y-%m-%d')}: ms per image (serve.Classifier, ai-edge-litert), "
        f"median of {args.rounds} rounds of 20 runs alternating over every model and bundle (lowest-highest round "
        "median); x float32: the same model's float32 in the same round (median of the rounds' ratios)",
        "",
        "| model | input | bundle | size | 1 thread | 2 threads | Pixel 4 (TensorFlow's published figure) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, mode in sources:
        cells = []
        for threads in (1, 2):
            medians = latency[(model, mode, threads)]
            ratios = [a / b for a, b in zip(medians, latency[(model, "float32", threads)])]
            ratio = f", {statistics.median(ratios):.2f}x float32" if mode != "float32" else ""
            cells.append(f"{statistics.median(medians):.2f} ms ({min(medians):.2f}-{max(medians):.2f}){ratio}")
        phone = f"{PIXEL4_MS[(model, mode)]} ms" if (model, mode) in PIXEL4_MS else "-"
        size = f"{sizes[(model, mode)] / 2**20:.2f} MiB"
        lines.append(f"| {model} | {input_sizes[model]} | {mode} | {size} | {cells[0]} | {cells[1]} | {phone} |")
    crops = len(sample_photos()) * HELD_OUT_CROPS
    lines += [
        "",
        f"Fidelity to float32 on {crops} held-out crops ({HELD_OUT_CROPS} random crops of each sample photo, seed "
        f"{HELD_OUT_SEED}, unseen by the int8 calibration); target: int8 agreement >= {AGREEMENT_TARGET:.0%} and no "
        "crop with exact ties where float32 differs by > 1%",
        "",
        "| model | bundle | top-1 agreement | top-5 overlap | crops with such ties | target met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in args.models:
        for mode, result in fidelity[model].items():
            met = result["agreement"] >= AGREEMENT_TARGET and result["tied_crops"] == 0
            lines.append(
                f"| {model} | {mode} | {result['agreement']:.1%} | {result['top5_overlap']:.3f} | "
                f"{result['tied_crops']} | {'yes' if met else 'no'} |"
            )
    if args.plain_int8:
        lines.append("")
        for model in args.models:
            for threads in (1, 2):
                ratios = [
                    a / b for a, b in zip(latency[(model, "int8", threads)], latency[(model, "int8 plain", threads)])
                ]
                lines.append(
                    f"{model} int8 bundle / int8 plain, {threads} thread(s): {statistics.median(ratios):.3f}x "
                    f"(rounds {min(ratios):.3f}-{max(ratios):.3f})  "
                )
    table = "\n".join(lines)
    print(table)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "pretrained.md").write_text(table + "\n")
    (results / "pretrained.json").write_text(
        json.dumps(
            {
                "latency_round_medians_ms": {
                    f"{model} {mode} x{threads}": values for (model, mode, threads), values in latency.items()
                },
                "sizes_bytes": {f"{model} {mode}": size for (model, mode), size in sizes.items()},
                "fidelity": fidelity,
            },
            indent=2,
        )
    )


def agreement(scores: np.ndarray, reference: np.ndarray, tied_apart) -> dict:
    """How `scores` (a bundle's, one row per crop) follow `reference` (float32's on the same crops)."""
    top5 = np.argsort(-scores, axis=1)[:, :5]
    reference_top5 = np.argsort(-reference, axis=1)[:, :5]
    return {
        "agreement": float(np.mean(scores.argmax(axis=1) == reference.argmax(axis=1))),
        "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, reference_top5)])),
        "tied_crops": sum(bool(tied_apart(row, reference_row)) for row, reference_row in zip(scores, reference)),
    }


def time_rounds(sources: dict, rounds: int) -> tuple[dict, dict]:
    """Per (model, mode, threads), each round's median ms per image, every bundle taking its turn in each round (the
    order reversed every other round, so machine noise falls on every bundle alike); and the bundles' sizes."""
    sizes = {
        key: len(source) if isinstance(source, bytes) else source.stat().st_size for key, source in sources.items()
    }
    classifiers = {
        (model, mode, threads): Classifier(source, num_threads=threads, verify_checksum=isinstance(source, Path))
        for (model, mode), source in sources.items()
        for threads in (1, 2)
    }
    photo = ROOT / "tests" / "data" / "grace_hopper.jpg"
    pixels = {key: classifier.preprocess(photo)[None] for key, classifier in classifiers.items()}
    round_medians: dict[tuple, list[float]] = {key: [] for key in classifiers}
    for round_number in range(rounds):
        for key in list(classifiers) if round_number % 2 == 0 else list(reversed(classifiers)):
            times = []
            for i in range(25):
                started = time.perf_counter()
                classifiers[key].predict(pixels[key])
                if i >= 5:  # the first runs of a turn warm caches
                    times.append(1000 * (time.perf_counter() - started))
            round_medians[key].append(statistics.median(times))
    return round_medians, sizes


def plain_int8(run: Path) -> bytes:
    """The run's model as int8 with every layer integer: the conversion before its high-fidelity step."""
    import tf_keras as keras

    from quantize.client_input import for_clients
    from quantize.convert import post_training_int8
    from train.pretrained import calibration_images

    model = keras.models.load_model(run / "best.keras", compile=False)
    return post_training_int8(for_clients(model), calibration_images(model.input_shape[1]), agreement_target=0.0)


if __name__ == "__main__":
    main()
