"""The streamed data cache, measured in one run on this machine: memory, training speed, ingest speed.

    python benchmarks/data_bench.py [--small 2000] [--large 32000] [--rounds 2] [--steps 60]

1. Peak memory (the training process's peak RSS, from wait4) of `pipeline train --config image_folder
   --set input_size=64 --epochs 1` on folders of `--small` and `--large` 64x64 RGB JPEGs, the two interleaved,
   on a cold cache (ingest + training) and a warm one (training alone); the growth per 1,000 images.
2. Steady-state training images/s, interleaved round by round, same model and batch:
   Fashion-MNIST from the cache against the in-memory path the pipeline used before the cache (all images
   captured in one tensor, gathered per batch); and the JPEG folder from the cache against
   `tf_keras.utils.image_dataset_from_directory`, what a Keras user would reach for.
3. First ingest images/s (decoding on every core into the cache) against a one-process decode loop of the same
   files through the same preprocessing, interleaved.
4. What ImageNet (1.28M images at 224x224) would take, projected from the measured per-image figures.

Prints a table and writes it to benchmarks/results/data.md (and data.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    from train.data import load_dataset
    from train.models import build_model
    from train.run import train_batches

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


def ingest(folder: Path, rounds: int, work: Path) -> dict:
    """Interleaved: the first ingest into an empty cache (all cores) vs one process decoding the same files."""
    from pipeline.config import load_config
    from serve.preprocess import to_pixels
    from train.data import load_dataset

    files = sorted(folder.rglob("*.jpg"))
    config = load_config(None, {"data": str(folder), "input_size": 64, "channels": 3})
    results: dict[str, list[float]] = {"ingest, all cores": [], "one-process decode": []}
    for round_ in range(rounds):
        cache = work / f"ingest_cache_{round_}"
        os.environ["PIPELINE_CACHE"] = str(cache)
        started = time.perf_counter()
        load_dataset(config)
        results["ingest, all cores"].append(len(files) / (time.perf_counter() - started))
        shutil.rmtree(cache)
        started = time.perf_counter()
        for path in files:
            to_pixels(path, 64, 64, 3)
        results["one-process decode"].append(len(files) / (time.perf_counter() - started))
        print(
            f"ingest round {round_ + 1}: {results['ingest, all cores'][-1]:.0f} vs "
            f"{results['one-process decode'][-1]:.0f} images/s",
            flush=True,
        )
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the memory runs")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="training steps timed per speed measurement")
    args = parser.parse_args()

    from pipeline.tensorflow_env import prepare

    prepare()
    work = Path(tempfile.mkdtemp(prefix="data_bench_"))
    try:
        small = make_folder(work / "small", args.small)
        large = make_folder(work / "large", args.large)
        mem = memory(small, large, (args.small, args.large), args.rounds, work)
        ingest_rates = ingest(small, args.speed_rounds, work)
        rates = speed(small, args.speed_rounds, args.steps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    growth = (mem[args.large]["warm"] - mem[args.small]["warm"]) / (args.large - args.small) * 1000
    ratio = mem[args.large]["warm"] / mem[args.small]["warm"]
    cold_ratio = mem[args.large]["cold"] / mem[args.small]["cold"]
    projected_mib = mem[args.large]["warm"] + growth * (IMAGENET_IMAGES - args.large) / 1000
    imagenet_gib = IMAGENET_IMAGES * IMAGENET_SIZE * IMAGENET_SIZE * 3 / 2**30
    median = {name: statistics.median(values) for name, values in {**rates, **ingest_rates}.items()}
    cache_vs_memory = median["fmnist cache"] / median["fmnist in memory"]
    cache_vs_keras = median["folder cache"] / median["keras folder"]
    ingest_ratio = median["ingest, all cores"] / median["one-process decode"]
    lines = [
        f"# The data cache ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})",
        "",
        "Peak RSS of `pipeline train --config image_folder --set input_size=64 --epochs 1` (MobileNetV2-0.35),",
        f"median of {args.rounds} interleaved rounds:",
        "",
        "| images | cold cache (ingest + train) MiB | warm cache (train) MiB |",
        "| ---: | ---: | ---: |",
        *(f"| {n:,} | {mem[n]['cold']:.0f} | {mem[n]['warm']:.0f} |" for n in (args.small, args.large)),
        "",
        f"- {args.large:,} vs {args.small:,} images: {ratio:.2f}x the peak (warm), {cold_ratio:.2f}x (cold); "
        f"target <= 1.25x; growth {growth:.1f} MiB per 1,000 images",
        "",
        f"Training images/s of small_cnn, median (min-max) of {args.speed_rounds} interleaved rounds of "
        f"{args.steps} steps:",
        "",
        "| data | pipeline (cache) | compared with | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| Fashion-MNIST, batch 128 | {spread(rates['fmnist cache'])} | in memory (before the cache): "
        f"{spread(rates['fmnist in memory'])} | {cache_vs_memory:.2f}x (target >= 0.95x) |",
        f"| {args.small:,} JPEGs 64x64, batch 32 | {spread(rates['folder cache'])} | image_dataset_from_directory: "
        f"{spread(rates['keras folder'])} | {cache_vs_keras:.2f}x (target >= 1x) |",
        "",
        f"First ingest of {args.small:,} JPEGs (64x64), images/s, median (min-max) of {args.speed_rounds} rounds: "
        f"{spread(ingest_rates['ingest, all cores'])} on all cores vs {spread(ingest_rates['one-process decode'])} "
        f"decoding in one process: {ingest_ratio:.2f}x (target >= 1.5x)",
        "",
        f"ImageNet projection ({IMAGENET_IMAGES:,} images at {IMAGENET_SIZE}x{IMAGENET_SIZE}): cache on disk "
        f"{imagenet_gib:.0f} GiB per host; training memory from the measured growth ~{projected_mib / 1024:.1f} GiB "
        "per process at this model and batch (the cache is read with pread: its pages are the kernel's page cache, "
        "not process memory).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.md").write_text(text)
    (RESULTS / "data.json").write_text(
        json.dumps(
            {"memory_mib": mem, "train_images_per_second": rates, "ingest_images_per_second": ingest_rates}, indent=2
        )
    )


if __name__ == "__main__":
    main()
