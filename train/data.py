"""Data sources: an image folder (one sub-folder per class) or Fashion-MNIST's idx files.

Every image goes through serve's `to_pixels` once, and the result is cached as uint8 arrays keyed by
a fingerprint of the source files and the input size, so a second run does not decode again.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.errors import ImageError, PipelineError
from serve.files import atomic_path
from serve.preprocess import IMAGE_EXTENSIONS, to_pixels

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist"), Path("~/.keras/datasets/fashion-mnist")]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Bump when serve's preprocessing changes what it produces, so old caches are not reused.
CACHE_VERSION = 1


class DataError(PipelineError):
    """A data source that cannot be used."""


@dataclass
class Dataset:
    """Images as uint8 (N, H, W, C) arrays with integer labels, split for training."""

    class_names: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    fingerprint: str
    source: str
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "class_names": self.class_names,
            "train_images": len(self.train_y),
            "val_images": len(self.val_y),
            "test_images": 0 if self.test_y is None else len(self.test_y),
            "skipped_images": self.skipped,
        }


def cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE", "~/.cache/edge-pipeline")).expanduser()


def load_dataset(config: dict) -> Dataset:
    """The data a run's config names, split into train / val (/ test), seeded and stratified."""
    size, channels, seed = int(config["input_size"]), int(config["channels"]), int(config["seed"])
    if config["data"] == FASHION_MNIST:
        root = find_fashion_mnist(config.get("data_path"))
        fingerprint = _fingerprint(
            root, [root / _idx_name(root, n) for pair in FASHION_MNIST_FILES.values() for n in pair]
        )
        arrays = _cached(fingerprint, size, channels, lambda: _decode_fashion_mnist(root, size, channels))
        class_names, skipped = FASHION_MNIST_CLASSES, []
        source = str(root)
    else:
        root = Path(config["data"]).expanduser()
        class_names, files = scan_image_folder(root)
        fingerprint = _fingerprint(root, [path for paths in files for path in paths])
        arrays = _cached(fingerprint, size, channels, lambda: _decode_folder(root, files, size, channels))
        skipped = [str(root / name) for name in arrays["skipped"]]
        for name in skipped:
            print(f"warning: {name}: skipped (not a readable image)", file=sys.stderr)
        source = str(root)
        for index, name in enumerate(class_names):
            if not np.any(arrays["train_y"] == index):
                raise DataError(f"{root / name}: class '{name}' has no readable images")

    x, y = arrays["train_x"], arrays["train_y"]
    cap = config.get("max_images_per_class")
    if cap:
        keep = cap_per_class(y, int(cap), seed)
        x, y = x[keep], y[keep]
    train_idx, val_idx = stratified_split(y, float(config["val_fraction"]), seed)
    test_x, test_y = arrays.get("test_x"), arrays.get("test_y")
    if test_y is not None and cap:
        keep = cap_per_class(test_y, int(cap), seed)
        test_x, test_y = test_x[keep], test_y[keep]
    return Dataset(
        class_names=list(class_names),
        train_x=x[train_idx],
        train_y=y[train_idx],
        val_x=x[val_idx],
        val_y=y[val_idx],
        test_x=test_x,
        test_y=test_y,
        fingerprint=fingerprint,
        source=source,
        skipped=skipped,
    )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: each class split by `val_fraction`, the same for the same seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def cap_per_class(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices keeping at most `cap` seeded-random images of each class."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == cls))[:cap] for cls in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """About `count` indices spread over the classes in proportion to their sizes."""
    if count >= len(labels):
        return np.arange(len(labels))
    _, val = stratified_split(labels, count / len(labels), seed)
    return val


def find_fashion_mnist(data_path: str | None) -> Path:
    candidates = [Path(data_path).expanduser()] if data_path else [d.expanduser() for d in FASHION_MNIST_DIRS]
    for root in candidates:
        if all(_idx_name(root, name) for pair in FASHION_MNIST_FILES.values() for name in pair):
            return root
    where = " or ".join(str(c) for c in candidates)
    raise DataError(
        f"{where}: Fashion-MNIST idx files not found; install them with "
        "'apt-get install dataset-fashion-mnist' or pass --set data_path=DIR"
    )


def _idx_name(root: Path, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not, as a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read idx file ({err})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: idx file is truncated ({len(data) - offset} bytes for shape {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def read_fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of Fashion-MNIST's "train" or "test" split."""
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images = read_idx(root / _idx_name(root, images_stem))
    labels = read_idx(root / _idx_name(root, labels_stem))
    if len(images) != len(labels):
        raise DataError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels


def _decode_fashion_mnist(root: Path, size: int, channels: int) -> dict[str, np.ndarray]:
    arrays = {}
    for split in FASHION_MNIST_FILES:
        images, labels = read_fashion_mnist(root, split)
        arrays[f"{split}_x"] = np.stack([to_pixels(image, size, size, channels) for image in images])
        arrays[f"{split}_y"] = labels.astype(np.int64)
    return arrays


def scan_image_folder(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted sub-folder names) and each class's image files, by extension."""
    if not root.exists():
        raise DataError(f"{root}: no such data folder (want one sub-folder of images per class)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (want one sub-folder of images per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) for d in class_dirs
    ]
    if not class_dirs or not any(files):
        raise DataError(f"{root}: no images found (want one sub-folder of images per class)")
    for class_dir, paths in zip(class_dirs, files):
        if not paths:
            raise DataError(f"{class_dir}: class '{class_dir.name}' has no images")
    if len(class_dirs) < 2:
        raise DataError(f"{root}: found one class ({class_dirs[0].name}); a classifier needs at least two")
    return [d.name for d in class_dirs], files


def _decode_folder(root: Path, files: list[list[Path]], size: int, channels: int) -> dict[str, np.ndarray]:
    images, labels, skipped = [], [], []
    total = sum(len(paths) for paths in files)
    done = 0
    for label, paths in enumerate(files):
        for path in paths:
            try:
                images.append(to_pixels(path, size, size, channels))
                labels.append(label)
            except ImageError:
                skipped.append(str(path.relative_to(root)))
            done += 1
            if done % 500 == 0 or done == total:
                print(f"\rdecoding images: {done}/{total}", end="\n" if done == total else "", file=sys.stderr)
    return {
        "train_x": np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8),
        "train_y": np.array(labels, dtype=np.int64),
        "skipped": np.array(skipped, dtype=str),
    }


def _fingerprint(root: Path, paths: list[Path]) -> str:
    """sha256 over each file's path (relative to root) and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _cached(fingerprint: str, size: int, channels: int, decode) -> dict[str, np.ndarray]:
    key = hashlib.sha256(f"{fingerprint}:{size}:{channels}:{CACHE_VERSION}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError):
            print(f"warning: {path}: unreadable cache, decoding again", file=sys.stderr)
    arrays = decode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return arrays
