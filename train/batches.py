"""The batch reader: which training images each worker takes in each epoch, in which order, and how they are read.

The order contract, which exact resume and N-worker = 1-worker equivalence rest on:
- An epoch's order is a permutation of the training images that depends only on (seed, epoch): a resumed run,
  an uninterrupted one and a job of any size see the same order.
- Its images are dealt out to the workers: of N workers, rank r takes every N-th image from the r-th on, so the
  workers' batches of a step together are the one-process batch of N times the size. The last count % N images of
  the order sit the epoch out, so that every worker takes as many steps.
- Part-way through an epoch (a checkpoint inside it, an elastic job that changed size), the images of the order
  already trained on are skipped and the rest is dealt out again among the workers training now: no image of the
  epoch is trained on twice or skipped (but the last few, as above).
- Augmentation (train/augment.py) is seeded by (seed, epoch, image index): an image gets the same augmentation
  however the epoch was reached, in whichever batch and on whichever worker it lands.

Images are read batch by batch from a Dataset's uint8 views when a batch is due, several in parallel: a split is
never held whole.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from train import distributed
from train.augment import augment_batch
from train.data import Dataset

# tf.data functions traced as written, without autograph: they branch on Python values only, and converting their
# source costs CPU time before the first epoch.
_as_written = tf.autograph.experimental.do_not_convert


def epoch_indices(count: int, seed: int, epoch: int | tf.Tensor, rank: int, workers: int) -> tf.Tensor:
    """The indices of the training images worker `rank` of `workers` takes in `epoch`, in order (eager or traced)."""
    return remaining_indices(count, seed, epoch, 0, rank, workers)


def remaining_indices(
    count: int, seed: int, epoch: int | tf.Tensor, done: int | tf.Tensor, rank: int, workers: int
) -> tf.Tensor:
    """Worker `rank`'s part of what is left of `epoch`'s order once its first `done` images were trained on: the
    rest of the same order is split among the `workers` training now."""
    seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    rest = tf.argsort(tf.random.stateless_uniform([count], seed=seeds))[done:]
    return rest[: (count - done) // workers * workers][rank::workers]


def resume_point(count: int, done: int, workers: int) -> int:
    """How many images of an epoch's order to count as trained when it goes on after `done` with `workers`: `done`
    -- unless fewer than `workers` are left (hosts joined an elastic job at the epoch's very end), then `workers`
    before the end. Keras cannot fit zero steps, and the epoch still has to end (validation, metrics row,
    checkpoint): each worker trains one image, a few of them again."""
    return min(done, count - workers)


def train_batches(data: Dataset, config: dict, start_epoch: int) -> tf.data.Dataset:
    """This worker's batches for epochs start_epoch.. onwards, in the order of `epoch_indices`."""
    epochs = tf.data.Dataset.range(start_epoch, config["epochs"], output_type=tf.int64)
    batches = epochs.flat_map(_as_written(lambda epoch: epoch_batches(data, config, epoch)))
    return batches.prefetch(tf.data.AUTOTUNE)


def epoch_batches(data: Dataset, config: dict, epoch: int | tf.Tensor, done: int = 0) -> tf.data.Dataset:
    """This worker's batches of `epoch` once its first `done` images are trained on (`remaining_indices`)."""
    images, labels, num_classes = data.train_x, tf.constant(data.train_y), len(data.class_names)
    count = len(data.train_y)
    shard = remaining_indices(count, config["seed"], epoch, done, distributed.rank(), distributed.size())
    batches = tf.data.Dataset.from_tensor_slices(shard).batch(config["batch_size"])

    def read(indices):
        # One-hot per batch, never for the whole set: label smoothing, mixup and cutmix need the categorical loss
        # (mixed labels are soft).
        return _read(images, lambda idx: images[idx], indices), tf.one_hot(tf.gather(labels, indices), num_classes)

    @_as_written
    def load(indices):
        x, y = read(indices)
        return augment_batch(x, y, indices, epoch, config, count, read)

    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def image_batches(x: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Consecutive float32 batches of `x`, read in parallel ahead of use."""

    @_as_written
    def load(start):
        return _read(x, lambda first: x[first : first + batch_size], start)

    starts = tf.data.Dataset.range(0, len(x), batch_size)
    return starts.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def eval_batches(x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int) -> tf.data.Dataset:
    """Consecutive (images, one-hot labels) batches of a split, in its order, for validation."""
    one_hot = _as_written(lambda batch: tf.one_hot(batch, num_classes))
    labels = tf.data.Dataset.from_tensor_slices(y).batch(batch_size).map(one_hot)
    return tf.data.Dataset.zip((image_batches(x, batch_size), labels))


def _read(images, read, key: tf.Tensor) -> tf.Tensor:
    """The float32 batch `read(key)` returns from `images` (uint8, maybe a view of files on disk). Not stateful:
    the same key reads the same pixels, so tf.data still reads in parallel and prefetches under op determinism."""
    batch = tf.numpy_function(read, [key], tf.uint8, stateful=False)
    batch.set_shape((None, *images.shape[1:]))
    return tf.cast(batch, tf.float32)
