"""The jobs that join the stages: train a run, quantise it, export the pretrained ImageNet model, write samples,
list and remove data caches.

Plain functions with keyword arguments, so that scripts and notebooks can call what the CLI calls. Each loads
TensorFlow only when called (after `tensorflow_env.prepare()`), so importing this module stays cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, config_file_path, inside_runs_dir, load_config, train_config
from pipeline.tensorflow_env import prepare
from quantize import SENSITIVE_STEPS
from serve.errors import PipelineError
from train.rundir import RunDir

if TYPE_CHECKING:  # annotations only, imported where used: importing this module stays cheap
    from quantize.export import Trained
    from train.launch import LaunchOptions


def train_run(
    config_path: str | None = None,
    *,
    settings: dict | None = None,
    resume: bool = False,
    exist_ok: bool = False,
    verify_data: bool = False,
    launch: LaunchOptions | None = None,
) -> None:
    """Train the config file at `config_path` (a path, or a name in configs/; default fashion_mnist) with `settings`
    over it, into runs_dir/name/; `resume` continues that run (pipeline.config.train_config), `exist_ok` starts it
    over, `verify_data` first checks the data cache against every source file.

    `launch` (train.launch.LaunchOptions) says how: by default alone, or as whichever launcher (horovodrun, mpirun,
    srun) started this process wants; or as the launcher and supervisor of its own workers, each running this same
    training as `python -m pipeline train`. The config is checked here, before any worker starts. Raises
    train.launch.LaunchOptionsError for a Slurm task asked to start workers; StoppedError when a signal stopped the
    training with its checkpoint (continue with resume=True)."""
    import dataclasses
    import json

    from train.launch import LaunchOptions, elastic_conflict, run_job

    settings = settings or {}
    config = train_config(config_path, settings, resume=resume)
    conflict = elastic_conflict(config) if launch and launch.min_workers else None
    if conflict:
        raise ConfigError(conflict)
    # What each worker runs, when this process starts workers: the same config file and settings, so all train the
    # same thing.
    arguments = ["train", *(["--resume"] if resume else []), *(["--exist-ok"] if exist_ok else [])]
    arguments += ["--verify-data"] if verify_data else []
    if not resume or config_path is not None:
        arguments += ["--config", config_file_path(config_path)]
    for key, value in settings.items():
        arguments += ["--set", f"{key}={json.dumps(value)}"]
    worker_command = (sys.executable, "-m", "pipeline", *arguments)
    launch = dataclasses.replace(launch or LaunchOptions(), worker_command=worker_command)

    def train_here() -> None:
        prepare()
        from train.data import verify_data as verify
        from train.run import train

        if verify_data:
            verify(config)
        train(config, resume=resume, exist_ok=exist_ok)

    run_job(launch, train_here)


class GateRefused(PipelineError):
    """An integer bundle lost more top-1 accuracy than the budget allows, so it was not written."""


def quantize_run(
    run_dir: str | Path,
    *,
    modes: Sequence[str] = ("int8",),
    calibration_images: int = 500,
    budget: float = 1.0,
    qat_epochs: int = 2,
    num_threads: int = 1,
    sensitive_steps: float = SENSITIVE_STEPS,
) -> dict:
    """Bundles of a trained run in run_dir/export/ and its report (see quantize.export.export_bundles).

    int8 ranges come from a stratified sample of `calibration_images` training images; the gate measures top-1 on
    the data's test split (its validation split when the data has none). Raises GateRefused, after writing the
    float32 bundle and the report, when a quantised bundle loses more than `budget` points.
    """
    run = RunDir(Path(run_dir))
    if not run.config_file.is_file():
        raise PipelineError(f"{run}: not a run directory (no {run.config_file.name}); train one with pipeline train")
    config = load_config(run.config_file)
    prepare()
    from quantize.export import QuantizeData, export_bundles
    from train.data import load_dataset, stratified_sample

    with run.lock("quantizing"):
        trained = trained_run(run, modes, config)
        data = load_dataset(config, train_in_memory="qat" in modes)  # QAT trains; the rest calibrates on a few
        held_out = (data.test_x, data.test_y, "test") if data.test_y is not None else (data.val_x, data.val_y, "val")
        quantize_data = QuantizeData(
            class_names=data.class_names,
            calibration=data.train_x[stratified_sample(data.train_y, calibration_images, config["seed"])],
            eval_x=held_out[0],
            eval_y=held_out[1],
            eval_split=held_out[2],
            train_x=data.train_x,
            train_y=data.train_y,
        )
        report = export_bundles(
            trained,
            quantize_data,
            modes=modes,
            budget=budget,
            qat_epochs=qat_epochs,
            num_threads=num_threads,
            sensitive_steps=sensitive_steps,
        )
    if report["rejected"]:
        raise GateRefused(
            f"{run}: {', '.join(report['rejected'])} lost more than {budget} points of top-1 accuracy; "
            "bundle not written (try --mode qat, more --calibration-images, or a larger --budget)"
        )
    return report


def export_pretrained(
    *,
    model: str = "efficientnet_lite0",
    name: str = "efficientnet_lite0",
    modes: Sequence[str] = ("int8", "float16"),
    calibration_dirs: Sequence[str | Path] = (),
    num_threads: int = 1,
    runs_dir: str | Path = "runs",
    sensitive_steps: float = SENSITIVE_STEPS,
) -> dict:
    """EfficientNet-Lite `model` (efficientnet_lite0, 1 or 2) with its ImageNet weights as bundles in
    runs_dir/name/export/, and the report.

    int8 is calibrated on views of the photos that installed packages ship, plus every image in `calibration_dirs`;
    each bundle is compared with float32 on the whole sample photos and on crops of them that calibration did not
    see (there are no labels to gate on).
    """
    if not inside_runs_dir(name, str(runs_dir)):
        raise ConfigError(f"name={name!r}: must name a directory inside {runs_dir} (no '/', no leading '.')")
    prepare()
    from quantize.export import QuantizeData, export_bundles
    from train.efficientnet_lite import imagenet_labels, input_size
    from train.pretrained import calibration_images, create_run, held_out_crops, sample_photo_pixels

    run = RunDir(Path(runs_dir) / name)
    with run.lock("exporting"):
        create_run(run, model)
        size = input_size(model)
        data = QuantizeData(
            class_names=imagenet_labels(),
            calibration=calibration_images(size, [Path(d) for d in calibration_dirs]),
            eval_x=sample_photo_pixels(size),
            eval_y=None,
            eval_split="sample photo",
            holdout_x=held_out_crops(size),
        )
        trained = trained_run(run, modes)
        return export_bundles(
            trained,
            data,
            modes=modes,
            budget=float("inf"),
            qat_epochs=0,
            num_threads=num_threads,
            sensitive_steps=sensitive_steps,
        )


def trained_run(run: RunDir, modes: Sequence[str], config: dict | None = None) -> Trained:
    """What quantize/ needs of `run` (a train.rundir.RunDir; quantize knows no run's layout): its model, config
    (`config` when the caller has read it already) and summary, and where the bundles of `modes` (and float32's),
    labels.txt and the report go. QuantizeError when the run has not finished training."""
    import dataclasses

    from quantize.export import QuantizeError, Trained

    for path in (run.config_file, run.summary_file, run.best_model):
        if not path.exists():
            raise QuantizeError(f"{run}: no {path.name}; train it first (pipeline train) or let it finish")
    return Trained(
        name=run.name,
        run_dir=str(run),
        model_file=run.best_model,
        config=run.read_config() if config is None else config,
        summary=dataclasses.asdict(run.read_summary()),
        bundle_files={mode: run.bundle(mode) for mode in ["float32", *modes]},
        labels_file=run.labels_file,
        report_file=run.report_file,
    )


def write_fashion_mnist_samples(
    *, count: int = 5, out: str | Path = "samples", data_path: str | None = None
) -> list[Path]:
    """The first `count` Fashion-MNIST test images as RGB PNG files named after their class: 0000_ankle_boot.png.
    RGB, though the images are grey: MediaPipe and the Task Library refuse grey input ("Grayscale format does not
    convert")."""
    from PIL import Image

    from serve.files import atomic_path
    from train.data import FASHION_MNIST_CLASSES, find_fashion_mnist, read_fashion_mnist

    images, labels = read_fashion_mnist(find_fashion_mnist(data_path), "test")
    written = []
    for i in range(min(count, len(images))):
        slug = FASHION_MNIST_CLASSES[labels[i]].lower().replace("/", "_").replace(" ", "_").replace("-", "_")
        path = Path(out) / f"{i:04d}_{slug}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(images[i]).convert("RGB").save(tmp, format="PNG")
        written.append(path)
    return written


def list_data_caches(*, cache_dir: str | Path | None = None) -> list:
    """Print the data caches under `cache_dir` (default: $PIPELINE_CACHE, else ~/.cache/edge-pipeline), the most
    recently used first, as a table; return them (train.cache.CacheEntry)."""
    import time

    from serve.files import shown
    from train.cache import list_caches
    from train.data import cache_dir as default_cache_dir

    folder = default_cache_dir({"cache_dir": cache_dir})
    entries = list_caches(folder)
    if not entries:
        print(f"no data caches in {shown(folder)}")
        return entries
    print(f"data caches in {shown(folder)}:")
    print(f"{'key':24}  {'input':>9}  {'images':>9}  {'on disk':>10}  {'last used':16}  source")
    for entry in entries:
        shape = "x".join(map(str, entry.input_shape)) if entry.input_shape else "-"
        what = entry.source if entry.state == "complete" else f"({entry.state})"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        images = f"{entry.images:,}" if entry.state == "complete" else "-"
        print(f"{entry.key:24}  {shape:>9}  {images:>9}  {_size(entry.size_bytes):>10}  {used:16}  {what}")
    total = sum(entry.size_bytes for entry in entries)
    print(f"{len(entries)} cache(s), {_size(total)}; delete one with: pipeline cache --remove KEY")
    return entries


def remove_data_caches(keys: Sequence[str], *, cache_dir: str | Path | None = None) -> None:
    """Delete the data caches `keys` ("all": every one) under `cache_dir` (as list_data_caches), printing each.
    PipelineError for a key that is not there, before anything is deleted, or for a cache in use (naming the
    processes that hold it)."""
    from serve.files import shown
    from train.cache import list_caches, remove_cache
    from train.data import cache_dir as default_cache_dir

    folder = default_cache_dir({"cache_dir": cache_dir})
    entries = {entry.key: entry for entry in list_caches(folder)}
    unknown = [key for key in keys if key != "all" and key not in entries]
    if unknown:
        raise PipelineError(f"{shown(folder / unknown[0])}: no such data cache (`pipeline cache` lists them)")
    if not entries:
        print(f"no data caches in {shown(folder)}")
    for entry in entries.values() if "all" in keys else [entries[key] for key in dict.fromkeys(keys)]:
        remove_cache(entry, folder)
        print(f"removed {shown(entry.path)} ({_size(entry.size_bytes)})")


def remove_unused_data_caches(days: float, *, cache_dir: str | Path | None = None) -> None:
    """Delete the data caches under `cache_dir` (as list_data_caches) last used more than `days` days ago,
    printing each; one that a process holds all the same (a long training run) is kept, with a line on stderr naming
    the process."""
    import time

    from serve.files import shown
    from train.cache import CacheInUse, list_caches, remove_cache
    from train.data import cache_dir as default_cache_dir

    folder = default_cache_dir({"cache_dir": cache_dir})
    cutoff = time.time() - days * 24 * 3600
    unused = [entry for entry in list_caches(folder) if entry.last_used < cutoff]
    if not unused:
        print(f"no data caches in {shown(folder)} unused for {days:g} days")
    for entry in unused:
        try:
            remove_cache(entry, folder)
        except CacheInUse as err:
            print(f"kept {shown(entry.path)}: in use by {err.holders}", file=sys.stderr)
            continue
        print(f"removed {shown(entry.path)} ({_size(entry.size_bytes)})")


def _size(size_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"
