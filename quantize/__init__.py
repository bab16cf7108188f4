"""Quantisation: QAT or post-training int8, float16/float32 export, the accuracy gate, bundle metadata.

Importing it sets nothing and loads no TensorFlow: entry points call `pipeline.tensorflow_env.prepare()` first.
"""

# Bundle kinds `pipeline quantize` makes. Kept here, free of TensorFlow, so the CLI can list them fast.
MODES = ("int8", "qat", "float16", "float32")
QUANTIZED_MODES = ("int8", "qat")
# Post-training int8 (quantize/convert.py), where it keeps float's answers on too few images: a layer is sensitive,
# and stays in float, when its int8 output's root-mean-square error, with the int8 input it gets, exceeds this many
# of its quantisation steps (rounding alone gives 1/sqrt(12) = 0.29). EfficientNet-Lite0: the stem and first
# depthwise convolution 2.2 and 2.8, three more layers over 0.5, the median 0.30. Lower keeps more layers in float:
# closer to float32's answers, larger and slower (`--sensitive-steps`; docs/quantization.md has what
# EfficientNet-Lite0-2 gain and pay).
SENSITIVE_STEPS = 0.5
