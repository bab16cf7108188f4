"""TensorFlow's private TFLite Python API, behind one door: rewriting a model's metadata list.

`tensorflow.lite.python.schema_py_generated` (the schema's object API) and `tensorflow.lite.tools.flatbuffer_utils`
are not public and may change in any TensorFlow release. This is the only module that imports them, and only after
checking that the installed TensorFlow is a release they are known to work with.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import numpy as np

from serve.errors import PipelineError

SUPPORTED_TENSORFLOW = "2.18"  # major.minor: every 2.18.x


def check_version(installed: str) -> None:
    """PipelineError unless TensorFlow version `installed` (e.g. "2.18.1") is in the supported range."""
    if installed.split(".")[:2] != SUPPORTED_TENSORFLOW.split("."):
        raise PipelineError(
            f"TensorFlow {installed} is installed, but quantize/tflite_internals.py uses TensorFlow's private TFLite "
            f"API as of {SUPPORTED_TENSORFLOW}.x only; install tensorflow=={SUPPORTED_TENSORFLOW}.* (pip install -e .)"
        )


@functools.cache
def _private_api():
    """(schema_py_generated, flatbuffer_utils), imported once the TensorFlow version is known to be supported."""
    import tensorflow as tf

    check_version(tf.__version__)
    try:
        from tensorflow.lite.python import schema_py_generated
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as err:
        raise PipelineError(f"TensorFlow {tf.__version__}: its private TFLite API is missing ({err})") from None
    return schema_py_generated, flatbuffer_utils


def replace_metadata(model: bytes, entries: dict[str, bytes], drop: Collection[str] = ()) -> bytes:
    """`model` with one `Model.metadata` entry per name in `entries`, each holding its bytes in a new buffer.
    Older entries of those names, and entries named in `drop`, are left out and their buffers emptied; other
    metadata is kept. The flatbuffer is laid out anew: bytes after it (a zip of associated files) are not kept."""
    schema, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    replaced = [entry for entry in (tree.metadata or []) if _name(entry) in {*entries, *drop}]
    for entry in replaced:
        tree.buffers[entry.buffer].data = None  # emptied, not removed: other buffers keep their indices
    tree.metadata = [entry for entry in (tree.metadata or []) if entry not in replaced]
    for name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        tree.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(tree.buffers) - 1
        tree.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _name(entry) -> str:
    return entry.name.decode() if isinstance(entry.name, bytes) else entry.name


# Added for int8 scores (quantize/convert.py): the one graph rewrite the converter cannot be asked for.
def softmax_in_float(model: bytes) -> bytes:
    """`model`, an integer graph that ends SOFTMAX (int8) -> DEQUANTIZE (float32 output), with the two swapped:
    the int8 logits are dequantized and the softmax runs in float32. The output keeps its index, name and type;
    the scores no longer come in steps of 1/256."""
    schema, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = tree.subgraphs[0]
    last_two = [tree.operatorCodes[op.opcodeIndex] for op in graph.operators[-2:]]
    kinds = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in last_two]
    if kinds != [schema.BuiltinOperator.SOFTMAX, schema.BuiltinOperator.DEQUANTIZE]:
        raise ValueError("the model does not end in an integer softmax followed by a dequantize")
    softmax, dequantize = graph.operators[-2:]
    logits, int8_scores, scores = softmax.inputs[0], softmax.outputs[0], dequantize.outputs[0]
    # The int8 scores tensor becomes the float logits between the two.
    between = graph.tensors[int8_scores]
    between.type, between.quantization, between.name = schema.TensorType.FLOAT32, None, b"logits_float32"
    dequantize.inputs, dequantize.outputs = np.array([logits]), np.array([int8_scores])
    softmax.inputs, softmax.outputs = np.array([int8_scores]), np.array([scores])
    graph.operators[-2:] = [dequantize, softmax]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))
