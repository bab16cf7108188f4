"""The streamed data cache, measured in one run on this machine: memory, training speed, ingest speed.

    python benchmarks/data_bench.py [--only memory|speed|ingest ...] [--small 2000] [--large 32000] [--rounds 2]
                                    [--steps 60] [--photos 1000] [--ingest-rounds 7]

1. Peak memory (the training process's peak RSS, from wait4) of `pipeline train --config image_folder
   --set input_size=64 --epochs 1` on folders of `--small` and `--large` 64x64 RGB JPEGs, the two interleaved,
   on a cold cache (ingest + training) and a warm one (training alone); the growth per 1,000 images.
2. Steady-state training images/s, interleaved round by round, same model and batch:
   Fashion-MNIST from the cache against the in-memory path the pipeline used before the cache (all images
   captured in one tensor, gathered per batch); and the JPEG folder from the cache against
   `tf_keras.utils.image_dataset_from_directory`, what a Keras user would reach for.
3. First ingest images/s (`load_dataset` into an empty cache: scan, decode on every core, hash, write) against a
   one-process loop decoding the same files through the same preprocessing, alternating round by round, a fresh
   cache each round: on `--photos` photo-sized JPEGs (500x375, ~90 KB, about ImageNet's average photo) at
   inputs 224 and 128, where decoding dominates, and on the `--small` 64x64 JPEGs at 64, where it does not.
4. What ImageNet (1.28M images at 224x224) would take, projected from the measured per-image figures.

Prints the tables and writes them to benchmarks/results/data.md (and data.json). With --only, just those parts
run; the other parts' last results are kept from data.json, each with the machine and date it was measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGENET_IMAGES = 1_281_167
IMAGENET_SIZE = 224
CLASSES = 10
PARTS = ("memory", "ingest", "speed")
PHOTO_SIZE = (500, 375)  # ImageNet's photos average about 470x390 pixels and 110 KB
INGEST_CASES = (("photos", 224), ("photos", 128), ("small", 64))  # (folder, input size)
INGEST_TARGET = 1.5  # x a one-process decode, for photo-sized JPEGs
# A pair (ingest, one process) during which other processes took more than this share of the cores is measured
# again, up to INGEST_RETRIES times: the ingest needs every core, the one-process loop only one.
INGEST_OTHERS_LIMIT = 0.1
INGEST_RETRIES = 5


def make_folder(root: Path, count: int, size: int = 64) -> Path:
    """`count` size x size RGB JPEGs in CLASSES sub-folders: a tinted square on noise, a class per tint."""
    rng = np.random.default_rng(0)
    tints = rng.integers(60, 256, (CLASSES, 3))
    for i in range(count):
        label = i % CLASSES
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        a, b = sorted(rng.integers(0, size, 2))
        pixels[a : b + 8, a : b + 8] = tints[label]
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def make_photos(root: Path, count: int) -> Path:
    """`count` photo-sized RGB JPEGs in CLASSES sub-folders: a smooth colour field with sensor-like noise, which
    JPEG codes to about 90 KB at quality 90, near the size of a photo of those dimensions."""
    rng = np.random.default_rng(1)
    width, height = PHOTO_SIZE
    for i in range(count):
        folder = root / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 18, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def cpu_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat: all states but idle and iowait)."""
    user, nice, system, idle, iowait, irq, softirq = (int(v) for v in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(command: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command, from the kernel's own accounting of that child."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


def train_command(folder: Path, runs: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--config",
        "image_folder",
        "--data",
        str(folder),
        "--name",
        name,
        "--epochs",
        "1",
        "--exist-ok",
        "--set",
        "input_size=64",
        "--set",
        f"runs_dir={runs}",
    ]


def memory(small: Path, large: Path, counts: tuple[int, int], rounds: int, work: Path) -> dict:
    rows = {n: {"cold": [], "warm": []} for n in counts}
    for round_ in range(rounds):
        for folder, count in ((small, counts[0]), (large, counts[1])):
            env = {**os.environ, "PIPELINE_CACHE": str(work / f"cache_{count}_{round_}")}
            for kind in ("cold", "warm"):  # cold: ingest then train; warm: the cache is there
                rss, seconds = peak_rss_mib(train_command(folder, work / "runs", f"m{count}"), env)
                rows[count][kind].append(rss)
                print(f"memory: {count} images, {kind} cache: peak RSS {rss:.0f} MiB ({seconds:.0f} s)", flush=True)
            shutil.rmtree(env["PIPELINE_CACHE"])
    return {n: {kind: statistics.median(values) for kind, values in kinds.items()} for n, kinds in rows.items()}


def fit_speed(model_fn, dataset, steps: int, batch_size: int) -> float:
    """Images/s of `steps` training steps of model.fit, after a warm-up fit that traces and fills the pipeline."""
    import tf_keras as keras

    model = model_fn()
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy())
    batches = dataset.repeat()
    model.fit(batches, steps_per_epoch=max(steps // 4, 2), epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - started)


def speed(folder: Path, rounds: int, steps: int, work: Path) -> dict:
    """Interleaved images/s: cache vs in-memory on Fashion-MNIST, cache vs image_dataset_from_directory."""
    import tensorflow as tf
    import tf_keras as keras

    from pipeline.config import load_config
    from train.batches import train_batches
    from train.data import load_dataset
    from train.models import build_model

    os.environ["PIPELINE_CACHE"] = str(work / "speed_cache")
    results: dict[str, list[float]] = {
        "fmnist cache": [],
        "fmnist in memory": [],
        "folder cache": [],
        "keras folder": [],
    }

    fmnist = load_config(None, {"batch_size": 128})
    fmnist_data = load_dataset(fmnist)
    all_images = fmnist_data.train_x[np.arange(len(fmnist_data.train_y))]  # the old path: the whole split in memory
    in_memory = tf.constant(all_images)
    labels_in_memory = tf.one_hot(fmnist_data.train_y, 10)

    def old_in_memory_batches() -> tf.data.Dataset:
        order = tf.random.shuffle(tf.range(len(fmnist_data.train_y)), seed=1)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(128, drop_remainder=True)
        return batches.map(
            lambda i: (tf.cast(tf.gather(in_memory, i), tf.float32), tf.gather(labels_in_memory, i))
        ).prefetch(tf.data.AUTOTUNE)

    folder_config = load_config(
        None, {"data": str(folder), "input_size": 64, "channels": 3, "batch_size": 32, "val_fraction": 0.1}
    )
    folder_data = load_dataset(folder_config)
    keras_folder = keras.utils.image_dataset_from_directory(
        folder, image_size=(64, 64), batch_size=32, label_mode="categorical", shuffle=True, seed=1
    ).prefetch(tf.data.AUTOTUNE)

    def categorical(dataset: tf.data.Dataset, classes: int) -> tf.data.Dataset:
        """The pipeline's batches with one-hot labels, whatever label form train_batches yields."""
        if len(dataset.element_spec[1].shape) == 2:
            return dataset
        return dataset.map(lambda x, y: (x, tf.one_hot(y, classes)))

    def fmnist_model():
        return build_model("small_cnn", 28, 1, 10, 1.0, 0.3)

    def folder_model():
        return build_model("small_cnn", 64, 3, CLASSES, 1.0, 0.3)

    pipelines = {
        "fmnist cache": (fmnist_model, lambda: categorical(train_batches(fmnist_data, fmnist, 0), 10), 128),
        "fmnist in memory": (fmnist_model, old_in_memory_batches, 128),
        "folder cache": (folder_model, lambda: categorical(train_batches(folder_data, folder_config, 0), CLASSES), 32),
        "keras folder": (folder_model, lambda: keras_folder, 32),
    }
    for round_ in range(rounds):
        for name, (model_fn, dataset_fn, batch_size) in pipelines.items():  # interleaved: A, B, C, D, A, B, ...
            results[name].append(fit_speed(model_fn, dataset_fn(), steps, batch_size))
            print(f"speed round {round_ + 1}: {name}: {results[name][-1]:.0f} images/s", flush=True)
    return results


def ingest(folders: dict[str, Path], rounds: int, work: Path) -> list[dict]:
    """Per case of INGEST_CASES, images/s and CPU ms per image of the first ingest into an empty cache against one
    process decoding the same files, the two alternating (A B, B A, ...) and the cases interleaved, round by round."""
    from pipeline.config import load_config
    from serve.preprocess import to_pixels
    from train.data import load_dataset

    cache = work / "ingest_cache"
    cases = []
    for kind, size in INGEST_CASES:
        files = sorted(folders[kind].rglob("*.jpg"))
        settings = {"data": str(folders[kind]), "input_size": size, "channels": 3, "cache_dir": str(cache)}
        case = {"data": kind, "input_size": size, "images": len(files), "files": files}
        case["config"] = load_config(None, settings)
        # "others cpu": the share of the machine's cores that other processes used while each side ran.
        series = ("ingest", "one process", "ingest cpu ms", "one process cpu ms", "others cpu")
        cases.append(case | {name: [] for name in series} | {"measured again": 0})

    def run_ingest(case: dict) -> None:
        captured = io.StringIO()  # the progress lines; the first says how many threads decode
        with contextlib.redirect_stderr(captured):
            load_dataset(case["config"])
        case["threads"] = int(re.search(r"decoding \d+ images \((\d+) thread", captured.getvalue()).group(1))

    def run_one_process(case: dict) -> None:
        size = case["input_size"]
        for path in case["files"]:
            to_pixels(path, size, size, 3)

    def measure(case: dict, order: list) -> dict[str, tuple[float, float, float]]:
        """name -> (images/s, CPU ms per image, share of the cores other processes took meanwhile)."""
        measured = {}
        for name, run in order:
            shutil.rmtree(cache, ignore_errors=True)  # every ingest is a first one
            started, cpu_started, busy_started = time.perf_counter(), time.process_time(), cpu_busy_seconds()
            run(case)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            others = (cpu_busy_seconds() - busy_started - cpu) / (seconds * os.cpu_count())
            measured[name] = (case["images"] / seconds, cpu / case["images"] * 1000, max(others, 0.0))
        return measured

    for round_ in range(rounds):
        for case in cases:
            pair = [("ingest", run_ingest), ("one process", run_one_process)]
            for attempt in range(1 + INGEST_RETRIES):
                measured = measure(case, pair if round_ % 2 == 0 else pair[::-1])
                others = max(share for _, _, share in measured.values())
                print(
                    f"ingest round {round_ + 1}: {case['images']} {case['data']} at {case['input_size']}: "
                    f"{measured['ingest'][0]:.0f} images/s ingest vs {measured['one process'][0]:.0f} one process "
                    f"(other processes took up to {others:.0%} of the cores)",
                    flush=True,
                )
                if others <= INGEST_OTHERS_LIMIT or attempt == INGEST_RETRIES:
                    break
                case["measured again"] += 1
                time.sleep(2)
            for name, (rate, cpu_ms, _) in measured.items():
                case[name].append(rate)
                case[f"{name} cpu ms"].append(cpu_ms)
            case["others cpu"].append(others)
    shutil.rmtree(cache, ignore_errors=True)
    return [{key: value for key, value in case.items() if key not in ("files", "config")} for case in cases]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def ingest_lines(part: dict) -> list[str]:
    rows = []
    for case in part["cases"]:
        ratios = [a / b for a, b in zip(case["ingest"], case["one process"])]
        ratio = statistics.median(case["ingest"]) / statistics.median(case["one process"])
        met = "met" if ratio >= INGEST_TARGET else "missed"
        target = f">= {INGEST_TARGET}x: {met}" if case["data"] == "photos" else "none"
        source = f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photos" if case["data"] == "photos" else "64x64 JPEGs"
        rows.append(
            f"| {case['images']:,} {source} -> {case['input_size']} | {spread(case['ingest'])} | "
            f"{spread(case['one process'])} | {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {target} | "
            f"{statistics.median(case['ingest cpu ms']):.3f} / {statistics.median(case['one process cpu ms']):.3f} | "
            f"{max(case['others cpu']):.0%} |"
        )
    threads = part["cases"][0]["threads"]
    again = sum(case["measured again"] for case in part["cases"])
    return [
        f"First ingest: `load_dataset` into an empty cache (scan the folder, decode in {threads} threads, hash each "
        "file, write and hash the shards, write the manifest) against one process decoding the same files with "
        f"`to_pixels`, alternating, a fresh cache each time; images/s, median (min-max) of {part['rounds']} rounds "
        f"(measured on {part['measured']}). The last column is the largest share of the cores that other processes "
        "took during a kept pair: the ingest needs every core, so above a few percent its figure is short "
        f"({again} pairs were measured again, other processes having taken over {INGEST_OTHERS_LIMIT:.0%}).",
        "",
        "| data -> input | ingest | one-process decode | ratio (per round) | target | CPU ms/image, ingest / decode "
        "| other processes' CPU, max |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
        *rows,
    ]


def render(results: dict) -> str:
    lines, projection = ["# The data cache", ""], []
    memory_part, speed_part, ingest_part = results.get("memory"), results.get("speed"), results.get("ingest")
    if memory_part:
        mem = {int(n): value for n, value in memory_part["peak_rss_mib"].items()}
        small, large = sorted(mem)
        growth = (mem[large]["warm"] - mem[small]["warm"]) / (large - small) * 1000
        projected_mib = mem[large]["warm"] + growth * (IMAGENET_IMAGES - large) / 1000
        imagenet_gib = IMAGENET_IMAGES * IMAGENET_SIZE * IMAGENET_SIZE * 3 / 2**30
        lines += [
            "Peak RSS of `pipeline train --config image_folder --set input_size=64 --epochs 1` (MobileNetV2-0.35), "
            f"median of {memory_part['rounds']} interleaved rounds (measured on {memory_part['measured']}):",
            "",
            "| images | cold cache (ingest + train) MiB | warm cache (train) MiB |",
            "| ---: | ---: | ---: |",
            *(f"| {n:,} | {mem[n]['cold']:.0f} | {mem[n]['warm']:.0f} |" for n in (small, large)),
            "",
            f"- {large:,} vs {small:,} images: {mem[large]['warm'] / mem[small]['warm']:.2f}x the peak (warm), "
            f"{mem[large]['cold'] / mem[small]['cold']:.2f}x (cold); target <= 1.25x; growth {growth:.1f} MiB per "
            "1,000 images",
            "",
        ]
        projection = [
            f"ImageNet projection ({IMAGENET_IMAGES:,} images at {IMAGENET_SIZE}x{IMAGENET_SIZE}): cache on disk "
            f"{imagenet_gib:.0f} GiB per host; training memory from the measured growth "
            f"~{projected_mib / 1024:.1f} GiB per process at this model and batch (the cache is read with pread: its "
            "pages are the kernel's page cache, not process memory).",
            "",
        ]
    if speed_part:
        rates = speed_part["images_per_second"]
        median = {name: statistics.median(values) for name, values in rates.items()}
        lines += [
            f"Training images/s of small_cnn, median (min-max) of {speed_part['rounds']} interleaved rounds of "
            f"{speed_part['steps']} steps (measured on {speed_part['measured']}):",
            "",
            "| data | pipeline (cache) | compared with | ratio |",
            "| --- | ---: | ---: | ---: |",
            f"| Fashion-MNIST, batch 128 | {spread(rates['fmnist cache'])} | in memory (before the cache): "
            f"{spread(rates['fmnist in memory'])} | {median['fmnist cache'] / median['fmnist in memory']:.2f}x "
            "(target >= 0.95x) |",
            f"| {speed_part['images']:,} JPEGs 64x64, batch 32 | {spread(rates['folder cache'])} | "
            f"image_dataset_from_directory: {spread(rates['keras folder'])} | "
            f"{median['folder cache'] / median['keras folder']:.2f}x (target >= 1x) |",
            "",
        ]
    if ingest_part:
        lines += [*ingest_lines(ingest_part), ""]
    return "\n".join(lines + projection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (may be repeated)")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the memory runs")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="training steps timed per speed measurement")
    parser.add_argument("--photos", type=int, default=1000, help="photo-sized JPEGs for the ingest")
    parser.add_argument("--ingest-rounds", type=int, default=7)
    args = parser.parse_args()
    parts = args.only or PARTS

    from pipeline.tensorflow_env import prepare
    from serve.files import write_atomic

    prepare()
    results = {}
    if args.only and (RESULTS / "data.json").exists():
        results = json.loads((RESULTS / "data.json").read_text())
    measured = f"{platform.node()}, {len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d')}"
    work = Path(tempfile.mkdtemp(prefix="data_bench_"))
    try:
        small = make_folder(work / "small", args.small)
        if "memory" in parts:
            large = make_folder(work / "large", args.large)
            mem = memory(small, large, (args.small, args.large), args.rounds, work)
            results["memory"] = {"measured": measured, "rounds": args.rounds, "peak_rss_mib": mem}
        if "ingest" in parts:
            folders = {"small": small, "photos": make_photos(work / "photos", args.photos)}
            cases = ingest(folders, args.ingest_rounds, work)
            results["ingest"] = {"measured": measured, "rounds": args.ingest_rounds, "cases": cases}
        if "speed" in parts:
            rates = speed(small, args.speed_rounds, args.steps, work)
            results["speed"] = {
                "measured": measured,
                "rounds": args.speed_rounds,
                "steps": args.steps,
                "images": args.small,
                "images_per_second": rates,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = render(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "data.md", text)
    write_atomic(RESULTS / "data.json", json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
