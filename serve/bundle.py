"""Reading a bundle: one .tflite file whose metadata carries labels, input spec and provenance, and a checksum.

The quantize stage stores a JSON document under the metadata name `BUNDLE_METADATA_NAME` in the
model's flatbuffer (the `Model.metadata` list of the TFLite schema), and a second entry,
`CHECKSUM_METADATA_NAME`, whose 64 bytes are the hex sha256 of the whole file with those 64 bytes
read as ASCII '0's. Reading needs no TensorFlow: the few flatbuffer lookups below follow
tensorflow/lite/schema/schema.fbs, and every offset is checked against the file's length.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from serve.errors import BundleError
from serve.files import MiB, read_regular_file

BUNDLE_METADATA_NAME = "edge_pipeline.bundle"
CHECKSUM_METADATA_NAME = "edge_pipeline.sha256"
CHECKSUM_PLACEHOLDER = b"0" * 64
TFLITE_IDENTIFIER = b"TFL3"
MAX_MODEL_BYTES = 1024 * MiB
MAX_LABELS_BYTES = 16 * MiB
MAX_INPUT_SIDE = 65535  # height, width or channels a bundle's metadata may state

# Field indices in schema.fbs.
_MODEL_BUFFERS = 4
_MODEL_METADATA = 6
_METADATA_NAME = 0
_METADATA_BUFFER = 1
_BUFFER_DATA = 0


class FlatBuffer:
    """Just enough of a flatbuffer reader for the TFLite schema: tables, vectors, strings.

    An offset that leads outside the data raises ValueError instead of reading garbage.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _inside(self, pos: int, size: int) -> int:
        if pos < 0 or pos + size > len(self.data):
            raise ValueError(f"offset {pos} is outside the {len(self.data)}-byte file")
        return pos

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.data, self._inside(pos, 4))[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of a table's field, or None when the field is absent."""
        vtable = table - struct.unpack_from("<i", self.data, self._inside(table, 4))[0]
        vtable_size = struct.unpack_from("<H", self.data, self._inside(vtable, 2))[0]
        slot = 4 + 2 * index
        if slot + 2 > vtable_size:
            return None
        offset = struct.unpack_from("<H", self.data, self._inside(vtable + slot, 2))[0]
        return table + offset if offset else None

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, pos: int, item_size: int = 1) -> tuple[int, int]:
        """(position of the first element, length) of the vector referenced at `pos`."""
        start = self.deref(pos)
        length = self.u32(start)
        self._inside(start + 4, length * item_size)
        return start + 4, length

    def string(self, pos: int) -> str:
        start, length = self.vector(pos)
        return self.data[start : start + length].decode("utf-8")


def metadata_entries(model: bytes) -> dict[str, tuple[int, int]]:
    """Where the data of each `Model.metadata` entry lies in `model`: {name: (start, length)}.

    Raises ValueError (or struct.error) when the flatbuffer is corrupt.
    """
    buf = FlatBuffer(model)
    root = buf.deref(0)
    metadata = buf.field(root, _MODEL_METADATA)
    buffers = buf.field(root, _MODEL_BUFFERS)
    if metadata is None or buffers is None:
        return {}
    buffers_start, buffer_count = buf.vector(buffers, 4)
    start, count = buf.vector(metadata, 4)
    entries: dict[str, tuple[int, int]] = {}
    for i in range(count):
        entry = buf.deref(start + 4 * i)
        name_pos = buf.field(entry, _METADATA_NAME)
        if name_pos is None:
            continue
        index_pos = buf.field(entry, _METADATA_BUFFER)
        index = 0 if index_pos is None else buf.u32(index_pos)  # an absent field holds the default, 0
        if index >= buffer_count:
            raise ValueError(f"metadata entry {i} names buffer {index} of {buffer_count}")
        data_pos = buf.field(buf.deref(buffers_start + 4 * index), _BUFFER_DATA)
        entries[buf.string(name_pos)] = (0, 0) if data_pos is None else buf.vector(data_pos)
    return entries


def _entries(path: str | os.PathLike, model: bytes) -> dict[str, tuple[int, int]]:
    try:
        return metadata_entries(model)
    except (ValueError, struct.error) as err:
        raise BundleError(f"{path}: corrupt TFLite flatbuffer ({err})") from None


def bundle_digest(model: bytes, start: int) -> str:
    """The hex sha256 of `model` with the 64 bytes at `start` (where the checksum goes) read as ASCII '0's."""
    view = memoryview(model)
    digest = hashlib.sha256(view[:start])
    digest.update(CHECKSUM_PLACEHOLDER)
    digest.update(view[start + len(CHECKSUM_PLACEHOLDER) :])
    return digest.hexdigest()


def sign_bundle(model: bytes) -> bytes:
    """`model`, whose CHECKSUM_METADATA_NAME entry holds 64 placeholder bytes, with its checksum written there."""
    start, length = metadata_entries(model)[CHECKSUM_METADATA_NAME]
    if length != len(CHECKSUM_PLACEHOLDER):
        raise ValueError(f"the {CHECKSUM_METADATA_NAME} entry holds {length} bytes, not 64")
    return model[:start] + bundle_digest(model, start).encode("ascii") + model[start + length :]


def verify_bundle(path: str | os.PathLike, model: bytes) -> None:
    """Raise BundleError unless the bundle's checksum matches its bytes. A plain .tflite, without our
    metadata, has nothing to check."""
    entries = _entries(path, model)
    if CHECKSUM_METADATA_NAME not in entries:
        if BUNDLE_METADATA_NAME in entries:
            raise BundleError(
                f"{path}: corrupt or unsigned bundle: no checksum (export it again, or skip the check: "
                "--ignore-checksum, Classifier(verify_checksum=False))"
            )
        return
    start, length = entries[CHECKSUM_METADATA_NAME]
    if length != len(CHECKSUM_PLACEHOLDER) or model[start : start + length] != bundle_digest(model, start).encode():
        raise BundleError(f"{path}: corrupt bundle: checksum does not match")


def read_model_file(path: str | os.PathLike, *, verify_checksum: bool = True) -> bytes:
    """The bytes of a .tflite file, or a BundleError naming the file. A bundle's checksum is checked
    unless `verify_checksum` is False (for a bundle that another tool changed on purpose)."""
    path = os.fspath(path)
    model = read_regular_file(path, MAX_MODEL_BYTES, "a .tflite model", BundleError)
    if len(model) < 8 or model[4:8] != TFLITE_IDENTIFIER:
        raise BundleError(f"{path}: not a TFLite model (no TFL3 identifier)")
    if verify_checksum:
        verify_bundle(path, model)
    return model


def read_bundle_metadata(path: str | os.PathLike, model: bytes) -> dict | None:
    """The pipeline's JSON metadata inside the model, or None for a plain .tflite file.

    BundleError unless it is a JSON object with a list of label strings and an input size.
    """
    where = _entries(path, model).get(BUNDLE_METADATA_NAME)
    if where is None:
        return None
    start, length = where
    try:
        metadata = json.loads(model[start : start + length].decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, an integer too long, nesting too deep
        raise BundleError(f"{path}: unreadable bundle metadata ({err})") from None
    if not isinstance(metadata, dict):
        raise BundleError(f"{path}: bundle metadata is not a JSON object")
    labels = metadata.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BundleError(f"{path}: bundle metadata has no 'labels' list of strings")
    size = metadata.get("input")
    if not isinstance(size, dict) or not all(_is_side(size.get(key)) for key in ("height", "width", "channels")):
        raise BundleError(
            f"{path}: bundle metadata has no 'input' height, width and channels (whole numbers, 1 to {MAX_INPUT_SIDE})"
        )
    return metadata


def _is_side(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_INPUT_SIDE


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line (any newline convention); blank trailing lines ignored."""
    path = os.fspath(path)
    data = read_regular_file(path, MAX_LABELS_BYTES, "a labels file", BundleError)
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: labels file is not UTF-8 text") from None
    return text.rstrip("\n").split("\n") if text.strip() else []
