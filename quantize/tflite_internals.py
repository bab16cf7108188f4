"""TensorFlow's private TFLite Python API, behind one door: rewriting a model's metadata list.

`tensorflow.lite.python.schema_py_generated` (the schema's object API) and `tensorflow.lite.tools.flatbuffer_utils`
are not public and may change in any TensorFlow release. This is the only module that imports them, and only after
checking that the installed TensorFlow is a release they are known to work with.
"""

from __future__ import annotations

import functools

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


def replace_metadata(model: bytes, entries: dict[str, bytes]) -> bytes:
    """`model` with one `Model.metadata` entry per name in `entries`, each holding its bytes in a new buffer.
    Older entries of those names are dropped; other metadata is kept."""
    schema, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    tree.metadata = [entry for entry in (tree.metadata or []) if _name(entry) not in entries]
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
