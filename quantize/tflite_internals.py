"""TensorFlow's private TFLite Python API, behind one door: rewriting a model's metadata list, graph, biases and
recorded activation ranges, and the converter's calibrate and quantise steps taken one at a time.

`tensorflow.lite.python.schema_py_generated` (the schema's object API), `tensorflow.lite.tools.flatbuffer_utils`,
`tensorflow.lite.python.convert.mlir_quantize` and the converter's `_experimental_calibrate_only` are not public
and may change in any TensorFlow release. This is the only module that uses them, and only after checking that the
installed TensorFlow is a release they are known to work with.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import NamedTuple

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


# Added for float logits from int8-stored weights (quantize/convert.py): weight-only int8, which the converter makes
# only for a whole model.
DEQUANTIZE_INT8_VERSION = 2  # TFLite 2.18 runs per-channel int8 under this version too (5 is newer)


def weights_stored_int8(model: bytes, op_names: Collection[str]) -> bytes:
    """`model` with the float32 weights of the ops whose output tensors are named in `op_names` stored as int8 (per
    output channel, symmetric, -127..127 times max|w| / 127: how the converter rounds weights) and turned back into
    float32 by a DEQUANTIZE op placed before each, which runtimes run once, when the model loads. The ops themselves
    stay float: their outputs are not rounded to 256 levels."""
    schema, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = tree.subgraphs[0]
    dequantize = schema.OperatorCodeT()
    dequantize.builtinCode = dequantize.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    dequantize.version = DEQUANTIZE_INT8_VERSION
    tree.operatorCodes.append(dequantize)
    uses = np.bincount([tensor.buffer for tensor in graph.tensors], minlength=len(tree.buffers))
    operators = []
    for op in graph.operators:
        weights = graph.tensors[op.inputs[1]] if len(op.inputs) > 1 else None
        if _name(graph.tensors[op.outputs[0]]) in op_names and weights is not None:
            if weights.type != schema.TensorType.FLOAT32 or uses[weights.buffer] != 1:
                raise ValueError(f"{_name(weights)}: not float32 weights of their own")
            operators.append(_dequantize_op(schema, tree, graph, op.inputs[1], len(tree.operatorCodes) - 1))
        operators.append(op)
    graph.operators = operators
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _dequantize_op(schema, tree, graph, index: int, opcode: int):
    """A DEQUANTIZE op making float32 constant tensor `index` from a new int8 copy of it, which takes its data."""
    weights = graph.tensors[index]
    values = tree.buffers[weights.buffer].data.view(np.float32).reshape(weights.shape)
    largest = np.abs(values).reshape(len(values), -1).max(axis=1)
    scale = np.where(largest > 0, largest / 127, 1.0).astype(np.float32)
    stored = np.clip(np.round(values / scale.reshape(-1, *[1] * (values.ndim - 1))), -127, 127).astype(np.int8)
    quantized = schema.TensorT()
    quantized.shape, quantized.type, quantized.buffer = weights.shape, schema.TensorType.INT8, weights.buffer
    quantized.name = _name(weights) + "_int8"
    quantized.quantization = schema.QuantizationParametersT()
    quantized.quantization.scale = scale
    quantized.quantization.zeroPoint = np.zeros(len(scale), np.int64)
    quantized.quantization.quantizedDimension = 0
    tree.buffers[weights.buffer].data = stored.reshape(-1).view(np.uint8)
    tree.buffers.append(schema.BufferT())  # the float weights become the DEQUANTIZE's output: no data of their own
    weights.buffer = len(tree.buffers) - 1
    graph.tensors.append(quantized)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode, np.array([len(graph.tensors) - 1]), np.array([index])
    return op


# Added for int8 that keeps float's answers (quantize/convert.py): the converter's two steps taken apart, so that
# chosen ops can stay in float and the int8 graph's biases can be corrected after the fact.
def calibrate_only(converter) -> bytes:
    """What `converter` (set up for full-integer quantisation, with a representative dataset) makes before it
    quantises: the float graph with each tensor's calibrated range recorded in it."""
    _private_api()
    converter._experimental_calibrate_only = True
    return converter.convert()


def quantize_calibrated(
    calibrated_model: bytes, float_ops: Collection[str] = (), *, numeric_verify: bool = False
) -> bytes:
    """The integer graph of `calibrated_model` with uint8 input and float32 output, as the converter would make it,
    except that the ops whose output tensors are named in `float_ops` run in float on float inputs (a run of such
    ops passes float tensors from one to the next). With `numeric_verify`, the debug graph that
    tf.lite.experimental.QuantizationDebugger reads."""
    _private_api()
    import tensorflow as tf
    from tensorflow.lite.python.convert import deduplicate_readonly_buffers, mlir_quantize

    model = mlir_quantize(
        calibrated_model,
        input_data_type=tf.uint8,
        output_data_type=tf.float32,
        enable_numeric_verify=numeric_verify,
        denylisted_nodes=list(float_ops) or None,
    )
    return model if numeric_verify else deduplicate_readonly_buffers(model)


def recorded_ranges(calibrated_model: bytes) -> dict[str, tuple[float, float]]:
    """The (min, max) that calibration recorded for each tensor of `calibrated_model` but its inputs, by name."""
    _, flatbuffer_utils = _private_api()
    graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated_model)).subgraphs[0]
    return {
        _name(tensor): (float(tensor.quantization.min[0]), float(tensor.quantization.max[0]))
        for i, tensor in enumerate(graph.tensors)
        if i not in graph.inputs and _one_range(tensor)
    }


def with_ranges(calibrated_model: bytes, ranges: dict[str, tuple[float, float]]) -> bytes:
    """`calibrated_model` with the recorded (min, max) of the tensors named in `ranges` replaced by theirs."""
    _, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated_model))
    for tensor in tree.subgraphs[0].tensors:
        if _name(tensor) in ranges and _one_range(tensor):
            low, high = ranges[_name(tensor)]
            tensor.quantization.min, tensor.quantization.max = np.array([low], np.float32), np.array([high], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _one_range(tensor) -> bool:
    quantization = tensor.quantization
    return quantization is not None and quantization.min is not None and len(quantization.min) == 1


class GraphOp(NamedTuple):
    """One op of a TFLite graph: its output tensor's name (what `quantize_calibrated` takes), the names of the ops that
    produce its inputs, whether it has weights (a convolution or fully-connected layer), the range its fused
    activation clamps its output to, and the depth (last dimension) of its first input."""

    name: str
    producers: tuple[str, ...]
    weighted: bool
    clamp: tuple[float, float]
    input_depth: int


def graph_ops(model: bytes) -> list[GraphOp]:
    """The ops of `model`'s main graph in execution order."""
    schema, flatbuffer_utils = _private_api()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = tree.subgraphs[0]
    weighted = {
        schema.BuiltinOperator.CONV_2D,
        schema.BuiltinOperator.DEPTHWISE_CONV_2D,
        schema.BuiltinOperator.FULLY_CONNECTED,
    }
    clamps = {
        schema.ActivationFunctionType.RELU: (0.0, np.inf),
        schema.ActivationFunctionType.RELU6: (0.0, 6.0),
        schema.ActivationFunctionType.RELU_N1_TO_1: (-1.0, 1.0),
    }
    producer = {}
    ops = []
    for op in graph.operators:
        code = tree.operatorCodes[op.opcodeIndex]
        name = _name(graph.tensors[op.outputs[0]])
        activation = getattr(op.builtinOptions, "fusedActivationFunction", None)
        ops.append(
            GraphOp(
                name=name,
                producers=tuple(producer[i] for i in op.inputs if i in producer),
                weighted=max(code.builtinCode, code.deprecatedBuiltinCode) in weighted,
                clamp=clamps.get(activation, (-np.inf, np.inf)),
                input_depth=_depth(graph.tensors[op.inputs[0]]),
            )
        )
        producer.update({i: name for i in op.outputs})
    return ops


def _depth(tensor) -> int:
    return int(tensor.shape[-1]) if tensor.shape is not None and len(tensor.shape) else 1


class BiasEditor:
    """A TFLite model whose weighted ops' biases can be shifted one by one: int32 biases of integer ops in steps of
    their own scale (input scale times weight scale, per channel), float biases as they are."""

    def __init__(self, model: bytes) -> None:
        schema, flatbuffer_utils = _private_api()
        self._tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
        graph = self._tree.subgraphs[0]
        # Op output name: bias tensor, in graph order.
        self._biases = {
            _name(graph.tensors[op.outputs[0]]): graph.tensors[op.inputs[2]]
            for op in graph.operators
            if len(op.inputs) > 2 and op.inputs[2] >= 0
        }
        self._int32 = schema.TensorType.INT32

    def subtract(self, op_name: str, shift: np.ndarray) -> None:
        """Take `shift` (per output channel, in the op's float output units) off the bias of op `op_name`; an op
        without a bias (the converter drops all-zero ones) is left as it is."""
        if op_name not in self._biases:
            return
        bias = self._biases[op_name]
        buffer = self._tree.buffers[bias.buffer]
        if bias.type == self._int32:
            steps = np.round(shift / np.asarray(bias.quantization.scale, np.float64)).astype(np.int32)
            buffer.data = (buffer.data.view(np.int32) - steps).view(np.uint8)
        else:
            buffer.data = (buffer.data.view(np.float32) - shift.astype(np.float32)).view(np.uint8)

    def take_biases(self, other: bytes, op_names: Collection[str]) -> None:
        """Give the ops `op_names` the biases that the ops in the same places have in `other`, a model of the same
        graph (its names may differ). Nothing is taken when the graphs' biased ops do not pair up (the converter
        drops an all-zero bias, for one)."""
        donor = BiasEditor(other)
        if len(donor._biases) != len(self._biases):
            return
        for (name, ours), theirs in zip(self._biases.items(), donor._biases.values()):
            if name in op_names:
                self._tree.buffers[ours.buffer].data = donor._tree.buffers[theirs.buffer].data.copy()

    def model(self) -> bytes:
        _, flatbuffer_utils = _private_api()
        return bytes(flatbuffer_utils.convert_object_to_bytearray(self._tree))
