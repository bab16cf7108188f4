"""The run directory contract: `RunDir` owns every path of a run, and reads and writes its files.

A run directory, runs/<name>/ (what later stages read):
    config.yaml            the resolved config
    data.json              data source, fingerprint, class names, split sizes, skipped files
    checkpoints/epoch_NNN/ model + optimizer state after epoch NNN (written to a temp dir, then renamed)
    checkpoints/epoch_NNN_batch_BBBBBB/
                           the same inside epoch NNN after BBBBBB batches (a stop signal, or every
                           checkpoint_minutes), with position.json (images done, workers, their metric
                           sums) and moving_stats.npz (each worker's BatchNorm statistics)
    best.keras             the model with the best validation accuracy so far
    metrics.csv/.json      one row per epoch
    curves.png, confusion_matrix.png, tensorboard/
    summary.json           the outcome (`Summary`): best epoch, validation and test accuracy, timings
    membership.csv         elastic runs: each worker that joined or left, when
    export/                the bundles (<name>_<mode>.tflite) and labels.txt, by `pipeline quantize`
    quantize_report.json   what `pipeline quantize` measured: accuracy, size and latency of each bundle
and beside it, <runs_dir>/.<name>.lock: the lock `pipeline train` and `pipeline quantize` hold.

No other module spells a run file's name. A leaf: it imports nothing of train/ and loads TensorFlow only inside
`versions()`."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serve.errors import PipelineError
from serve.files import MiB, read_regular_file, write_atomic

CHECKPOINT_PREFIX = "epoch_"
# A checkpoint inside an epoch: epoch_003_batch_000150 holds the state after 150 batches of epoch 3.
INSIDE_EPOCH = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)_batch_(\d+)$")
POSITION_FILE = "position.json"
MOVING_STATS_FILE = "moving_stats.npz"  # every worker's BatchNorm moving statistics, in a checkpoint inside an epoch
# The largest YAML config (a --config file, a run's config.yaml) and other run file (metrics.json, data.json with
# its list of skipped images) read back: far above any real one, far below what would exhaust memory.
CONFIG_LIMIT = 1 * MiB
RUN_FILE_LIMIT = 64 * MiB
_WRITABLE = "set runs_dir to a folder you can write"


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
    "randaugment_ops",
    "randaugment_magnitude",
    "erase_probability",
    "mixup_probability",
    "mixup_alpha",
    "cutmix_probability",
    "cutmix_alpha",
    "label_smoothing",
    "ema_decay",
    "mixed_precision",
)


class ResumeError(PipelineError):
    """A resume that would change what defines the run."""


class RunLockedError(PipelineError):
    """A run directory that another process is training or quantising right now."""


class RunFileError(PipelineError):
    """A run directory, or a file in one, that cannot be used: a runs_dir that is a file, a config.yaml that is
    a named pipe, a metrics.json that is not JSON."""


@dataclass(kw_only=True)
class Summary:
    """summary.json: how a run came out. A pretrained run (train/pretrained.py) has no training: no best epoch, no
    accuracies, no timings."""

    best_epoch: int | None
    epochs: int
    val_accuracy: float | None
    test_accuracy: float | None
    data_fingerprint: str
    normalization: dict  # {"mean": 127.0, "std": 128.0}: the model's first layer, what bundles say they expect
    versions: dict  # python, tensorflow, tf_keras, numpy
    train_seconds: float | None = None
    # Where the time went: loading data, building the model (and restoring it), model.fit (with validation and
    # the per-epoch bookkeeping it includes), and the final evaluation with its plots.
    seconds: dict[str, float] = field(default_factory=dict)
    skipped_images: int | None = None
    workers: int | None = None
    compression: str | None = None
    rank_weight_checksums: list[str] = field(default_factory=list)  # every worker's weights at the end: all equal
    # serve.metrics.classification_report of the best model on each split: accuracy, per-class precision, recall,
    # F1 and support, their macro and weighted averages. {"val": {...}, "test": {...}}; test only where there is one.
    metrics: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class RunDir:
    """One run directory, <runs_dir>/<name>/: every path in it, and the reading and writing of its files."""

    path: Path

    @classmethod
    def of(cls, config: dict) -> RunDir:
        """The run directory a config names: <runs_dir>/<name>."""
        return cls(Path(config["runs_dir"]) / config["name"])

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    config_file = property(lambda self: self.path / "config.yaml")
    data_file = property(lambda self: self.path / "data.json")
    best_model = property(lambda self: self.path / "best.keras")
    metrics_json = property(lambda self: self.path / "metrics.json")
    metrics_csv = property(lambda self: self.path / "metrics.csv")
    summary_file = property(lambda self: self.path / "summary.json")
    curves = property(lambda self: self.path / "curves.png")
    confusion_matrix = property(lambda self: self.path / "confusion_matrix.png")
    tensorboard = property(lambda self: self.path / "tensorboard")
    membership = property(lambda self: self.path / "membership.csv")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    export_dir = property(lambda self: self.path / "export")
    labels_file = property(lambda self: self.export_dir / "labels.txt")
    report_file = property(lambda self: self.path / "quantize_report.json")
    lock_file = property(lambda self: self.path.parent / f".{self.name}.lock")

    def bundle(self, mode: str) -> Path:
        """The bundle `pipeline quantize --mode <mode>` writes: export/<name>_<mode>.tflite."""
        return self.export_dir / f"{self.name}_{mode}.tflite"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{epoch:03d}"

    def inside_epoch_checkpoint(self, epoch: int, batches: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{epoch:03d}_batch_{batches:06d}"

    @staticmethod
    def position_file(checkpoint: Path) -> Path:
        """A checkpoint inside an epoch: where it stopped (images done, workers, their metric sums)."""
        return checkpoint / POSITION_FILE

    @staticmethod
    def moving_stats_file(checkpoint: Path) -> Path:
        """A checkpoint inside an epoch: every worker's BatchNorm moving statistics."""
        return checkpoint / MOVING_STATS_FILE

    @staticmethod
    def checkpoint_prefix(checkpoint: Path) -> Path:
        """Where tf.train.Checkpoint writes and reads the state in a checkpoint folder (files ckpt.index, ...)."""
        return checkpoint / "ckpt"

    @staticmethod
    def temp_folder(checkpoint: Path) -> Path:
        """The hidden folder a checkpoint is written into before it is renamed to `checkpoint`: a crash never leaves
        a half-written one under its name (the listings skip it)."""
        return checkpoint.parent / f".{checkpoint.name}.tmp"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints at the end of an epoch, oldest first. Temp dirs of an interrupted write are not
        listed."""
        found = []
        for path in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = path.name[len(CHECKPOINT_PREFIX) :]
            if suffix.isdigit() and path.is_dir():
                found.append((int(suffix), path))
        return sorted(found)

    def inside_epoch_checkpoints(self) -> list[tuple[int, int, Path]]:
        """Complete checkpoints written inside an epoch, as (epoch, batches done in it, folder), oldest first."""
        found = []
        for path in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*_batch_*"):
            match = INSIDE_EPOCH.match(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def latest_inside_epoch(self) -> tuple[int, int, Path] | None:
        """The checkpoint inside an epoch to resume from: the newest one, if it lies inside the epoch after the last
        complete one (an older one is stale: its epoch ended and was saved)."""
        inside = self.inside_epoch_checkpoints()
        done = self.checkpoints()
        last_epoch = done[-1][0] if done else 0
        if inside and inside[-1][0] == last_epoch + 1:
            return inside[-1]
        return None

    def nothing_to_resume(self) -> bool:
        """Whether `--resume` of this run starts it instead: no complete checkpoint, none inside an epoch, and no
        epoch's results (a run killed early in its first epoch, or never started). A run with metrics or a model
        but no checkpoint left is not started over."""
        if self.checkpoints() or self.inside_epoch_checkpoints():
            return False
        return not any(os.path.lexists(path) for path in (self.metrics_json, self.best_model, self.summary_file))

    def read_config(self) -> dict:
        """The resolved config the run was made with (its config.yaml)."""
        return read_settings(self.config_file, RunFileError)

    def write_config(self, config: dict) -> None:
        write_atomic(self.config_file, yaml.safe_dump(config, sort_keys=False))

    def read_data(self) -> dict:
        """data.json: the run's data source, fingerprint, class names and splits."""
        return read_run_json(self.data_file)

    def write_data(self, data: dict) -> None:
        write_atomic(self.data_file, json.dumps(data, indent=2))

    def read_history(self) -> list[dict]:
        """The per-epoch metrics rows written so far (none for a new run)."""
        return read_run_json(self.metrics_json) if os.path.lexists(self.metrics_json) else []

    def write_history(self, history: list[dict]) -> None:
        """metrics.json and metrics.csv, one row per epoch."""
        write_atomic(self.metrics_json, json.dumps(history, indent=2))
        columns = list(dict.fromkeys(key for row in history for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        write_atomic(self.metrics_csv, text.getvalue())

    def read_summary(self) -> Summary:
        """summary.json as a Summary; RunFileError naming the file when it lacks what every run has."""
        raw = read_run_json(self.summary_file)
        names = {item.name for item in dataclasses.fields(Summary)}
        if not isinstance(raw, dict):
            raise RunFileError(f"{self.summary_file}: expected a JSON object")
        try:
            return Summary(**{key: value for key, value in raw.items() if key in names})
        except TypeError:
            missing = sorted(name for name in names if name not in raw)
            raise RunFileError(f"{self.summary_file}: missing {', '.join(missing)}") from None

    def write_summary(self, summary: Summary) -> None:
        write_atomic(self.summary_file, json.dumps(dataclasses.asdict(summary), indent=2))

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold an exclusive lock on the run for the duration (fcntl.flock on `lock_file` beside it, so deleting
        and re-creating the run keeps the lock). Raises RunLockedError when another process holds it:
        "<run>: in use by PID 1234 (training); wait for it to finish or use another --name".

        The lock file stays (deleted, a process that had opened it could lock a file no one else sees); the kernel
        drops the lock when its holder exits, even by kill -9, so a lock is never stale.
        """
        make_runs_dir(self.path.parent)  # for the lock file: the run is about to be written
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            where = self.path.parent
            raise RunFileError(f"{where}: cannot write the run's lock file ({err.strerror}); {_WRITABLE}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, what = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
                holder = f"PID {pid} ({what})" if pid.isdigit() else "another process"  # may not have written yet
                advice = "wait for it to finish or use another --name"
                raise RunLockedError(f"{self}: in use by {holder}; {advice}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # before unlocking: no later refusal may name this process
        finally:
            os.close(fd)


class YamlLoader(yaml.SafeLoader):
    """yaml.safe_load's YAML 1.1, except that 1e-3 and 5E-4 are numbers, as in YAML 1.2 and JSON: a YAML 1.1 float
    needs a dot and a signed exponent (1.0e-3), so `--set learning_rate=1e-3` was the string '1e-3'."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str) -> object:
    """`text` read as YAML by YamlLoader: plain data only (safe_load's rules), scientific notation as numbers."""
    return yaml.load(text, Loader=YamlLoader)


def read_settings(path: str | Path, error: type[PipelineError]) -> dict:
    """The settings in YAML file `path` (a --config file, a run's config.yaml): a mapping, {} for an empty file.
    Read by the regular-file rule; anything else is `error("<path>: <problem>")`."""
    text = read_text_file(path, CONFIG_LIMIT, "a YAML config file", error)
    try:
        settings = load_yaml(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a date such as 2020-13-45, an int of 5000 digits
        raise error(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    except RecursionError:  # lists nested thousands deep: the constructor recurses
        raise error(f"{path}: not a readable YAML file (nested too deeply)") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise error(f"{path}: expected a mapping of settings")
    return settings


def read_text_file(path: str | Path, limit: int, kind: str, error: type[PipelineError]) -> str:
    """The UTF-8 text of `path`, a regular file of at most `limit` bytes (serve/files.py's rule for every file
    read back); else `error("<path>: <problem>")`."""
    data = read_regular_file(str(path), limit, kind, error)
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}), not {kind}") from None


def read_run_json(path: Path) -> object:
    """A JSON file of a run directory (metrics.json, data.json, summary.json), read by the regular-file rule."""
    text = read_text_file(path, RUN_FILE_LIMIT, "a run's JSON file", RunFileError)
    try:
        return json.loads(text)
    except ValueError as err:
        raise RunFileError(f"{path}: not valid JSON ({err})") from None


def make_runs_dir(runs_dir: str | Path) -> None:
    """Create runs_dir (and its parents) unless it exists; one line when it cannot hold runs: a file, a folder
    under a file, or a folder this process cannot write."""
    path = Path(runs_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunFileError(f"{path}: runs_dir is a file, not a folder; set runs_dir to a folder") from None
    except NotADirectoryError:
        blocker = next((parent for parent in path.parents if parent.is_file()), path.parent)
        raise RunFileError(f"{path}: runs_dir is under {blocker}, which is a file; set runs_dir to a folder") from None
    except OSError as err:
        raise RunFileError(f"{path}: cannot create runs_dir ({err.strerror}); {_WRITABLE}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFileError(f"{path}: runs_dir is not writable (permission denied); {_WRITABLE}")


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


def check_resume(run: str | Path, previous: dict, config: dict) -> None:
    """Refuse a resume of the run whose config was `previous` that would change what the run is.
    (A setting the run's config.yaml predates is not compared.)"""
    for key in RUN_DEFINING:
        if key in previous and previous[key] != config[key]:
            raise ResumeError(
                f"{run}: --resume cannot change {key} ({previous[key]} -> {config[key]}); start a new run with --name"
            )
