"""One config system: defaults here, a YAML file from configs/ over them, then command-line overrides."""

from __future__ import annotations

import math
import reprlib
from pathlib import Path

import yaml

from serve.errors import PipelineError
from train.rundir import RunDir, check_resume, load_yaml, make_runs_dir, read_settings

# The named configs: `--config fashion_mnist` is configs/fashion_mnist.yaml. They sit at the top of the repository
# and install as pipeline/configs/ (pyproject.toml maps them there), so a wheel finds them beside this file.
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"
DEFAULT_CONFIG = "fashion_mnist"

# Every training setting, with its default. A config file or `--set key=value` may change any of them.
DEFAULTS: dict = {
    "name": "exp",  # the run directory is <runs_dir>/<name>
    "runs_dir": "runs",
    "data": "fashion-mnist",  # "fashion-mnist", or a folder with one sub-folder of images per class
    "data_path": None,  # where Fashion-MNIST's idx files are (found automatically when null)
    "cache_dir": None,  # the decoded-data cache: null is $PIPELINE_CACHE, else ~/.cache/edge-pipeline
    "max_images_per_class": None,  # cap each class, for quick experiments
    "val_fraction": 0.1,
    "input_size": 28,  # height = width of the model input
    "channels": 1,  # 1 (grey) or 3 (RGB)
    "model": "small_cnn",  # small_cnn | mobilenet_v2 | efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2
    "pretrained": False,  # efficientnet_lite0-2: start from ImageNet weights, backbone frozen, new head
    "fine_tune_blocks": 0,  # with pretrained: also train the top N MBConv blocks (Lite0 has 16, Lite1 and Lite2 21)
    "width": 1.0,  # width multiplier (filters scale)
    "dropout": 0.3,
    "augment": "none",  # none | basic (flips, shifts, brightness) | strong (basic + the five settings below)
    "randaugment_ops": 2,  # strong: RandAugment ops per image
    "randaugment_magnitude": 9.0,  # strong: their strength, 0 to 10
    "erase_probability": 0.25,  # strong: random erasing of a rectangle
    "mixup_probability": 0.2,  # strong: share of images blended with another (labels blended alike)
    "mixup_alpha": 0.8,  # mixup's ratio is drawn from Beta(alpha, alpha)
    "cutmix_probability": 0.2,  # strong: share of images with a box of another pasted in (labels by area)
    "cutmix_alpha": 1.0,  # cutmix's area from Beta(alpha, alpha)
    "ema_decay": 0.0,  # weight EMA for validation, best.keras and export (0: off; 0.999 typical)
    "patience": 0,  # stop after this many epochs without a better val_accuracy (0: off)
    "epochs": 15,
    "batch_size": 128,
    "learning_rate": 0.001,  # peak of a cosine decay over the whole run
    "label_smoothing": 0.0,
    "warmup_epochs": 1.0,  # with N workers the rate grows linearly to N x learning_rate over these epochs
    "compression": "fp16",  # gradients sent between workers as fp16 (half the bytes) or "none" (float32)
    "mixed_precision": False,  # float16 compute on GPUs (untested here: no GPU)
    "keep_checkpoints": 3,  # per-epoch checkpoints kept (the best model is kept apart)
    "checkpoint_minutes": 10.0,  # also a checkpoint inside an epoch this often (0: only at epochs' ends)
    "commit_every": 50,  # elastic training: batches between in-memory commits, which a lost worker rolls back to
    "seed": 42,
}


class ConfigError(PipelineError):
    """A config file or override that cannot be used."""


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with the value read as YAML (so 5 is an int, 1e-3 a float, null is None, true is a bool)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text}: expected key=value")
    try:
        return key.strip(), load_yaml(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a date such as 2020-13-45
        raise ConfigError(f"--set {text}: not a YAML value ({str(err).splitlines()[0]})") from None


def load_config(path: str | Path | None, overrides: dict | None = None) -> dict:
    """DEFAULTS, updated by the YAML file at `path`, then by `overrides`; unknown keys are errors. The file is read
    as bundles are (a regular file of at most 1 MiB: not a named pipe, a device or a folder)."""
    config = dict(DEFAULTS)
    if path is not None:
        _update(config, read_settings(path, ConfigError), str(path))
    _update(config, overrides or {}, "command line")
    return validate(config)


def config_file_path(value: str | None) -> str:
    """--config takes a path, or the name of a file in configs/ (fashion_mnist, fashion_mnist_best, image_folder,
    transfer)."""
    value = value or DEFAULT_CONFIG
    named = CONFIG_DIR / f"{value}.yaml"
    return str(named) if not Path(value).exists() and named.is_file() else value


def train_config(config_path: str | None, overrides: dict, resume: bool = False) -> dict:
    """The config `pipeline train` runs: a config file (a path or a name in configs/) with the overrides; or,
    to resume, the run's own config.yaml with the config file's settings (if one is given) and the overrides over
    it, which may not change what defines the run. A resume with nothing to resume yet (RunDir.nothing_to_resume)
    is a new run's config: the same command line starts a run and continues it."""
    if resume:
        given = read_settings(config_file_path(config_path), ConfigError) if config_path is not None else {}
        given |= overrides
        where = load_config(None, {key: value for key, value in given.items() if key in ("name", "runs_dir")})
        run = RunDir.of(where)
        if not run.nothing_to_resume():
            config = load_config(run.config_file, given)
            check_resume(run, load_config(run.config_file), config)
            return config
    config = load_config(config_file_path(config_path), overrides)
    make_runs_dir(config["runs_dir"])  # a file, or a folder no one can write: said now, before any work
    return config


def _update(config: dict, values: dict, source: str) -> None:
    for key, value in values.items():
        if key not in DEFAULTS:
            known = ", ".join(sorted(DEFAULTS))
            raise ConfigError(f"{source}: unknown setting '{key}' (known: {known})")
        config[key] = value


# The largest value of each size setting: far above any sensible run, low enough that a typo is refused at once
# instead of exhausting memory or disk later (one RGB image of input_size 30000 is 10 GB as float32).
LIMITS = {
    "input_size": 1024,
    "epochs": 100_000,
    "batch_size": 65_536,
    "keep_checkpoints": 1000,
    "commit_every": 1_000_000,
    "checkpoint_minutes": 525_600,  # a year
    "max_images_per_class": 1_000_000_000,
    "seed": 2**32 - 1,  # numpy's seeds
}
MAX_WIDTH = 8.0

# Values in error messages: a YAML alias can make a value of millions of elements in a few bytes.
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 200
_short.maxlevel = 3


def validate(config: dict) -> dict:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={_short.repr(config[key])}: {what}")

    if isinstance(config["model"], str):
        config["model"] = config["model"].replace("-", "_")  # efficientnet-lite0, as the model is usually spelt
    for key in ("input_size", "epochs", "batch_size", "keep_checkpoints", "commit_every"):
        need(
            _is_int(config[key]) and 1 <= config[key] <= LIMITS[key], key, f"must be an integer from 1 to {LIMITS[key]}"
        )
    need(config["channels"] in (1, 3) and not isinstance(config["channels"], bool), "channels", "must be 1 or 3")
    lite = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    need(
        config["model"] in ("small_cnn", "mobilenet_v2", *lite),
        "model",
        "must be small_cnn, mobilenet_v2, efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2",
    )
    need(isinstance(config["pretrained"], bool), "pretrained", "must be true or false")
    need(
        not config["pretrained"] or config["model"] in lite,
        "pretrained",
        "only efficientnet_lite0, 1 and 2 have pretrained weights",
    )
    blocks = 16 if config["model"] == "efficientnet_lite0" else 21
    need(
        _is_int(config["fine_tune_blocks"]) and 0 <= config["fine_tune_blocks"] <= blocks,
        "fine_tune_blocks",
        f"must be an integer from 0 to {blocks}",
    )
    if config["model"] in lite:
        need(config["channels"] == 3, "channels", f"{config['model']} takes RGB (channels 3)")
        need(config["input_size"] >= 32, "input_size", f"{config['model']} needs at least 32")
    need(
        isinstance(config["val_fraction"], float) and 0 < config["val_fraction"] < 1,
        "val_fraction",
        "must be between 0 and 1",
    )
    need(
        _is_number(config["learning_rate"]) and config["learning_rate"] > 0,
        "learning_rate",
        "must be a finite number above 0",
    )
    need(
        _is_number(config["width"]) and 0 < config["width"] <= MAX_WIDTH,
        "width",
        f"must be a number above 0, at most {MAX_WIDTH:g}",
    )
    for key in ("dropout", "label_smoothing"):
        need(_is_number(config[key]) and 0 <= config[key] < 1, key, "must be in [0, 1)")
    limit = LIMITS["max_images_per_class"]
    need(
        config["max_images_per_class"] is None
        or (_is_int(config["max_images_per_class"]) and 1 < config["max_images_per_class"] <= limit),
        "max_images_per_class",
        f"must be null or an integer from 2 to {limit}",
    )
    need(
        _is_int(config["seed"]) and 0 <= config["seed"] <= LIMITS["seed"],
        "seed",
        f"must be an integer from 0 to {LIMITS['seed']}",
    )
    need(config["compression"] in ("fp16", "none"), "compression", "must be fp16 or none")
    need(
        _is_number(config["checkpoint_minutes"]) and 0 <= config["checkpoint_minutes"] <= LIMITS["checkpoint_minutes"],
        "checkpoint_minutes",
        f"must be a number from 0 (off) to {LIMITS['checkpoint_minutes']}",
    )
    need(
        _is_number(config["warmup_epochs"]) and config["warmup_epochs"] >= 0,
        "warmup_epochs",
        "must be a finite number >= 0",
    )
    need(isinstance(config["mixed_precision"], bool), "mixed_precision", "must be true or false")
    _validate_recipe(config, need)
    need(
        isinstance(config["runs_dir"], str) and config["runs_dir"] and "\0" not in config["runs_dir"],
        "runs_dir",
        "must be a folder",
    )
    need(
        config["cache_dir"] is None
        or (isinstance(config["cache_dir"], str) and config["cache_dir"] and "\0" not in config["cache_dir"]),
        "cache_dir",
        "must be null or a folder",
    )
    need(
        inside_runs_dir(config["name"], config["runs_dir"]),
        "name",
        "must name a directory inside runs_dir: no '/', no leading '.', not a symlink",
    )
    if config["model"] == "mobilenet_v2":
        need(config["input_size"] >= 32, "input_size", "mobilenet_v2 needs at least 32")
    # YAML reads `learning_rate=1` as an int; TensorFlow's schedules and layers want these as floats.
    for key in ("width", "learning_rate", "dropout", "label_smoothing", "warmup_epochs", "checkpoint_minutes"):
        config[key] = float(config[key])
    return config


# The settings of augment: strong, with (low, high) bounds; `need` refuses a changed one with another preset.
STRONG_PARTS = {
    "randaugment_ops": (0, 10),
    "randaugment_magnitude": (0, 10),
    "erase_probability": (0, 1),
    "mixup_probability": (0, 1),
    "cutmix_probability": (0, 1),
}


def _validate_recipe(config: dict, need) -> None:
    """augment and its strong parts, ema_decay, patience. A config written before presets said augment true or
    false: read as basic or none."""
    if isinstance(config["augment"], bool):
        config["augment"] = "basic" if config["augment"] else "none"
    need(config["augment"] in ("none", "basic", "strong"), "augment", "must be none, basic or strong")
    for key, (low, high) in STRONG_PARTS.items():
        ok = _is_int(config[key]) if key == "randaugment_ops" else _is_number(config[key])
        need(ok and low <= config[key] <= high, key, f"must be a number from {low} to {high}")
        need(
            config["augment"] == "strong" or config[key] == DEFAULTS[key],
            key,
            f"is a part of augment: strong (augment is {config['augment']})",
        )
    need(
        config["mixup_probability"] + config["cutmix_probability"] <= 1,
        "cutmix_probability",
        f"with mixup_probability {config['mixup_probability']}: the two must add up to at most 1",
    )
    for key in ("mixup_alpha", "cutmix_alpha"):
        need(_is_number(config[key]) and 0 < config[key] <= 100, key, "must be a number above 0, at most 100")
    need(_is_number(config["ema_decay"]) and 0 <= config["ema_decay"] < 1, "ema_decay", "must be in [0, 1) (0: off)")
    need(
        _is_int(config["patience"]) and 0 <= config["patience"] <= LIMITS["epochs"],
        "patience",
        f"must be an integer from 0 (off) to {LIMITS['epochs']}",
    )
    for key in (*STRONG_PARTS.keys() - {"randaugment_ops"}, "mixup_alpha", "cutmix_alpha", "ema_decay"):
        config[key] = float(config[key])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float that is a finite float: inf passes `> 0`, and 10**400 (YAML's ints have no limit)
    cannot become a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def inside_runs_dir(name: object, runs_dir: str) -> bool:
    """Whether runs_dir/name is a directory strictly inside runs_dir, so that starting the run over deletes
    nothing else. Hidden names are refused too: the lock and temp files beside the runs start with a dot."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        return False
    runs = Path(runs_dir).resolve()
    return (runs / name).resolve() == runs / name  # not a symlink to elsewhere
