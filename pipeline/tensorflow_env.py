"""TensorFlow's environment, set in one place: Keras 2 (tf_keras) for tfmot and Horovod, quiet C++ logs.

Entry points that load TensorFlow (the CLI's commands, the benchmarks, test scripts) call `prepare()`, which
imports it; importing a module of this project sets nothing by itself.
"""

from __future__ import annotations

import os
import re

from serve.errors import PipelineError
from serve.quiet import ABSL_UNINITIALIZED_LINE, stderr_without

# What TensorFlow 2.18 prints on import on a machine without CUDA, before absl's logging is set up (so
# TF_CPP_MIN_LOG_LEVEL cannot hide it): its CUDA plugins saying they could not register.
IMPORT_NOISE = re.compile(
    re.escape(ABSL_UNINITIALIZED_LINE) + rb"|E0000 [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] Unable to register cu\w+ factory: .*"
)


def prepare() -> None:
    """Select Keras 2 for `tf.keras`, hide TensorFlow's C++ info lines ("failed call to cuInit" on CPU-only
    machines), and import TensorFlow without its IMPORT_NOISE. With Keras 3, Horovod's DistributedOptimizer
    trains without allreducing and tfmot refuses the models, so a user's TF_USE_LEGACY_KERAS=0 is an error,
    not a preference."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_USE_LEGACY_KERAS"] != "1":
        raise PipelineError(
            f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']}: this pipeline needs Keras 2 (tf_keras); "
            "unset it or set it to 1"
        )
    try:
        with stderr_without(IMPORT_NOISE.fullmatch):
            import tensorflow  # noqa: F401
            import tf_keras  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name not in ("tensorflow", "tf_keras"):
            raise
        raise PipelineError(
            f"{err.name} is not installed: training and quantising need the train extra "
            "(pip install 'edge-pipeline[train]', or `make setup` in the repository); labelling and serving do not"
        ) from None
