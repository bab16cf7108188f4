"""The TFLite flatbuffer layout, read without TensorFlow: the schema.fbs fields we use, a bounds-checked reader.

The one Python module that knows tensorflow/lite/schema/schema.fbs: serve/bundle.py finds the metadata entries
with it and checks the model's structure before LiteRT sees it, serve/web/server.py checks that the input's batch
is fixed for LiteRT.js, quantize/metadata.py signs what it embeds. The Android demo keeps its own copy of these
indices (android_demo/.../TfliteFlatBuffer.java) and of check_structure's rules and messages (ModelStructure.java):
Java cannot import Python, so a change here goes there too (tests/test_android.py compares their verdicts).
"""

from __future__ import annotations

import math
import struct

TFLITE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every .tflite file

# Field indices in schema.fbs (the order of the fields in each table).
MODEL_OPERATOR_CODES = 1
MODEL_SUBGRAPHS = 2
MODEL_BUFFERS = 4
MODEL_METADATA = 6
MODEL_SIGNATURE_DEFS = 7
SUBGRAPH_TENSORS = 0
SUBGRAPH_INPUTS = 1
SUBGRAPH_OUTPUTS = 2
SUBGRAPH_OPERATORS = 3
TENSOR_SHAPE = 0
TENSOR_TYPE = 1
TENSOR_BUFFER = 2
TENSOR_NAME = 3
TENSOR_QUANTIZATION = 4
TENSOR_SHAPE_SIGNATURE = 7
QUANTIZATION_SCALE = 2
QUANTIZATION_ZERO_POINT = 3
QUANTIZATION_QUANTIZED_DIMENSION = 6
OPERATOR_OPCODE_INDEX = 0
OPERATOR_INPUTS = 1
OPERATOR_OUTPUTS = 2
OPERATOR_INTERMEDIATES = 8
OPERATOR_CODE_DEPRECATED_BUILTIN_CODE = 0
OPERATOR_CODE_BUILTIN_CODE = 3
SIGNATURE_DEF_INPUTS = 0
SIGNATURE_DEF_OUTPUTS = 1
SIGNATURE_DEF_KEY = 2
SIGNATURE_DEF_SUBGRAPH_INDEX = 4
TENSOR_MAP_NAME = 0
TENSOR_MAP_TENSOR_INDEX = 1
METADATA_NAME = 0
METADATA_BUFFER = 1
BUFFER_DATA = 0
BUFFER_OFFSET = 1
BUFFER_SIZE = 2

# enum TensorType, by value.
TENSOR_TYPES = (
    "float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64", "int8", "float64",
    "complex128", "uint64", "resource", "variant", "uint32", "uint16", "int4", "bfloat16", "int2", "uint4",
    "float8_e4m3fn", "float8_e5m2",
)  # fmt: skip
# The zero points TFLite's quantisation allows, by type (its quantization spec): asymmetric 8-bit and narrower
# integers anywhere in the type's range; int16 activations and int32/int64 biases are symmetric, zero point 0;
# no other type is quantised.
ZERO_POINT_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1)}
# The inputs that LiteRT's kernels read as optional, so that they may be -1 (none), by BuiltinOperator: the bias of
# CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV. Other kernels take a -1 for a tensor and crash (a
# convolution whose filter was -1 segfaulted), so no other input may be absent.
OPTIONAL_INPUTS = {3: (2,), 4: (2,), 9: (2,), 67: (3,)}
# Scales a tensor may have: LiteRT's kernels multiply two scales in float32 (input x filter), so each stays within
# 2^-63..2^63 for their product to stay a finite, normal float32. Real scales lie around 1e-10..1e3.
MIN_SCALE, MAX_SCALE = 2.0**-63, 2.0**63


class FlatBuffer:
    """Just enough of a flatbuffer reader for the TFLite schema: tables, vectors, strings.

    An offset that leads outside the data raises ValueError or struct.error instead of reading garbage. Every
    position is a sum of unsigned offsets but a vtable's, so that one is checked here and struct checks the end.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _inside(self, pos: int, size: int) -> int:
        if pos < 0 or pos + size > len(self.data):
            raise ValueError(f"offset {pos} is outside the {len(self.data)}-byte file")
        return pos

    def u32(self, pos: int) -> int:
        return _U32.unpack_from(self.data, self._inside(pos, 4))[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of a table's field, or None when the field is absent. (The hottest code here: a
        table's position is never negative, and struct refuses to read past the end.)"""
        vtable = table - _I32.unpack_from(self.data, table)[0]
        if vtable < 0:
            raise ValueError(f"offset {vtable} is outside the {len(self.data)}-byte file")
        slot = 4 + 2 * index
        if slot + 2 > _U16.unpack_from(self.data, vtable)[0]:
            return None
        offset = _U16.unpack_from(self.data, vtable + slot)[0]
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

    def scalar(self, table: int, index: int, code: str) -> int:
        """A table's scalar field of struct `code` ("b", "i", "I", "Q"); 0, the schema's default, when absent."""
        pos = self.field(table, index)
        return 0 if pos is None else struct.unpack_from("<" + code, self.data, pos)[0]

    def raw(self, table: int, index: int, item_size: int) -> bytes | None:
        """The bytes of a table's vector field of `item_size`-byte scalars, or None when the field is absent."""
        pos = self.field(table, index)
        if pos is None:
            return None
        start, length = self.vector(pos, item_size)
        return self.data[start : start + length * item_size]

    def numbers(self, table: int, index: int, code: str) -> tuple | None:
        """A table's vector of scalars of struct `code` ("i", "f", "q"), or None when the field is absent."""
        pos = self.field(table, index)
        return None if pos is None else self._elements(pos, code)[1]

    def tables(self, table: int, index: int) -> list[int]:
        """The positions of the tables in a table's vector of tables (none when the field is absent)."""
        pos = self.field(table, index)
        if pos is None:
            return []
        start, offsets = self._elements(pos, "I")
        return [start + 4 * i + offset for i, offset in enumerate(offsets)]

    def _elements(self, pos: int, code: str) -> tuple[int, tuple]:
        """(position of the first element, the elements) of the vector of struct `code` referenced at `pos`."""
        start = pos + _U32.unpack_from(self.data, pos)[0] + 4
        count = _U32.unpack_from(self.data, start - 4)[0]
        return start, struct.unpack_from(f"<{count}{code}", self.data, start)


_U16, _I32, _U32 = struct.Struct("<H"), struct.Struct("<i"), struct.Struct("<I")


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


def check_structure(model: bytes, max_elements: int) -> None:
    """ValueError saying what is wrong (and where: "tensor 3 ('conv/bias'): ...") unless every part of the model
    that LiteRT trusts without checking is sound: each tensor of each subgraph (a known type, a shape of at most
    `max_elements` elements, quantisation LiteRT's kernels can compute with, a UTF-8 name) and every index that
    points from one table to another (buffers, tensors, operator codes, subgraphs).

    struct.error is possible too, where an offset leads outside the file.
    """
    buf = FlatBuffer(model)
    root = buf.deref(0)
    buffers = buf.tables(root, MODEL_BUFFERS)
    for i, buffer in enumerate(buffers):
        offset = buf.scalar(buffer, BUFFER_OFFSET, "Q")  # data stored after the flatbuffer, for models over 2 GB
        if offset > 1 and offset + buf.scalar(buffer, BUFFER_SIZE, "Q") > len(model):
            raise ValueError(f"buffer {i} lies outside the {len(model)}-byte file")
    # An operator code's builtin is the larger of its two fields (schema.fbs: the int8 one is kept for old readers).
    codes = buf.tables(root, MODEL_OPERATOR_CODES)
    deprecated = [buf.scalar(code, OPERATOR_CODE_DEPRECATED_BUILTIN_CODE, "b") for code in codes]
    builtins = [max(old, buf.scalar(code, OPERATOR_CODE_BUILTIN_CODE, "i")) for old, code in zip(deprecated, codes)]
    subgraphs = buf.tables(root, MODEL_SUBGRAPHS)
    if not subgraphs:
        raise ValueError("the model has no subgraph")
    tensor_counts = []
    for s, subgraph in enumerate(subgraphs):
        where = "" if len(subgraphs) == 1 else f"subgraph {s} "
        tensors = buf.tables(subgraph, SUBGRAPH_TENSORS)
        for t, tensor in enumerate(tensors):
            _check_tensor(buf, tensor, f"{where}tensor {t}", len(buffers), max_elements)
        count = len(tensors)
        tensor_counts.append(count)
        _check_indices(buf.numbers(subgraph, SUBGRAPH_INPUTS, "i"), count, f"{where}input")
        _check_indices(buf.numbers(subgraph, SUBGRAPH_OUTPUTS, "i"), count, f"{where}output")
        for o, operator in enumerate(buf.tables(subgraph, SUBGRAPH_OPERATORS)):
            opcode = buf.scalar(operator, OPERATOR_OPCODE_INDEX, "I")
            if opcode >= len(builtins):
                raise ValueError(f"{where}operator {o} names operator code {opcode} of {len(builtins)}")
            what = f"{where}operator {o}"
            optional = OPTIONAL_INPUTS.get(builtins[opcode], ())
            _check_indices(buf.numbers(operator, OPERATOR_INPUTS, "i"), count, f"{what} input", optional)
            _check_indices(buf.numbers(operator, OPERATOR_OUTPUTS, "i"), count, f"{what} output")
            _check_indices(buf.numbers(operator, OPERATOR_INTERMEDIATES, "i"), count, f"{what} intermediate")
    for d, signature in enumerate(buf.tables(root, MODEL_SIGNATURE_DEFS)):
        _utf8(buf, signature, SIGNATURE_DEF_KEY, f"signature {d}")
        index = buf.scalar(signature, SIGNATURE_DEF_SUBGRAPH_INDEX, "I")
        if index >= len(subgraphs):
            raise ValueError(f"signature {d} names subgraph {index} of {len(subgraphs)}")
        for field in (SIGNATURE_DEF_INPUTS, SIGNATURE_DEF_OUTPUTS):
            for entry in buf.tables(signature, field):
                _utf8(buf, entry, TENSOR_MAP_NAME, f"signature {d}")
                tensor = buf.scalar(entry, TENSOR_MAP_TENSOR_INDEX, "I")
                if tensor >= tensor_counts[index]:
                    raise ValueError(f"signature {d} names tensor {tensor} of {tensor_counts[index]}")


def _check_indices(indices: tuple | None, count: int, what: str, optional: tuple[int, ...] = ()) -> None:
    """ValueError unless each of `indices` names one of `count` tensors, or is -1 (none) at an `optional` place."""
    if indices and (min(indices) < 0 or max(indices) >= count):
        for place, index in enumerate(indices):
            if not (0 <= index < count or (index == -1 and place in optional)):
                raise ValueError(f"{what} {place} names tensor {index} of {count}")


def _utf8(buf: FlatBuffer, table: int, index: int, where: str) -> str:
    """A table's string field ("" when absent), or a ValueError naming `where` when it is not UTF-8."""
    pos = buf.field(table, index)
    try:
        return "" if pos is None else buf.string(pos)
    except UnicodeDecodeError:
        raise ValueError(f"{where}: its name is not UTF-8") from None


def _check_tensor(buf: FlatBuffer, tensor: int, where: str, buffer_count: int, max_elements: int) -> None:
    name = _utf8(buf, tensor, TENSOR_NAME, where)
    where = f"{where} ({name if len(name) <= 80 else name[:80] + '...'!r})"
    type_code = buf.scalar(tensor, TENSOR_TYPE, "b")
    if not 0 <= type_code < len(TENSOR_TYPES):
        raise ValueError(f"{where}: unknown type {type_code}")
    shape = buf.numbers(tensor, TENSOR_SHAPE, "i") or ()
    if shape and min(shape) < 0:
        raise ValueError(f"{where}: a negative dimension in its shape {_shown(shape)}")
    if _element_count(shape, max_elements) > max_elements:
        raise ValueError(
            f"{where}: its shape {_shown(shape)} holds more than the {max_elements:,} elements a tensor of a model "
            "this size may have"
        )
    signature = buf.numbers(tensor, TENSOR_SHAPE_SIGNATURE, "i")
    if signature is not None and (
        len(signature) != len(shape) or any(s not in (d, -1) for s, d in zip(signature, shape))
    ):
        raise ValueError(f"{where}: its shape signature {_shown(signature)} does not fit its shape {_shown(shape)}")
    index = buf.scalar(tensor, TENSOR_BUFFER, "I")
    if index >= buffer_count:
        raise ValueError(f"{where}: names buffer {index} of {buffer_count}")
    quantization = buf.field(tensor, TENSOR_QUANTIZATION)
    if quantization is not None:
        problem = _quantization_problem(buf, buf.deref(quantization), TENSOR_TYPES[type_code], shape)
        if problem:
            raise ValueError(f"{where}: {problem}")


def _quantization_problem(buf: FlatBuffer, table: int, type_name: str, shape: tuple) -> str | None:
    """What is wrong with a tensor's quantisation, or None. Without scales LiteRT ignores the rest (min/max)."""
    scales = buf.numbers(table, QUANTIZATION_SCALE, "f")
    if not scales:
        return None
    zero_points = buf.raw(table, QUANTIZATION_ZERO_POINT, 8) or b""
    if len(zero_points) // 8 != len(scales):
        return f"{len(scales)} scales but {len(zero_points) // 8} zero points"
    dimension = buf.scalar(table, QUANTIZATION_QUANTIZED_DIMENSION, "i")
    if not 0 <= dimension < max(len(shape), 1):
        return f"quantized dimension {dimension} of a tensor of shape {_shown(shape)}"
    if len(scales) != 1 and (not shape or len(scales) != shape[dimension]):
        return f"{len(scales)} scales for dimension {dimension} of shape {_shown(shape)}"
    # sum() is NaN or infinite when any scale is: min() and max() skip a NaN.
    if not math.isfinite(sum(scales)) or min(scales) < MIN_SCALE or max(scales) > MAX_SCALE:
        bad = next(s for s in scales if not MIN_SCALE <= s <= MAX_SCALE)
        return f"scale {bad} outside {MIN_SCALE:g}..{MAX_SCALE:g}"
    if not zero_points.strip(b"\0"):  # all 0, in every type's range: weights' and biases' thousands, at a glance
        return None
    zero_points = struct.unpack(f"<{len(scales)}q", zero_points)
    low, high = ZERO_POINT_RANGES.get(type_name, (0, 0))
    if min(zero_points) < low or max(zero_points) > high:
        bad = next(z for z in zero_points if not low <= z <= high)
        return f"zero point {bad} outside {type_name}'s {low}..{high}"
    return None


def _element_count(shape: tuple, limit: int) -> int:
    """The product of `shape`'s dimensions (all >= 0), or a number past `limit` as soon as it passes it: the exact
    product of tens of thousands of large dimensions would take seconds."""
    if 0 in shape:
        return 0
    count = 1
    for dimension in shape:
        count *= dimension
        if count > limit:
            break
    return count


def _shown(shape: tuple) -> str:
    """A shape as a message shows it: a long one's first dimensions and its rank."""
    return str(list(shape)) if len(shape) <= 8 else f"[{', '.join(map(str, shape[:8]))}, ...] (rank {len(shape)})"
