"""Quantisation: QAT or post-training int8, float16/float32 export, the accuracy gate, bundle metadata.

Horovod and tfmot need Keras 2 (tf_keras); TensorFlow only uses it when this variable is set before
tensorflow is first imported, so it is set here, before any module of this package imports it.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hides "failed call to cuInit" on CPU-only machines

# Bundle kinds `pipeline quantize` makes. Kept here, free of TensorFlow, so the CLI can list them fast.
MODES = ("int8", "qat", "float16", "float32")
QUANTIZED_MODES = ("int8", "qat")
