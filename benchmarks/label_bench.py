"""`pipeline label` against what a user would write instead, measured side by side in one interleaved run.

    python benchmarks/label_bench.py [--png-model runs/demo/export/demo_int8.tflite]
                                     [--photo-model runs/efficientnet_lite0/export/efficientnet_lite0_int8.tflite]
                                     [--rounds 15]

The baseline is benchmarks/bare_label.py: Pillow + ai-edge-litert, one image after another, in one process.
Every round runs each pair back to back (pipeline, bare; bare first in every other round), so machine noise hits
both; the table gives medians with the slowest and fastest round, and the ratio's median over the rounds.
- cold start: one photo (matplotlib's Grace Hopper, 512x600) as a JPEG, a PNG and a TIFF, labelled by the photo
  model, a fresh process each: one pair a round for each format;
- 1,000 Fashion-MNIST PNGs (written by `pipeline samples`) and 200 JPEG photos (crops of the public-domain photos
  inside the scikit-image and matplotlib wheels) at the photo model's input size: `pipeline label DIR` against
  the bare script given every file, whole runs, start-up included;
- in-process, the 1,000 PNGs: `Classifier.classify_batch` (one thread decoding) against the bare loop, the
  fastest of three alternating runs in each round.
Prints the table and writes it to benchmarks/results/label.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from serve import Classifier
from serve.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PIPELINE = str(Path(sys.executable).parent / "pipeline")
BARE = str(ROOT / "benchmarks" / "bare_label.py")
PHOTO_SOURCES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png"]
PHOTO_SOURCES += ["motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png"]
COLD_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif"}


def grace_hopper() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def write_formats(folder: Path) -> dict[str, Path]:
    """The Grace Hopper photo as each of COLD_FORMATS (Pillow's defaults: JPEG quality 75, uncompressed TIFF)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(grace_hopper()).convert("RGB")
    written = {}
    for name, suffix in COLD_FORMATS.items():
        written[name] = folder / f"grace_hopper{suffix}"
        photo.save(written[name])
    return written


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` JPEG photos: crops of 60-100% of each side of the public-domain photos inside the scikit-image and
    matplotlib wheels (300-1400 pixels a side), quality 90."""
    import skimage

    sources = [Path(skimage.__file__).parent / "data" / name for name in PHOTO_SOURCES]
    sources.append(grace_hopper())
    photos = [Image.open(path).convert("RGB") for path in sources if path.is_file()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = (int(side * rng.uniform(0.6, 1.0)) for side in photo.size)
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        written.append(folder / f"{i:04d}.jpg")
        photo.crop((left, top, left + width, top + height)).save(written[-1], quality=90)
    return written


def labels_beside(model: Path, folder: Path) -> Path:
    """A labels file for the bare script: labels.txt beside the model, else the bundle's own labels written out."""
    beside = model.parent / "labels.txt"
    if beside.is_file():
        return beside
    written = folder / f"{model.stem}_labels.txt"
    written.write_text("\n".join(Classifier(model).labels) + "\n")
    return written


# The commands run as on a user's machine: Python caches bytecode (pip compiles it at install) and buffers stdout.
# (PYTHONDONTWRITEBYTECODE would make `pipeline label` compile its own modules at every start.)
USER_ENV = {
    key: value for key, value in os.environ.items() if key not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")
}


def wall_time(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=USER_ENV)
    return time.perf_counter() - started


def bare_loop(interpreter, paths: list[Path], size: tuple[int, int], mode: str) -> list[int]:
    """benchmarks/bare_label.py's loop, in this process: the best label of each image."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    best = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert(mode).resize(size), dtype=np.uint8)
        pixels = pixels.reshape(1, size[1], size[0], -1)
        interpreter.set_tensor(inp["index"], pixels if inp["dtype"] == np.uint8 else pixels.astype(np.float32))
        interpreter.invoke()
        scores = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        scale, zero_point = out["quantization"]
        if scale:
            scores = (scores - zero_point) * scale
        best.append(int(np.argsort(-scores)[0]))
    return best


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png-model", type=Path, default=ROOT / "runs" / "demo" / "export" / "demo_int8.tflite")
    parser.add_argument(
        "--photo-model",
        type=Path,
        default=ROOT / "runs" / "efficientnet_lite0" / "export" / "efficientnet_lite0_int8.tflite",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of every pair")
    parser.add_argument("--pngs", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=200)
    args = parser.parse_args()
    for model, how in ((args.png_model, "make demo"), (args.photo_model, "pipeline pretrained efficientnet-lite0")):
        if not model.is_file():
            sys.exit(f"{model}: missing; run `{how}` first, or pass the model's path")

    with tempfile.TemporaryDirectory(prefix="label_bench_") as folder:
        measure(args, Path(folder))


def measure(args: argparse.Namespace, work: Path) -> None:
    pngs = work / "png"
    command = [PIPELINE, "samples", "--count", str(args.pngs), "--out", str(pngs)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    png_paths = sorted(pngs.glob("*.png"))
    photo_paths = write_photos(work / "photos", args.photos)
    png_labels, photo_labels = labels_beside(args.png_model, work), labels_beside(args.photo_model, work)

    def pair(folder: Path, paths: list[Path], model: Path, labels: Path) -> tuple[list[str], list[str]]:
        pipeline = [PIPELINE, "label", str(folder), "-m", str(model)]
        bare = [sys.executable, BARE, str(paths[0]), str(model), str(labels), *map(str, paths[1:])]
        return pipeline, bare

    cold_images = write_formats(work / "formats")
    commands = {
        f"cold start, 1 {name}": pair(path, [path], args.photo_model, photo_labels)
        for name, path in cold_images.items()
    }
    counts = {name: 1 for name in commands}
    png_run, photo_run = f"{len(png_paths)} Fashion-MNIST PNGs", f"{len(photo_paths)} JPEG photos"
    commands[png_run] = pair(pngs, png_paths, args.png_model, png_labels)
    commands[photo_run] = pair(work / "photos", photo_paths, args.photo_model, photo_labels)
    counts |= {png_run: len(png_paths), photo_run: len(photo_paths), "in-process, PNGs": len(png_paths)}
    for pipeline, bare in commands.values():  # warm the page cache and the bytecode cache, and check both run
        wall_time(pipeline), wall_time(bare)

    # In-process: the same 1,000 PNGs, classify_batch with one decoding thread against the bare loop.
    from ai_edge_litert.interpreter import Interpreter

    classifier = Classifier(args.png_model)
    interpreter = Interpreter(model_path=str(args.png_model))
    interpreter.allocate_tensors()
    size, mode = (classifier.width, classifier.height), "L" if classifier.channels == 1 else "RGB"
    bare_best = bare_loop(interpreter, png_paths, size, mode)
    agree = np.mean([p[0].index == b for p, b in zip(classifier.classify_batch(png_paths), bare_best)])

    load_before = os.getloadavg()[0]  # other processes on the machine: the pairs share their noise, the table says it
    seconds: dict[str, dict[str, list[float]]] = {name: {"pipeline": [], "bare": []} for name in commands}
    seconds["in-process, PNGs"] = {"pipeline": [], "bare": []}
    for round_number in range(args.rounds):
        for name, (pipeline, bare) in commands.items():
            # One pair a round; which side goes first alternates, so neither always runs on a cache the other warmed.
            pair_order = [("pipeline", pipeline), ("bare", bare)][:: 1 if round_number % 2 == 0 else -1]
            for side, command in pair_order:
                seconds[name][side].append(wall_time(command))
        # In-process loops of ~0.1 s: each side's fastest of three, alternating, so that a moment when another
        # process holds the CPU does not count as either side's speed.
        fastest = {"pipeline": math.inf, "bare": math.inf}
        for _ in range(3):
            started = time.perf_counter()
            classifier.classify_batch(png_paths, jobs=1)
            fastest["pipeline"] = min(fastest["pipeline"], time.perf_counter() - started)
            started = time.perf_counter()
            bare_loop(interpreter, png_paths, size, mode)
            fastest["bare"] = min(fastest["bare"], time.perf_counter() - started)
        for side, value in fastest.items():
            seconds["in-process, PNGs"][side].append(value)

    targets = {name: ("<= 1.1x the time", lambda r: r <= 1.1) for name in commands if name.startswith("cold start")}
    targets |= {
        png_run: (">= 1.5x images/s", lambda r: r >= 1.5),
        photo_run: (">= 1.5x images/s", lambda r: r >= 1.5),
        "in-process, PNGs": (">= 0.95x images/s", lambda r: r >= 0.95),
    }
    rows, summary = [], {}
    for name, times in seconds.items():
        pipeline, bare = times["pipeline"], times["bare"]
        if name.startswith("cold start"):
            # A time: smaller is better, the ratio is pipeline / bare.
            ratios = [p / b for p, b in zip(pipeline, bare)]
            values = (spread(pipeline, 3) + " s", spread(bare, 3) + " s")
        else:
            # A rate: larger is better, the ratio is pipeline / bare images/s.
            ratios = [b / p for p, b in zip(pipeline, bare)]
            rates = {side: [counts[name] / t for t in times[side]] for side in times}
            values = (spread(rates["pipeline"], 0) + " images/s", spread(rates["bare"], 0) + " images/s")
        ratio = statistics.median(ratios)
        target, met = targets[name]
        rows.append((name, *values, f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", target, met(ratio)))
        summary[name] = {"seconds": times, "images": counts[name], "ratio": ratio, "ratios": ratios, "target": target}

    # Start-up apart: the per-image rate of whole runs less the median cold start of each (the JPEG's: the photo
    # model's start-up, a little more than the 28x28 model's).
    cold = {side: statistics.median(seconds["cold start, 1 JPEG"][side]) for side in ("pipeline", "bare")}
    for name in (png_run, photo_run):
        after = {side: (counts[name] - 1) / (statistics.median(seconds[name][side]) - cold[side]) for side in cold}
        summary[name]["images_per_s_after_start_up"] = after
        note = "start-up apart (images/s)"
        rows.append((f"{name}, {note}", f"{after['pipeline']:.0f}", f"{after['bare']:.0f}", "", "", None))

    jobs = len(os.sched_getaffinity(0))
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    lines = [
        f"`pipeline label` against benchmarks/bare_label.py on {platform.machine()}, {jobs} cores ({load}), "
        f"{time.strftime('%Y-%m-%d')}: {args.rounds} interleaved rounds, median (slowest-fastest round). "
        f"PNG model {args.png_model.name} ({size[0]}x{size[1]}), photo model {args.photo_model.name}; "
        f"cold starts on the photo model, one 512x600 photo saved as each format; "
        f"pipeline decodes with {jobs} threads; top-1 agreement with the bare loop on the PNGs {100 * agree:.1f}%.",
        "",
        "| measure | pipeline | bare script | ratio (pipeline / bare) | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {name} | {p} | {b} | {ratio} | {target} | {'' if ok is None else ('yes' if ok else 'NO')} |"
            for name, p, b, ratio, target, ok in rows
        ],
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "label.md", table + "\n")
    write_atomic(RESULTS / "label.json", json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
