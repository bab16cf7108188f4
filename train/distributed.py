"""Data parallelism with Horovod, imported only when a launcher started this process as one of a job's workers.

The training loop asks `size()`, `rank()` and `is_chief()` and never how it was launched: alone (one process:
size 1, rank 0, no Horovod at all), under `horovodrun -np N -H ...` or `mpirun`, or by `pipeline train
--workers N` (which goes through horovodrun).

The recipe is Horovod's own (examples/tensorflow2/tensorflow2_keras_mnist.py): one process per worker,
each on its own shard of the data; gradients averaged by allreduce every step, so N workers train one model
on an N-times-larger batch; rank 0 broadcasts the starting weights and alone writes files.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from serve.errors import PipelineError
from train.launchers import launcher_variable

BYTES_PER_VALUE = {"fp16": 2, "none": 4}

# In a distributed job: horovod.tensorflow (collectives) and horovod.tensorflow.keras (the optimizer).
# In a process alone: None, and Horovod is never imported.
hvd = None
hvd_keras = None


def init(mixed_precision: bool = False) -> None:
    """Join the job, if there is one, and give each local rank its own GPU, if there are any."""
    global hvd, hvd_keras
    variable = launcher_variable()
    if variable:
        hvd, hvd_keras = _import_horovod(variable)
        _refuse_mpirun_without_mpi()
        # Horovod: initialize Horovod.
        hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Grow memory as needed, so several processes can share a machine's GPUs.
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        # Horovod: pin one GPU per process, local rank i using GPU i of its machine.
        local_rank = hvd.local_rank() if hvd is not None else 0
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        if mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")


def _import_horovod(variable: str) -> tuple:
    # Horovod's Keras binding uses `tf.keras`; with Keras 3 there, its optimizer trains without allreducing.
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise PipelineError(
            "Horovod needs Keras 2: set TF_USE_LEGACY_KERAS=1 before TensorFlow loads "
            "(pipeline.tensorflow_env.prepare() does)"
        )
    try:
        import horovod.tensorflow
        import horovod.tensorflow.keras
    except ImportError as err:
        raise PipelineError(
            f"{variable} is set: this process is one worker of a distributed job, but horovod is not importable "
            f"({err}); install it with `make setup`, which builds it against TensorFlow (README: Install by hand)"
        ) from None
    return horovod.tensorflow, horovod.tensorflow.keras


def _refuse_mpirun_without_mpi() -> None:
    """mpirun starts N copies of the command; a Horovod built without MPI would make each one a job of its own:
    N rank 0s training into one run directory."""
    size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or "1"
    if "HOROVOD_RANK" not in os.environ and int(size) > 1 and not hvd.mpi_built():
        raise PipelineError(
            "launched by mpirun, but this Horovod was built without MPI: use `pipeline train --workers N` (Gloo), "
            "or rebuild Horovod with HOROVOD_WITH_MPI=1"
        )


def elastic() -> bool:
    """Whether this worker belongs to an elastic job (horovodrun --min-np: workers may leave and join)."""
    return hvd is not None and os.environ.get("HOROVOD_ELASTIC") == "1"


def size() -> int:
    return hvd.size() if hvd is not None else 1


def rank() -> int:
    return hvd.rank() if hvd is not None else 0


def is_chief() -> bool:
    """Rank 0 writes checkpoints, logs and plots, and prints progress."""
    return rank() == 0


def distributed_optimizer(optimizer, compression: str):
    """`optimizer`, wrapped in a job so that every step averages the gradients of all workers (allreduce), sent
    as float16 with compression "fp16" (half the bytes) or float32 with "none". Alone: `optimizer` itself."""
    if hvd is None:
        return optimizer
    # Horovod: add Horovod DistributedOptimizer.
    return hvd_keras.DistributedOptimizer(
        optimizer, compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    )


def broadcast_from_chief(variables: list) -> None:
    """Make every worker start from rank 0's weights and optimizer state (fresh or restored)."""
    if size() > 1:
        # Horovod: broadcast initial variable states from rank 0 to all other processes.
        hvd.broadcast_variables(variables, root_rank=0)


def barrier() -> None:
    """Wait until every worker comes here (a collective)."""
    broadcast_object(None)


def broadcast_object(value):
    """Rank 0's `value` on every worker."""
    if size() == 1:
        return value
    # Horovod: every worker acts on rank 0's decision (start epoch, or its error).
    return hvd.broadcast_object(value, root_rank=0)


class MetricAverage(keras.callbacks.Callback):
    """Averages each epoch's metrics over the workers before later callbacks log them. (Horovod's own
    MetricAverageCallback reaches for Keras 3's backend when Keras 3 is installed, and fails.)"""

    def on_epoch_end(self, epoch, logs=None):
        if logs and size() > 1:
            for name in sorted(logs):  # the same order on every worker: allreduces pair up by name
                value = tf.constant(float(logs[name]), tf.float32)
                # Horovod: average metrics among workers at the end of every epoch.
                logs[name] = float(hvd.allreduce(value, op=hvd.Average, name=f"metric.{name}"))


def average(value: float, name: str) -> float:
    """The mean of every worker's `value` (in float64: float32 losses near their largest must not overflow);
    alone, `value`. A collective: every worker calls it at the same point, with the same `name`."""
    return _allreduce(value, "Average", name)


def maximum(values: list[float], name: str) -> list[float]:
    """The element-wise greatest of every worker's `values` (float64), in one collective; alone, `values`.
    A collective, as `average`."""
    if size() == 1:
        return list(values)
    return [float(v) for v in hvd.allreduce(tf.constant(values, tf.float64), op=hvd.Max, name=name).numpy()]


def _allreduce(value: float, op: str, name: str) -> float:
    if size() == 1:
        return value
    return float(hvd.allreduce(tf.constant(value, tf.float64), op=getattr(hvd, op), name=name))


def allgather_object(value) -> list:
    """Every worker's `value`, in rank order (a collective); alone, [value]."""
    if size() == 1:
        return [value]
    return hvd.allgather_object(value)


def allreduce_bytes_per_step(model, compression: str) -> int:
    """Bytes each worker sends into the allreduce per step: one value per trainable weight (none alone)."""
    if size() == 1:
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
    # Horovod: gather the checksums, to prove the replicas stayed in step.
    return allgather_object(weights_checksum(model))
