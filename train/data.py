"""Data sources: an image folder (one sub-folder per class) or Fashion-MNIST's idx files.

Every image goes through serve's `to_pixels` once, into the on-disk cache (train/cache.py); a Dataset's images are
views of that cache, read batch by batch, so no process holds a whole data set; only a training split of at most
IN_MEMORY_BYTES (256 MiB) is read into memory, where shuffled batches are cheaper. Labels are int64 arrays in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.errors import PipelineError
from serve.files import shown
from serve.preprocess import IMAGE_EXTENSIONS
from train.cache import ImageView, Source, Split, in_memory_if_small, open_cache, verify_cache

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


class DataError(PipelineError):
    """A data source that cannot be used."""


@dataclass
class Dataset:
    """Images as uint8 (N, H, W, C) views of the cache (a small training split: an array) with int64 labels, split
    for training."""

    class_names: list[str]
    train_x: ImageView | np.ndarray
    train_y: np.ndarray
    val_x: ImageView
    val_y: np.ndarray
    test_x: ImageView | None
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


def cache_dir(config: dict) -> Path:
    """Where the data cache lives: the `cache_dir` setting, else $PIPELINE_CACHE, else ~/.cache/edge-pipeline."""
    where = config.get("cache_dir") or os.environ.get("PIPELINE_CACHE") or "~/.cache/edge-pipeline"
    return Path(where).expanduser()


def load_dataset(config: dict, *, train_in_memory: bool = True) -> Dataset:
    """The data a run's config names, split into train / val (/ test), seeded and stratified.

    The first run decodes the images into the cache; later runs find it by the source files' names, sizes and
    mtimes, without reading them (`verify_data` reads them again). A small training split is read into memory
    (`in_memory_if_small`) for training, which shuffles it every epoch; `train_in_memory=False` leaves it on
    disk for a job that reads a few of its images (int8 calibration)."""
    size, channels, seed = int(config["input_size"]), int(config["channels"]), int(config["seed"])
    source = data_source(config)
    cache = open_cache(source, size, channels, cache_dir(config))
    x, y = cache.splits["train"]
    skipped = [shown(source.root / name) for name in cache.skipped]
    for name in skipped:
        print(f"warning: {name}: skipped (not a readable image)", file=sys.stderr)
    for index, name in enumerate(source.class_names):
        if not np.any(y == index):
            raise DataError(f"{source.root / name}: class '{name}' has no readable images")

    cap = config.get("max_images_per_class")
    if cap:
        keep = cap_per_class(y, int(cap), seed)
        x, y = x.subset(keep), y[keep]
    train_idx, val_idx = stratified_split(y, float(config["val_fraction"]), seed)
    test_x, test_y = cache.splits.get("test", (None, None))
    if test_y is not None and cap:
        keep = cap_per_class(test_y, int(cap), seed)
        test_x, test_y = test_x.subset(keep), test_y[keep]
    return Dataset(
        class_names=list(source.class_names),
        train_x=in_memory_if_small(x.subset(train_idx)) if train_in_memory else x.subset(train_idx),
        train_y=y[train_idx],
        val_x=x.subset(val_idx),
        val_y=y[val_idx],
        test_x=test_x,
        test_y=test_y,
        fingerprint=cache.fingerprint,
        source=str(source.root),
        skipped=skipped,
    )


def verify_data(config: dict) -> None:
    """Read and hash every source file again and compare with what the cache recorded; on a difference the cache is
    removed (and said so), and the next load_dataset builds it again."""
    verify_cache(data_source(config), int(config["input_size"]), int(config["channels"]), cache_dir(config))


def data_source(config: dict) -> Source:
    """The config's data as the cache sees it: its files, found by name only (nothing is read yet)."""
    if config["data"] == FASHION_MNIST:
        return _fashion_mnist_source(find_fashion_mnist(config.get("data_path")))
    return _folder_source(Path(config["data"]).expanduser())


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
    return _parse_idx(path, _read_file(path))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read idx file ({err.strerror})") from None


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    try:
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as err:
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
    images, labels, _ = _read_fashion_mnist_split(root, split)
    return images, labels


def _read_fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(images, labels, each idx file's name -> sha256) of a split: the files are read once for both."""
    names = [_idx_name(root, stem) for stem in FASHION_MNIST_FILES[split]]
    raws = [_read_file(root / name) for name in names]
    images, labels = (_parse_idx(root / name, raw) for name, raw in zip(names, raws))
    if len(images) != len(labels):
        raise DataError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels, {name: hashlib.sha256(raw).hexdigest() for name, raw in zip(names, raws)}


def _fashion_mnist_source(root: Path) -> Source:
    """Fashion-MNIST's four idx files as one source of two splits, "train" and "test", of array items. The files
    are read only when the cache is written."""
    files = [root / _idx_name(root, stem) for stems in FASHION_MNIST_FILES.values() for stem in stems]

    def read() -> dict[str, Split]:
        splits = {}
        for split in FASHION_MNIST_FILES:
            images, labels, hashes = _read_fashion_mnist_split(root, split)
            splits[split] = Split(images, labels.astype(np.int64), hashes)
        return splits

    identity = json.dumps([str(path.resolve()) for path in files])
    return Source(identity, root, files, [None] * len(files), FASHION_MNIST_CLASSES, read)


def scan_image_folder(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted sub-folder names, bytes that are not UTF-8 written \\xff) and each class's image files, by
    extension."""
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
    # A label is the folder's name as text: labels.txt, in every bundle, is UTF-8, one class name a line.
    names = [shown(d.name) for d in class_dirs]
    for class_dir, name, paths in zip(class_dirs, names, files):
        if len(class_dir.name.splitlines()) != 1:
            raise DataError(f"{shown(root)}: the class folder {name!r} has a line break in its name: rename it")
        if not paths:
            raise DataError(f"{shown(class_dir)}: class '{name}' has no images")
    if len(class_dirs) < 2:
        raise DataError(f"{shown(root)}: found one class ({names[0]}); a classifier needs at least two")
    _refuse_same_folders(root, class_dirs, names)
    return names, files


def _refuse_same_folders(root: Path, class_dirs: list[Path], names: list[str]) -> None:
    """DataError if two class folders would give the same images two labels (one is the other, through a symlink or
    a bind mount, or lies inside it) or two folders one label (a folder named "a\\xff" beside one named a + 0xff)."""
    labels: dict[str, Path] = {}
    folders: dict[tuple[int, int], str] = {}
    for class_dir, name in zip(class_dirs, names):
        if labels.setdefault(name, class_dir) != class_dir:
            raise DataError(
                f"{shown(root)}: two class folders give the label '{name}' (one name is not UTF-8): rename one"
            )
        info = class_dir.stat()
        other = folders.setdefault((info.st_dev, info.st_ino), name)
        if other != name:
            raise DataError(f"{shown(root)}: the class folders '{other}' and '{name}' are the same folder: keep one")
    # Sorted, a folder is followed by what lies inside it: comparing neighbours finds any nesting.
    real = sorted((os.path.join(os.path.realpath(d), ""), name) for d, name in zip(class_dirs, names))
    for (outer, outer_name), (inner, inner_name) in zip(real, real[1:]):
        if inner.startswith(outer):
            raise DataError(f"{shown(root)}: the class folder '{inner_name}' lies inside '{outer_name}': keep one")


def _folder_source(root: Path) -> Source:
    """An image folder as one "train" split of files, in class order, each labelled by its class."""
    class_names, files = scan_image_folder(root)
    paths = [path for class_files in files for path in class_files]
    labels = [label for label, class_files in enumerate(files) for _ in class_files]
    return Source(
        str(root.resolve()),
        root,
        paths,
        labels,
        class_names,
        lambda: {"train": Split(paths, np.array(labels, dtype=np.int64), {})},
    )
