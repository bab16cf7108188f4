"""Horovod glue, in one place. The training loop asks `size()`, `rank()` and `is_chief()` and never how it was
launched: alone (one process), under `horovodrun -np N -H ...`, or by `pipeline train --workers N`.

The recipe is Horovod's own (examples/tensorflow2/tensorflow2_keras_mnist.py): one process per worker,
each on its own shard of the data; gradients averaged by allreduce every step, so N workers train one model
on an N-times-larger batch; rank 0 broadcasts the starting weights and alone writes files.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf
import tf_keras as keras

from serve import PipelineError

try:
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
except ImportError as err:  # pragma: no cover - the set-up builds it; say how if it did not
    raise PipelineError(
        f"horovod is not importable ({err}); run `make setup`, which builds horovod 0.28.1 against TensorFlow"
    ) from None

COMPRESSIONS = {"fp16": hvd.Compression.fp16, "none": hvd.Compression.none}
BYTES_PER_VALUE = {"fp16": 2, "none": 4}


def init(mixed_precision: bool = False) -> None:
    """Start Horovod (size 1 without a launcher) and give each local rank its own GPU, if there are any."""
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Grow memory as needed, so several processes can share a machine's GPUs.
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        # One GPU per process: local rank i uses GPU i of its machine.
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        if mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")


def size() -> int:
    return hvd.size()


def rank() -> int:
    return hvd.rank()


def is_chief() -> bool:
    """Rank 0 writes checkpoints, logs and plots, and prints progress."""
    return hvd.rank() == 0


def distributed_optimizer(optimizer, compression: str):
    """Wrap `optimizer` so that every step averages the gradients of all workers (allreduce), sent as
    float16 with compression "fp16" (half the bytes) or float32 with "none"."""
    return hvd.DistributedOptimizer(optimizer, compression=COMPRESSIONS[compression])


def broadcast_from_chief(variables: list) -> None:
    """Make every worker start from rank 0's weights and optimizer state (fresh or restored)."""
    if hvd.size() > 1:
        hvd_tf.broadcast_variables(variables, root_rank=0)


def broadcast_object(value):
    """Rank 0's `value` on every worker."""
    return hvd_tf.broadcast_object(value, root_rank=0) if hvd.size() > 1 else value


class MetricAverage(keras.callbacks.Callback):
    """Averages each epoch's metrics over the workers before later callbacks log them. (Horovod's own
    MetricAverageCallback reaches for Keras 3's backend when Keras 3 is installed, and fails.)"""

    def on_epoch_end(self, epoch, logs=None):
        if logs and hvd.size() > 1:
            for name in sorted(logs):  # the same order on every worker: allreduces pair up by name
                value = tf.constant(float(logs[name]), tf.float32)
                logs[name] = float(hvd_tf.allreduce(value, op=hvd_tf.Average, name=f"metric.{name}"))


def allreduce_bytes_per_step(model, compression: str) -> int:
    """Bytes each worker sends into the allreduce per step: one value per trainable weight (none alone)."""
    if hvd.size() == 1:
        return 0
    values = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return values * BYTES_PER_VALUE[compression]


def weights_checksum(model) -> str:
    """sha256 of the trainable weights. (BatchNorm's moving statistics are left out: each worker averages
    over its own batches, as Horovod intends; rank 0's are the ones saved.)"""
    arrays = [np.ascontiguousarray(w.numpy()) for w in model.trainable_weights]
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


def all_checksums(model) -> list[str]:
    """Every rank's weights checksum, in rank order: equal when allreduce kept the replicas in step."""
    mine = weights_checksum(model)
    return hvd_tf.allgather_object(mine) if hvd.size() > 1 else [mine]
