"""Reading a bundle: one .tflite file whose metadata carries labels, input spec and provenance.

The quantize stage stores a JSON document under the metadata name `BUNDLE_METADATA_NAME` in the
model's flatbuffer (the `Model.metadata` list of the TFLite schema). Reading it needs no TensorFlow:
the few flatbuffer lookups below follow tensorflow/lite/schema/schema.fbs.
"""

from __future__ import annotations

import json
import os
import struct

from serve.errors import BundleError

BUNDLE_METADATA_NAME = "edge_pipeline.bundle"
TFLITE_IDENTIFIER = b"TFL3"

# Field indices in schema.fbs.
_MODEL_BUFFERS = 4
_MODEL_METADATA = 6
_METADATA_NAME = 0
_METADATA_BUFFER = 1
_BUFFER_DATA = 0


class FlatBuffer:
    """Just enough of a flatbuffer reader for the TFLite schema: tables, vectors, strings."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.data, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of a table's field, or None when the field is absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        vtable_size = struct.unpack_from("<H", self.data, vtable)[0]
        slot = 4 + 2 * index
        if slot >= vtable_size:
            return None
        offset = struct.unpack_from("<H", self.data, vtable + slot)[0]
        return table + offset if offset else None

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, pos: int) -> tuple[int, int]:
        """(position of the first element, length) of the vector referenced at `pos`."""
        start = self.deref(pos)
        return start + 4, self.u32(start)

    def string(self, pos: int) -> str:
        start, length = self.vector(pos)
        return self.data[start : start + length].decode("utf-8")


def read_model_metadata(model: bytes) -> dict[str, bytes]:
    """Every `Model.metadata` entry of a TFLite flatbuffer, by name."""
    buf = FlatBuffer(model)
    root = buf.deref(0)
    entries: dict[str, bytes] = {}
    metadata = buf.field(root, _MODEL_METADATA)
    buffers = buf.field(root, _MODEL_BUFFERS)
    if metadata is None or buffers is None:
        return entries
    buffers_start, buffer_count = buf.vector(buffers)
    start, count = buf.vector(metadata)
    for i in range(count):
        entry = buf.deref(start + 4 * i)
        name_pos = buf.field(entry, _METADATA_NAME)
        index_pos = buf.field(entry, _METADATA_BUFFER)
        if name_pos is None or index_pos is None:
            continue
        index = buf.u32(index_pos)
        if index >= buffer_count:
            continue
        buffer = buf.deref(buffers_start + 4 * index)
        data_pos = buf.field(buffer, _BUFFER_DATA)
        if data_pos is None:
            entries[buf.string(name_pos)] = b""
            continue
        data_start, length = buf.vector(data_pos)
        entries[buf.string(name_pos)] = model[data_start : data_start + length]
    return entries


def read_model_file(path: str | os.PathLike) -> bytes:
    """The bytes of a .tflite file, or a BundleError naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BundleError(f"{path}: no such model file")
    if os.path.isdir(path):
        raise BundleError(f"{path}: is a directory, not a .tflite model")
    with open(path, "rb") as f:
        model = f.read()
    if len(model) < 8 or model[4:8] != TFLITE_IDENTIFIER:
        raise BundleError(f"{path}: not a TFLite model (no TFL3 identifier)")
    return model


def read_bundle_metadata(path: str | os.PathLike, model: bytes) -> dict | None:
    """The pipeline's JSON metadata inside the model, or None for a plain .tflite file."""
    try:
        raw = read_model_metadata(model).get(BUNDLE_METADATA_NAME)
    except struct.error:
        raise BundleError(f"{path}: corrupt TFLite flatbuffer") from None
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable bundle metadata ({err})") from None


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line; blank trailing lines ignored."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise BundleError(f"{path}: no such labels file") from None
    except IsADirectoryError:
        raise BundleError(f"{path}: is a directory, not a labels file") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path}: labels file is not UTF-8 text") from None
    labels = text.rstrip("\n").split("\n")
    return [label.rstrip("\r") for label in labels] if text.strip() else []
