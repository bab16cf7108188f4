"""Writing the bundle's metadata into the .tflite flatbuffer, signed (serve/bundle.py reads and checks it)."""

from __future__ import annotations

import json

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from serve.bundle import BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME, CHECKSUM_PLACEHOLDER, sign_bundle


def embed_metadata(model: bytes, metadata: dict) -> bytes:
    """`model` with `metadata` stored as JSON under BUNDLE_METADATA_NAME and its checksum under
    CHECKSUM_METADATA_NAME (replacing older copies of both)."""
    return embed_metadata_bytes(model, json.dumps(metadata, sort_keys=True).encode("utf-8"))


def embed_metadata_bytes(model: bytes, document: bytes) -> bytes:
    """`embed_metadata` with the document's bytes given as they are (tests give it malformed ones)."""
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    ours = (BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME)
    tree.metadata = [entry for entry in (tree.metadata or []) if _name(entry) not in ours]
    # The checksum goes in as a placeholder; once the flatbuffer is laid out, sign_bundle writes it in place.
    for name, data in ((BUNDLE_METADATA_NAME, document), (CHECKSUM_METADATA_NAME, CHECKSUM_PLACEHOLDER)):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        tree.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(tree.buffers) - 1
        tree.metadata.append(entry)
    return sign_bundle(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))


def _name(entry) -> str:
    return entry.name.decode() if isinstance(entry.name, bytes) else entry.name
