"""TensorFlow's environment, set in one place: Keras 2 (tf_keras) for tfmot and Horovod, quiet C++ logs.

Entry points that load TensorFlow (the CLI's commands, the benchmarks, test scripts) call `prepare()` before
their first TensorFlow import; importing a module of this project sets nothing by itself.
"""

from __future__ import annotations

import os

from serve.errors import PipelineError


def prepare() -> None:
    """Select Keras 2 for `tf.keras` and hide TensorFlow's C++ info lines ("failed call to cuInit" on CPU-only
    machines). With Keras 3, Horovod's DistributedOptimizer trains without allreducing and tfmot refuses the
    models, so a user's TF_USE_LEGACY_KERAS=0 is an error, not a preference."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_USE_LEGACY_KERAS"] != "1":
        raise PipelineError(
            f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']}: this pipeline needs Keras 2 (tf_keras); "
            "unset it or set it to 1"
        )
