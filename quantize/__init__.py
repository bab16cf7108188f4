"""Quantisation: QAT or post-training int8, float16/float32 export, the accuracy gate, bundle metadata.

Importing it sets nothing and loads no TensorFlow: entry points call `pipeline.tensorflow_env.prepare()` first.
"""

# Bundle kinds `pipeline quantize` makes. Kept here, free of TensorFlow, so the CLI can list them fast.
MODES = ("int8", "qat", "float16", "float32")
QUANTIZED_MODES = ("int8", "qat")
