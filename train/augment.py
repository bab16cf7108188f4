"""Seeded augmentation of training batches, done on the fly in tf.data (train/batches.py) on the cache's pixels.

Presets (the `augment` setting):
- basic: mirror, shift up to 1/8 of the size (reflecting the edges), brightness +-10%.
- strong: basic, then `randaugment_ops` RandAugment-style ops at `randaugment_magnitude` (of 10), random erasing
  with probability `erase_probability`, and mixup or cutmix with a partner image (probabilities `mixup_probability`,
  `cutmix_probability`;
  mixing ratios from Beta(alpha, alpha)), whose labels mix in the same ratio.

Every random choice for an image comes from (seed, epoch, image index) alone -- not from its batch, step or worker:
a resumed epoch, an uninterrupted one and a job of any size augment each image the same way. A mixing partner is
another training image picked the same way, given basic augmentation from a second stream (strong costs twice
basic's time: ~8 ms per 128 28x28 images here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

PRESETS = ("none", "basic", "strong")

# RandAugment's ops, as timm's rand-m9-n2 draws them: each round picks one per image, uniformly. The geometric
# ones (rotate .. translate_y) are composed with the basic shift and mirror into one transform per image, so an
# image is resampled once; the others act on pixel values, in round order, after it.
OPS = (
    "identity",
    "autocontrast",
    "brightness",
    "contrast",
    "sharpness",
    "solarize",
    "posterize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
# The strongest change of each op, at magnitude 10 (timm's values): degrees, shear factor, share of the size,
# enhancement factor 1 +- this.
MAX_ROTATE, MAX_SHEAR, MAX_TRANSLATE, MAX_ENHANCE = 30.0, 0.3, 0.45, 0.9
# Random erasing (timm's RandomErasing): the rectangle's share of the image and its aspect ratio.
ERASE_AREA, ERASE_ASPECT = (0.02, 1 / 3), (0.3, 1 / 0.3)

# Uniform draws per image: 4 for basic, 2 per RandAugment round, 6 for erasing, 4 for mixing.
_BASIC, _PER_ROUND, _ERASE, _MIX = 4, 2, 6, 4


def preset(config: dict) -> str:
    """The config's preset; a config written before presets has augment true (basic) or false (none)."""
    value = config["augment"]
    if isinstance(value, bool):
        return "basic" if value else "none"
    return value


def augment_batch(
    x: tf.Tensor,
    y: tf.Tensor,
    indices: tf.Tensor,
    epoch: int | tf.Tensor,
    config: dict,
    count: int,
    read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of training images `x` (float32 0..255) and one-hot labels `y`, those of the training images
    `indices` of `epoch`, augmented by the config's preset. `read(indices)` gives other training images and their
    one-hot labels (mixing partners), `count` how many there are."""
    kind = preset(config)
    if kind == "none":
        return x, y
    strong = kind == "strong"
    x = _augment_images(x, indices, epoch, config, strong, stream=0)
    if not strong or config["mixup_probability"] + config["cutmix_probability"] == 0:
        return x, y
    draws, gammas = _draws(config["seed"], 2, epoch, indices, _MIX, (config["mixup_alpha"], config["cutmix_alpha"]))
    partners = tf.minimum(tf.cast(draws[:, 1] * count, tf.int64), count - 1)
    other_x, other_y = read(partners)
    other_x = _augment_images(other_x, partners, epoch, config, False, stream=1)
    return _mix(x, y, other_x, other_y, draws, gammas, config)


def _augment_images(
    x: tf.Tensor, indices: tf.Tensor, epoch: int | tf.Tensor, config: dict, strong: bool, stream: int
) -> tf.Tensor:
    rounds = config["randaugment_ops"] if strong else 0
    count = _BASIC + _PER_ROUND * rounds + (_ERASE if strong else 0)
    u, _ = _draws(config["seed"], stream, epoch, indices, count, ())
    shape = tf.shape(x)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    magnitude = config["randaugment_magnitude"] / 10 if strong else 0.0

    # Geometry: mirror, shift, then each round's geometric op, composed as output -> input pixel maps.
    flip = u[:, 0] < 0.5
    matrix = _matrix(shape[0], tf.where(flip, -1.0, 1.0), 0.0, tf.where(flip, width - 1, 0.0), 0.0, 1.0, 0.0)
    pad_h, pad_w = tf.floor(height / 8), tf.floor(width / 8)
    dx = tf.floor(u[:, 1] * (2 * pad_w + 1)) - pad_w
    dy = tf.floor(u[:, 2] * (2 * pad_h + 1)) - pad_h
    matrix = matrix @ _matrix(shape[0], 1.0, 0.0, -dx, 0.0, 1.0, -dy)
    ops = []
    for r in range(rounds):
        op = tf.minimum(tf.cast(u[:, _BASIC + 2 * r] * len(OPS), tf.int32), len(OPS) - 1)
        sign = tf.where(u[:, _BASIC + 2 * r + 1] < 0.5, -1.0, 1.0)
        ops.append((op, sign))
        matrix = matrix @ _geometric(op, sign * magnitude, height, width)
    transforms = tf.reshape(matrix, [-1, 9])[:, :8]
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )

    # Pixel values: basic's brightness, then each round's op.
    x = tf.clip_by_value(x + ((u[:, 3] * 2 - 1) * 0.1 * 255.0)[:, None, None, None], 0.0, 255.0)
    for op, sign in ops:
        x = _pixel_op(x, op, sign * magnitude)
    if strong and config["erase_probability"] > 0:
        x = _erase(x, u[:, -_ERASE:], config["erase_probability"])
    return x


def _draws(
    seed: int, stream: int, epoch: int | tf.Tensor, indices: tf.Tensor, count: int, alphas: tuple
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per image, `count` uniform draws in [0, 1) and one Beta(a, a) draw per a of `alphas`, from (seed, stream,
    epoch, image index) alone. One stateless draw per image (a map over the batch: ~1 ms for 128 images)."""
    first = tf.fill(tf.shape(indices), tf.constant(seed + stream * 2**32, tf.int64))
    second = tf.cast(epoch, tf.int64) * 2**32 + tf.cast(indices, tf.int64)
    keys = tf.stack([first, second], axis=1)
    concentration = [float(a) for a in alphas for _ in (0, 1)]

    def draw(key):
        uniform = tf.random.stateless_uniform([count], seed=key)
        if not concentration:
            return uniform, tf.zeros([0])
        # Another key than the uniform draws': the same key would correlate them.
        return uniform, tf.random.stateless_gamma([len(concentration)], seed=key + [0, 1], alpha=concentration)

    uniform, gamma = tf.map_fn(draw, keys, fn_output_signature=(tf.float32, tf.float32))
    pairs = tf.reshape(gamma, [-1, len(alphas), 2])
    beta = pairs[..., 0] / tf.maximum(pairs[..., 0] + pairs[..., 1], 1e-12)  # Beta(a, a) = G1 / (G1 + G2)
    return uniform, beta


def _matrix(n: tf.Tensor, a, b, c, d, e, f) -> tf.Tensor:
    """`n` 3x3 maps (x, y) -> (a x + b y + c, d x + e y + f); each entry a scalar or one value per image."""
    entries = [a, b, c, d, e, f, 0.0, 0.0, 1.0]
    rows = [tf.broadcast_to(tf.cast(v, tf.float32), [n]) for v in entries]
    return tf.reshape(tf.stack(rows, axis=1), [-1, 3, 3])


def _geometric(op: tf.Tensor, level: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The output -> input map of each image's op about the image's centre: identity unless a geometric op."""
    angle = level * MAX_ROTATE * math.pi / 180
    cos, sin = tf.cos(angle), tf.sin(angle)
    shear = level * MAX_SHEAR
    one, zero = tf.ones_like(level), tf.zeros_like(level)
    choice = [
        (OPS.index("rotate"), (cos, -sin, zero, sin, cos, zero)),
        (OPS.index("shear_x"), (one, shear, zero, zero, one, zero)),
        (OPS.index("shear_y"), (one, zero, zero, shear, one, zero)),
        (OPS.index("translate_x"), (one, zero, level * MAX_TRANSLATE * width, zero, one, zero)),
        (OPS.index("translate_y"), (one, zero, zero, zero, one, level * MAX_TRANSLATE * height)),
    ]
    entries = [one, zero, zero, zero, one, zero]
    for number, values in choice:
        entries = [tf.where(op == number, v, e) for v, e in zip(values, entries)]
    cx, cy = (width - 1) / 2, (height - 1) / 2
    n = tf.shape(op)[0]
    return _matrix(n, 1.0, 0.0, cx, 0.0, 1.0, cy) @ _matrix(n, *entries) @ _matrix(n, 1.0, 0.0, -cx, 0.0, 1.0, -cy)


def _pixel_op(x: tf.Tensor, op: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """Each image's op of one RandAugment round on its pixel values (geometric ones and identity: unchanged)."""
    per_image = lambda v: v[:, None, None, None]  # noqa: E731
    factor = per_image(1 + level * MAX_ENHANCE)
    magnitude = per_image(tf.abs(level))
    low = tf.reduce_min(x, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    channels = x.shape[-1]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13  # PIL's smoothing filter
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smooth = tf.nn.depthwise_conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "SYMMETRIC"), kernel, [1] * 4, "VALID")
    threshold = 256.0 - magnitude * 256.0
    bits = 8.0 - tf.round(magnitude * 4.0)
    step = tf.pow(2.0, 8.0 - bits)
    results = {
        "autocontrast": tf.where(high > low, (x - low) * 255.0 / tf.maximum(high - low, 1e-6), x),
        "brightness": x * factor,
        "contrast": mean + (x - mean) * factor,
        "sharpness": smooth + (x - smooth) * factor,
        "solarize": tf.where(x >= threshold, 255.0 - x, x),
        "posterize": tf.floor(x / step) * step,
    }
    for name, value in results.items():
        x = tf.where(per_image(op) == OPS.index(name), value, x)
    return tf.clip_by_value(x, 0.0, 255.0)


def _box(shape: tf.Tensor, box_h: tf.Tensor, box_w: tf.Tensor, top: tf.Tensor, left: tf.Tensor) -> tf.Tensor:
    """Per image, a [B, H, W, 1] mask of the rectangle of `box_h` x `box_w` pixels from (`top`, `left`)."""
    rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None, None]
    cols = tf.cast(tf.range(shape[2]), tf.float32)[None, None, :, None]
    top, left = top[:, None, None, None], left[:, None, None, None]
    inside_rows = (rows >= top) & (rows < top + box_h[:, None, None, None])
    return inside_rows & (cols >= left) & (cols < left + box_w[:, None, None, None])


def _erase(x: tf.Tensor, u: tf.Tensor, probability: float) -> tf.Tensor:
    """Random erasing: with `probability`, a rectangle of each image becomes one random grey level."""
    shape = tf.shape(x)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    area = height * width * (ERASE_AREA[0] + u[:, 1] * (ERASE_AREA[1] - ERASE_AREA[0]))
    low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = tf.exp(low + u[:, 2] * (high - low))
    box_h = tf.minimum(tf.round(tf.sqrt(area * aspect)), height)
    box_w = tf.minimum(tf.round(tf.sqrt(area / aspect)), width)
    top, left = tf.floor(u[:, 3] * (height - box_h + 1)), tf.floor(u[:, 4] * (width - box_w + 1))
    mask = _box(shape, box_h, box_w, top, left) & (u[:, 0] < probability)[:, None, None, None]
    return tf.where(mask, (u[:, 5] * 255.0)[:, None, None, None], x)


def _mix(
    x: tf.Tensor, y: tf.Tensor, other_x: tf.Tensor, other_y: tf.Tensor, u: tf.Tensor, beta: tf.Tensor, config: dict
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per image: mixup with probability `mixup_probability`, else cutmix with `cutmix_probability`, else nothing.
    The label becomes lam * own + (1 - lam) * partner's, lam being the share of the image that is its own."""
    mixup = u[:, 0] < config["mixup_probability"]
    cutmix = ~mixup & (u[:, 0] < config["mixup_probability"] + config["cutmix_probability"])
    shape = tf.shape(x)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    # Cutmix: a box of 1 - lam of the area (fewer pixels where it crosses an edge) centred anywhere.
    side = tf.sqrt(1.0 - beta[:, 1])
    centre_y, centre_x = u[:, 2] * height, u[:, 3] * width
    top = tf.clip_by_value(tf.round(centre_y - side * height / 2), 0.0, height)
    bottom = tf.clip_by_value(tf.round(centre_y + side * height / 2), 0.0, height)
    left = tf.clip_by_value(tf.round(centre_x - side * width / 2), 0.0, width)
    right = tf.clip_by_value(tf.round(centre_x + side * width / 2), 0.0, width)
    box = _box(shape, bottom - top, right - left, top, left) & cutmix[:, None, None, None]
    cut_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    lam = tf.where(mixup, beta[:, 0], tf.where(cutmix, cut_lam, 1.0))
    blended = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * other_x
    x = tf.where(box, other_x, tf.where(mixup[:, None, None, None], blended, x))
    return tf.clip_by_value(x, 0.0, 255.0), lam[:, None] * y + (1.0 - lam[:, None]) * other_y
