"""The TFLite flatbuffer layout, read without TensorFlow: the schema.fbs fields we use, a bounds-checked reader.

The one Python module that knows tensorflow/lite/schema/schema.fbs: serve/bundle.py finds the metadata entries
with it, serve/web/server.py checks that the input's batch is fixed for LiteRT.js, quantize/metadata.py signs what
it embeds. The Android demo (android_demo/.../TfliteFlatBuffer.java) keeps its own copy of these indices: Java
cannot import Python.
"""

from __future__ import annotations

import struct

TFLITE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every .tflite file

# Field indices in schema.fbs (the order of the fields in each table).
MODEL_SUBGRAPHS = 2
MODEL_BUFFERS = 4
MODEL_METADATA = 6
SUBGRAPH_TENSORS = 0
SUBGRAPH_INPUTS = 1
TENSOR_SHAPE = 0
TENSOR_SHAPE_SIGNATURE = 7
METADATA_NAME = 0
METADATA_BUFFER = 1
BUFFER_DATA = 0


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


def read_model_metadata(model: bytes) -> dict[str, tuple[int, int]]:
    """Where the data of each `Model.metadata` entry lies in `model`: {name: (start, length)}.

    Raises ValueError (or struct.error) when the flatbuffer is corrupt.
    """
    buf = FlatBuffer(model)
    root = buf.deref(0)
    metadata = buf.field(root, MODEL_METADATA)
    buffers = buf.field(root, MODEL_BUFFERS)
    if metadata is None or buffers is None:
        return {}
    buffers_start, buffer_count = buf.vector(buffers, 4)
    start, count = buf.vector(metadata, 4)
    entries: dict[str, tuple[int, int]] = {}
    for i in range(count):
        entry = buf.deref(start + 4 * i)
        name_pos = buf.field(entry, METADATA_NAME)
        if name_pos is None:
            continue
        index_pos = buf.field(entry, METADATA_BUFFER)
        index = 0 if index_pos is None else buf.u32(index_pos)  # an absent field holds the default, 0
        if index >= buffer_count:
            raise ValueError(f"metadata entry {i} names buffer {index} of {buffer_count}")
        data_pos = buf.field(buf.deref(buffers_start + 4 * index), BUFFER_DATA)
        entries[buf.string(name_pos)] = (0, 0) if data_pos is None else buf.vector(data_pos)
    return entries


def input_shape_signatures(model: bytes) -> list[list[int]]:
    """The shape signature of each input of the model's first subgraph (its shape where it has none): -1 marks
    a dimension left open, such as the batch of a model converted without a fixed batch size."""
    buf = FlatBuffer(model)
    subgraphs = buf.field(buf.deref(0), MODEL_SUBGRAPHS)
    if subgraphs is None:
        return []
    subgraph = buf.deref(buf.vector(subgraphs, 4)[0])
    inputs, tensors = buf.field(subgraph, SUBGRAPH_INPUTS), buf.field(subgraph, SUBGRAPH_TENSORS)
    if inputs is None or tensors is None:
        return []
    tensors_start, tensor_count = buf.vector(tensors, 4)
    inputs_start, input_count = buf.vector(inputs, 4)
    signatures = []
    for i in range(input_count):
        index = struct.unpack_from("<i", model, inputs_start + 4 * i)[0]
        if not 0 <= index < tensor_count:
            raise ValueError(f"input {i} names tensor {index} of {tensor_count}")
        tensor = buf.deref(tensors_start + 4 * index)
        where = buf.field(tensor, TENSOR_SHAPE_SIGNATURE) or buf.field(tensor, TENSOR_SHAPE)
        if where is None:
            signatures.append([])
            continue
        start, rank = buf.vector(where, 4)
        signatures.append(list(struct.unpack_from(f"<{rank}i", model, start)))
    return signatures
