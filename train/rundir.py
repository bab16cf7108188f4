"""The run directory contract: where a run lives, its checkpoints, its metrics, its versions, and its lock.

A run directory (what later stages read):
    config.yaml            the resolved config
    data.json              data source, fingerprint, class names, split sizes, skipped files
    checkpoints/epoch_NNN/ model + optimizer state after epoch NNN (written to a temp dir, then renamed)
    best.keras             the model with the best validation accuracy so far
    metrics.csv/.json      one row per epoch
    curves.png, confusion_matrix.png, tensorboard/
    summary.json           the outcome: best epoch, validation and test accuracy, timings

A leaf: it imports nothing of train/ and loads TensorFlow only inside `versions()`.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from serve.errors import PipelineError
from serve.files import write_atomic

CHECKPOINT_PREFIX = "epoch_"


# What a run is: its data and split, its model and its loss. `--resume` refuses to change these; the others
# (epochs, learning_rate, fine_tune_blocks, batch_size, ...) only say how training goes on.
RUN_DEFINING = (
    "data",
    "data_path",
    "max_images_per_class",
    "val_fraction",
    "seed",
    "model",
    "input_size",
    "channels",
    "width",
    "dropout",
    "pretrained",
    "augment",
    "label_smoothing",
    "mixed_precision",
)


class ResumeError(PipelineError):
    """A resume that would change what defines the run."""


class RunLockedError(PipelineError):
    """A run directory that another process is training or quantising right now."""


def run_dir(config: dict) -> Path:
    """The run directory a config names: <runs_dir>/<name>."""
    return Path(config["runs_dir"]) / config["name"]


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temp dirs of an interrupted write are not listed."""
    found = []
    for path in (run / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def versions() -> dict:
    """The versions a run was made with, for summary.json."""
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "numpy": np.__version__,
    }


def read_history(run: Path) -> list[dict]:
    """The per-epoch metrics rows written so far (none for a new run)."""
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_history(run: Path, history: list[dict]) -> None:
    """metrics.json and metrics.csv, one row per epoch."""
    write_atomic(run / "metrics.json", json.dumps(history, indent=2))
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_atomic(run / "metrics.csv", text.getvalue())


@contextlib.contextmanager
def run_lock(run: str | Path, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on run directory `run` for the duration (fcntl.flock on a hidden file beside it,
    `<runs_dir>/.<name>.lock`, so deleting and re-creating the run keeps the lock). Raises RunLockedError
    when another process holds it: "<run>: in use by PID 1234 (training); wait for it to finish or use another --name".

    The lock file stays (deleted, a process that had opened it could lock a file no one else sees); the kernel
    drops the lock when its holder exits, even by kill -9, so a lock is never stale.
    """
    run = Path(run)
    run.parent.mkdir(parents=True, exist_ok=True)  # runs_dir, for the lock file: the run is about to be written
    fd = os.open(run.parent / f".{run.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, what = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
            holder = f"PID {pid} ({what})" if pid.isdigit() else "another process"  # it may not have written yet
            raise RunLockedError(f"{run}: in use by {holder}; wait for it to finish or use another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # before unlocking: no later refusal may name this process
    finally:
        os.close(fd)


def read_config(run: Path) -> dict:
    """The resolved config a run was made with (its config.yaml)."""
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def check_resume(run: str | Path, previous: dict, config: dict) -> None:
    """Refuse a resume of the run whose config was `previous` that would change what the run is.
    (A setting the run's config.yaml predates is not compared.)"""
    for key in RUN_DEFINING:
        if key in previous and previous[key] != config[key]:
            raise ResumeError(
                f"{run}: --resume cannot change {key} ({previous[key]} -> {config[key]}); start a new run with --name"
            )
