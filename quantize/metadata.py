"""Writing the bundle's metadata into the .tflite flatbuffer (serve/bundle.py reads it back)."""

from __future__ import annotations

import json

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from serve.bundle import BUNDLE_METADATA_NAME


def embed_metadata(model: bytes, metadata: dict) -> bytes:
    """`model` with `metadata` stored as JSON under BUNDLE_METADATA_NAME (replacing an older copy)."""
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    tree.metadata = [entry for entry in (tree.metadata or []) if _name(entry) != BUNDLE_METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = BUNDLE_METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _name(entry) -> str:
    return entry.name.decode() if isinstance(entry.name, bytes) else entry.name
