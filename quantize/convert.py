"""Keras model -> TFLite flatbuffer: float32, float16, post-training int8, or quantisation-aware int8."""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from typing import Protocol

import numpy as np
import tensorflow as tf
import tf_keras as keras

from quantize import MODES, QUANTIZED_MODES, SENSITIVE_STEPS
from quantize.tflite_internals import (
    BiasEditor,
    GraphOp,
    calibrate_only,
    graph_ops,
    quantize_calibrated,
    recorded_ranges,
    softmax_in_float,
    weights_stored_int8,
    with_ranges,
)
from serve.quiet import ABSL_UNINITIALIZED_LINE, LITERT_INFO_LINE, stderr_without


class Images(Protocol):
    """uint8 images (N, H, W, C) indexed like a numpy array: an array, or a view that reads them from disk when
    indexed (train's data cache). A view may be larger than memory: take slices or index arrays, never all of it."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...


# What TensorFlow's converter (and the interpreters int8's checks run) print on stderr at every conversion,
# and tell a user nothing.
CONVERTER_NOISE = re.compile(
    re.escape(LITERT_INFO_LINE)
    + rb"|"
    + re.escape(ABSL_UNINITIALIZED_LINE)
    + rb"|[WI]0000 [\d:.]+ +\d+ (tf_tfl_flatbuffer_helpers|mlir_graph_optimization_pass)\.cc:\d+\] "
    rb"(Ignored output_format\.|Ignored drop_control_dependency\.|MLIR V1 optimization pass is not enabled)"
    rb"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"
)


def to_tflite(model, mode: str, calibration: Images | None = None, sensitive_steps: float = SENSITIVE_STEPS) -> bytes:
    """Convert `model` (a QAT model for mode "qat"), which ends in a softmax. Integer modes take uint8 pixels,
    run int8 inside and return float32 scores; `calibration` (uint8 images) sets the activation ranges.
    Post-training int8 keeps the layers that read the image and the classifier's last layer in float (see
    `post_training_int8`), and, when it changes float's top-1 class on too many calibration images, its most
    sensitive layers too (`sensitive_steps`: see quantize.SENSITIVE_STEPS). QAT runs its softmax in float on the
    dequantized int8 logits. The converter's CONVERTER_NOISE stays off stderr."""
    with stderr_without(CONVERTER_NOISE.fullmatch), warnings.catch_warnings():
        # Our uint8 input takes raw pixels: there are no input statistics to give.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return _converted(model, mode, calibration, sensitive_steps)


def _converted(model, mode: str, calibration: Images | None, sensitive_steps: float) -> bytes:
    if mode in QUANTIZED_MODES and (calibration is None or not len(calibration)):
        raise ValueError("integer quantisation needs calibration images")
    if mode == "int8":
        return post_training_int8(model, calibration, sensitive_steps=sensitive_steps)
    if mode == "qat":
        # QAT models carry their own ranges, but the converter insists on a representative dataset
        # for full-integer output; the result is the same with or without it.
        return softmax_in_float(_integer_converter(model, calibration).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode != "float32":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return converter.convert()


def _integer_converter(model, calibration: Images) -> tf.lite.TFLiteConverter:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [calibration[i : i + 1].astype(np.float32)] for i in range(len(calibration))
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # uint8 in: what MediaPipe Tasks, LiteRT.js and the Task Library feed (they take no int8 input).
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    return converter


# Post-training int8 is checked against float on up to CHECK_IMAGES calibration images (evenly spaced); below
# AGREEMENT_TARGET top-1 agreement, the high-fidelity conversion takes over (EfficientNet-Lite0 on ImageNet photos:
# 85%; the small CNN on Fashion-MNIST: over 99%, so its conversion costs only the check).
AGREEMENT_TARGET = 0.95
CHECK_IMAGES = 256
# Images the sensitivity of each layer (quantize.SENSITIVE_STEPS) is measured on.
SENSITIVITY_IMAGES = 64
# Calibration images the int8 graph's biases are corrected on (evenly spaced; all of EfficientNet-Lite0's 340: with
# 128 its top-1 agreement on 510 unseen crops was 0.935, with 340 0.949).
CORRECTION_IMAGES = 512
# The high-fidelity conversion fits each activation's range on RANGE_IMAGES calibration images (evenly spaced),
# RANGE_VALUES values drawn from each tensor per image, trying these shares of the range calibration recorded.
RANGE_IMAGES = 64
RANGE_VALUES = 4000
RANGE_SHARES = np.linspace(0.2, 1.0, 33)
# Share of an output channel's values inside its activation's clamp below which a measured shift is not scaled up
# further: a channel that is mostly clamped says little about its bias.
MIN_INSIDE_CLAMP = 0.25


def post_training_int8(
    model,
    calibration: Images,
    agreement_target: float = AGREEMENT_TARGET,
    sensitive_steps: float = SENSITIVE_STEPS,
) -> bytes:
    """`model` in integer ops (uint8 in, float scores out), its weights rounded with bias correction, except the
    layers that read the image and the classifier's last layer (see `int8_graph`). When it picks float's top-1 class
    on fewer than `agreement_target` of the calibration images, it is made again by `high_fidelity_int8` (0:
    never), with the layers whose int8 error exceeds `sensitive_steps` in float."""
    corrected = calibrate_only(_integer_converter(bias_corrected(model, calibration), calibration))
    original = calibrate_only(_integer_converter(model, calibration))
    image_side = image_side_ops(graph_ops(corrected))
    flat = int8_graph(corrected, original, image_side)
    if agreement_target <= 0:
        return flat
    agreement = top1_agreement(flat, model, evenly_spaced(calibration, CHECK_IMAGES))
    if agreement >= agreement_target:
        return flat
    flat, float_ops = high_fidelity_int8(calibration, corrected, original, image_side, sensitive_steps)
    print(
        f"int8: top-1 agreed with float on {agreement:.1%} of the calibration images; kept {len(float_ops)} "
        f"sensitive op(s) in float and corrected the int8 graph's biases",
        flush=True,
    )
    return flat


# Weighted layers whose input is this deep or shallower read the image (RGB, or the grey made from it).
IMAGE_DEPTH = 3


def image_side_ops(ops: list[GraphOp]) -> set[str]:
    """The weighted ops before the first one whose input is deeper than IMAGE_DEPTH (the grey conversion of a grey
    model, its first convolution, EfficientNet's stem), and the ops without weights that feed them. In int8 these
    are matrix products over a few values per output (3 for the grey conversion, 9 for a 3x3 convolution of grey):
    the construct suspected where TensorFlow 2.18's XNNPACK (tf.lite.Interpreter's default) changed the int8
    Fashion-MNIST answer on a CPU with AMX while other runtimes agreed (CPUs without AMX do not show it). In float
    they cost little (few channels) and lose nothing to rounding the image."""
    weighted = [op for op in ops if op.weighted]
    deep = next((i for i, op in enumerate(weighted) if op.input_depth > IMAGE_DEPTH), len(weighted))
    return with_weightless_producers([op.name for op in weighted[:deep]], ops)


def classifier_head(ops: list[GraphOp]) -> list[str]:
    """The last weighted op (the layer that makes the logits) and the ops after it (the softmax)."""
    last = max(i for i, op in enumerate(ops) if op.weighted)
    return [op.name for op in ops[last:]]


def int8_graph(corrected: bytes, original: bytes, float_ops: set[str]) -> bytes:
    """The integer graph of `corrected` (the calibrated graph of the bias-corrected copy of the model) with the ops
    `float_ops` in float, taking their biases from `original` (the calibrated graph of the model itself), and the
    classifier's head in float with its weights stored as int8: its logits and scores are not rounded to 256
    levels, so classes that float tells apart do not tie (EfficientNet-Lite0's int8 logits came in steps of 0.09:
    on Grace Hopper's photo "suit" and "Windsor tie" both scored 0.053976 where float gave 0.056 and 0.055)."""
    head = classifier_head(graph_ops(corrected))
    editor = BiasEditor(corrected)
    # Bias correction foresaw int8 weights; float layers get their own biases back (or, where the graphs do not pair
    # up, the activation bias correction of high_fidelity_int8 measures and removes the difference). The head's
    # weights are rounded as bias correction foresaw.
    editor.take_biases(original, float_ops - set(head))
    flat = quantize_calibrated(editor.model(), float_ops | set(head))
    return weights_stored_int8(flat, head[:1])


def high_fidelity_int8(
    calibration: Images, corrected: bytes, original: bytes, float_ops: set[str], sensitive_steps: float
) -> tuple[bytes, set[str]]:
    """`int8_graph` of `corrected` with the layers whose int8 error exceeds `sensitive_steps` in float too, and the ops
    without weights that feed them (such as the input's normalisation), and its activations' ranges fitted
    (`fitted_ranges`); then the biases corrected for the error int8 activations add, on the int8 graph itself
    (`activation_bias_corrected`). `corrected` and `original` as for `int8_graph`; `float_ops` stay float anyway.
    Returns (model, the float ops' names)."""
    reference = quantize_calibrated(original, [op.name for op in graph_ops(original)])  # all in float: the float model
    # Measured in steps of the recorded ranges: a fitted range's finer steps would count its clipping as the layer's
    # error, which running the layer in float does not remove (its output is still rounded for the next layer).
    sensitive = sensitive_ops(corrected, evenly_spaced(calibration, SENSITIVITY_IMAGES), sensitive_steps)
    float_ops = with_weightless_producers(sensitive + sorted(float_ops), graph_ops(corrected))
    fitted = fitted_ranges(corrected, evenly_spaced(calibration, RANGE_IMAGES))
    mixed = int8_graph(fitted, original, float_ops)
    return activation_bias_corrected(mixed, reference, evenly_spaced(calibration, CORRECTION_IMAGES)), float_ops


def fitted_ranges(calibrated_model: bytes, images: np.ndarray) -> bytes:
    """`calibrated_model` with each tensor's range (calibration's minimum and maximum) narrowed to the share of it
    whose 256 levels err least on `images`, rounding and clipping together (mean square): a few far values otherwise
    set coarse steps for all the others (EfficientNet-Lite1's first projection: -55..58, a step of 0.45). On
    EfficientNet-Lite2 this alone raised plain int8's top-1 agreement with float on 510 unseen crops from 86% to 88%
    (a prototype's measure)."""
    recorded = recorded_ranges(calibrated_model)
    rng = np.random.default_rng(0)
    drawn: dict[str, list[np.ndarray]] = {name: [] for name in recorded}
    tensors: dict[str, int] = {}  # name: index, filled on the first image

    def draw(interpreter, _output):
        if not tensors:
            tensors.update({d["name"]: d["index"] for d in interpreter.get_tensor_details() if d["name"] in drawn})
        for name, index in tensors.items():
            values = interpreter.get_tensor(index).reshape(-1)
            drawn[name].append(values[rng.integers(0, len(values), min(len(values), RANGE_VALUES))])

    _run(calibrated_model, images, draw, keep_tensors=True)
    return with_ranges(
        calibrated_model, {name: _least_error_range(np.concatenate(drawn[name]), *recorded[name]) for name in tensors}
    )


def _least_error_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The share of (`low`, `high`) (RANGE_SHARES, 0 kept inside) whose uint8 levels err least on `values`; of equal
    errors the narrowest."""
    values = values.astype(np.float64)

    def shared(share: float) -> tuple[float, float]:
        return min(0.0, share * low), max(0.0, share * high)

    def error(share: float) -> float:
        bottom, top = shared(share)
        scale = (top - bottom) / 255 or 1.0
        zero_point = np.round(-bottom / scale)
        levels = np.clip(np.round(values / scale) + zero_point, 0, 255)
        return float(np.mean(((levels - zero_point) * scale - values) ** 2))

    return shared(min(RANGE_SHARES, key=error))


def evenly_spaced(images: Images, count: int) -> np.ndarray:
    """Up to `count` of `images`, spread evenly over them."""
    return images[np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).astype(int))]


def top1_agreement(flat: bytes, model, images: np.ndarray) -> float:
    """The share of `images` on which TFLite model `flat` (uint8 input) picks `model`'s top-1 class."""
    reference = np.concatenate(
        [np.asarray(model(images[i : i + 32].astype(np.float32), training=False)) for i in range(0, len(images), 32)]
    )
    scores = _run(flat, images, lambda interpreter, output: interpreter.get_tensor(output)[0])
    return float(np.mean(np.argmax(scores, axis=1) == reference.argmax(axis=1)))


def sensitive_ops(calibrated_model: bytes, images: np.ndarray, steps: float = SENSITIVE_STEPS) -> list[str]:
    """The ops of `calibrated_model` whose int8 outputs err by more than `steps` quantisation steps (root mean
    square, against the float op on the same int8 inputs), by TensorFlow's QuantizationDebugger on `images`."""
    with warnings.catch_warnings():
        # The debugger runs TensorFlow's own tf.lite.Interpreter, which warns that it is deprecated for LiteRT's.
        warnings.filterwarnings("ignore", message=r"\s*Warning: Please use the LiteRT interpreter")
        debugger = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=quantize_calibrated(calibrated_model, numeric_verify=True),
            debug_dataset=lambda: ([image[None]] for image in images),
        )
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    return [
        row["tensor_name"]
        for row in csv.DictReader(io.StringIO(dump.getvalue()))
        if math.sqrt(float(row["mean_squared_error"])) > steps * float(row["scale"])
    ]


def with_weightless_producers(names: list[str], ops: list[GraphOp]) -> set[str]:
    """`names` and, going back from each, the ops without weights that produce their inputs: float ops fed by
    float ops see no int8 rounding in between."""
    by_name = {op.name: op for op in ops}
    chosen: set[str] = set()
    pending = [name for name in names if name in by_name]
    while pending:
        name = pending.pop()
        if name not in chosen:
            chosen.add(name)
            pending.extend(p for p in by_name[name].producers if not by_name[p].weighted)
    return chosen


def activation_bias_corrected(flat: bytes, reference: bytes, images: np.ndarray) -> bytes:
    """`flat`, an integer graph of float model `reference`, with the mean error of each weighted op's output per
    channel on `images` taken off its bias, op by op in graph order (each measured after the ones before it are
    corrected). Unlike `bias_corrected`, which foresees the weights' rounding, this measures what int8 activations,
    weights and clamps do together (the empirical bias correction of Nagel et al. 2019, on the int8 graph)."""
    weighted = [op for op in graph_ops(flat) if op.weighted]
    float_weighted = [op for op in graph_ops(reference) if op.weighted]  # the same layers in order; names may differ
    if len(weighted) != len(float_weighted):
        raise ValueError("the int8 graph and its float reference have different weighted layers")
    float_means, inside = _channel_means(reference, float_weighted, images)
    editor = BiasEditor(flat)
    for op, float_op in zip(weighted, float_weighted):
        int8_means, _ = _channel_means(flat, [op], images)
        # The mean moved only where the output is not clamped: the bias moves it there alone.
        error = int8_means[op.name] - float_means[float_op.name]
        editor.subtract(op.name, error / np.maximum(inside[float_op.name], MIN_INSIDE_CLAMP))
        flat = editor.model()
    return flat


def _channel_means(flat: bytes, ops: list[GraphOp], images: np.ndarray) -> tuple[dict, dict]:
    """Per op of `ops` in TFLite model `flat` on `images`: the mean of its output per channel (dequantized), and the
    share of its values strictly inside its activation's clamp."""
    sums = {op.name: 0.0 for op in ops}
    inside = {op.name: 0.0 for op in ops}

    tensors: dict[str, dict] = {}  # name: details, filled on the first image

    def add(interpreter, _output):
        if not tensors:
            tensors.update({detail["name"]: detail for detail in interpreter.get_tensor_details()})
        for op in ops:
            detail = tensors[op.name]
            values = interpreter.get_tensor(detail["index"]).astype(np.float64)
            if detail["dtype"] != np.float32:
                scale, zero_point = detail["quantization"]
                values = (values - zero_point) * scale
            values = values.reshape(-1, values.shape[-1])
            sums[op.name] = sums[op.name] + values.mean(axis=0)
            inside[op.name] = inside[op.name] + ((values > op.clamp[0]) & (values < op.clamp[1])).mean(axis=0)

    _run(flat, images, add, keep_tensors=True)
    return {k: v / len(images) for k, v in sums.items()}, {k: v / len(images) for k, v in inside.items()}


def _run(flat: bytes, images: np.ndarray, read, keep_tensors: bool = False) -> np.ndarray:
    """Run TFLite model `flat` on each of `images` alone; `read(interpreter, output index)` after each; their
    results stacked."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        # Reading every layer's output needs every tensor kept; LiteRT warns that this is for debugging.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        interpreter = Interpreter(model_content=flat, experimental_preserve_all_tensors=keep_tensors)
    interpreter.allocate_tensors()
    input_index, input_type = (interpreter.get_input_details()[0][key] for key in ("index", "dtype"))
    output_index = interpreter.get_output_details()[0]["index"]
    results = []
    for image in images:
        interpreter.set_tensor(input_index, image[None].astype(input_type))  # a calibrated graph takes float32
        interpreter.invoke()
        results.append(read(interpreter, output_index))
    return np.array(results)


# Calibration pixels per batch of bias correction's probe: 16 images at 224x224x3 (its activations for a batch then
# take some hundreds of MB); small images go many at a time, since each call of the probe has a fixed cost.
_PROBE_BATCH_PIXELS = 16 * 224 * 224 * 3


def bias_corrected(model, calibration: Images) -> keras.Model:
    """A copy of `model` whose biases absorb the mean error that int8 weights will add to each output channel.

    The converter rounds each output channel's weights (batch norm folded in) to 255 levels. On the calibration
    images' average input, that rounding shifts the channel's output by a fixed amount, which is taken off the
    bias, or the offset of the batch norm that follows ("bias correction", Nagel et al., Data-Free Quantization
    Through Weight Equalization and Bias Correction, 2019). Layers of a model nested inside are corrected too."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    batch_size = max(1, _PROBE_BATCH_PIXELS // math.prod(calibration.shape[1:]))
    _correct_biases(copy, lambda: (calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)))
    return copy


_WEIGHTED = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _correct_biases(model, batches) -> None:
    """Bias correction of `model` in place; `batches()` yields batches of its input."""
    weighted = [layer for layer in model.layers if isinstance(layer, _WEIGHTED)]
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    # Where each nested model's input comes from in this model's graph: its last call.
    nested_inputs = [layer.get_input_at(len(layer.inbound_nodes) - 1) for layer in nested]
    probe = keras.Model(model.inputs, [layer.input for layer in weighted] + nested_inputs)
    sums, counts = [0.0] * len(weighted), [0] * len(weighted)
    for batch in batches():
        values = probe(np.asarray(batch, np.float32), training=False)
        values = values if isinstance(values, list) else [values]
        for i, value in enumerate(values[: len(weighted)]):
            flat = np.asarray(value).reshape(-1, value.shape[-1])  # every position of every image, by channel
            sums[i], counts[i] = sums[i] + flat.sum(axis=0, dtype=np.float64), counts[i] + len(flat)
    batch_norm_after = {
        id(layer.input): layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    }
    for layer, total, count in zip(weighted, sums, counts):
        _correct_layer(layer, batch_norm_after.get(id(layer.output)), (total / count).astype(np.float32))
    for i, layer in enumerate(nested):
        inner = keras.Model(model.inputs, nested_inputs[i])
        _correct_biases(layer, lambda inner=inner: (inner(np.asarray(b, np.float32)) for b in batches()))


def _correct_layer(layer, batch_norm, mean_input: np.ndarray) -> None:
    """Take off the output shift that rounding `layer`'s weights (with `batch_norm`, the batch norm right after it
    if any, folded in) causes on an input of `mean_input` per channel, as the converter rounds them: per output
    channel, symmetric, to the integers -127..127 times max|w| / 127."""
    kernel, *bias = layer.get_weights()
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    if kernel.shape[-2 if not depthwise else 2] != len(mean_input) or isinstance(layer, keras.layers.Conv2DTranspose):
        return  # grouped or transposed convolutions: their kernels are laid out otherwise; left as they are
    # Depthwise kernels are (h, w, channels, multiplier): output channel c * multiplier + m.
    out_shape = kernel.shape[-2:] if depthwise else kernel.shape[-1:]
    factor = np.ones(out_shape, np.float32)
    if batch_norm is not None:
        gamma, beta, moving_mean, moving_variance = _batch_norm_weights(batch_norm)
        factor = (gamma / np.sqrt(moving_variance + batch_norm.epsilon)).reshape(out_shape)
    folded = kernel * factor
    per_channel_axes = (0, 1) if depthwise else tuple(range(kernel.ndim - 1))
    largest = np.abs(folded).max(axis=per_channel_axes, keepdims=True)
    scale = np.where(largest > 0, largest / 127, 1.0)
    error = np.round(folded / scale) * scale - folded
    if depthwise:
        shift = (error.sum(axis=(0, 1)) * mean_input[:, None]).reshape(-1)
    else:  # sum over kernel positions and input channels
        shift = np.tensordot(error, mean_input, axes=([kernel.ndim - 2], [0])).reshape(-1, out_shape[-1]).sum(0)
    if batch_norm is not None and batch_norm.center:
        weights = batch_norm.get_weights()
        weights[1 if batch_norm.scale else 0] = beta - shift
        batch_norm.set_weights(weights)
    elif batch_norm is None and bias:
        layer.set_weights([kernel, bias[0] - shift])


def _batch_norm_weights(batch_norm) -> tuple[np.ndarray, ...]:
    """(gamma, beta, moving mean, moving variance), ones and zeros for those it does not learn."""
    weights = iter(batch_norm.get_weights())
    channels = batch_norm.get_weights()[-1].shape
    gamma = next(weights) if batch_norm.scale else np.ones(channels, np.float32)
    beta = next(weights) if batch_norm.center else np.zeros(channels, np.float32)
    return gamma, beta, next(weights), next(weights)


def _output_only_config(tfmot_keras):
    """The QuantizeConfig for the normalisation (Rescaling) layer, which tfmot does not know: no weights,
    quantised output. Made on first use: tfmot costs a second to import, and only QAT needs it."""

    class _OutputOnlyConfig(tfmot_keras.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [
                tfmot_keras.quantizers.MovingAverageQuantizer(
                    num_bits=8, per_axis=False, symmetric=False, narrow_range=False
                )
            ]

        def get_config(self):
            return {}

    return _OutputOnlyConfig


def quantization_aware(
    model, train_x: Images, train_y: np.ndarray, epochs: int, batch_size: int, learning_rate: float, seed: int
):
    """Fine-tune a fake-quantised copy of `model` for a few epochs (tfmot QAT) and return it."""
    import tensorflow_model_optimization as tfmot

    tfmot_keras = tfmot.quantization.keras
    output_only_config = _output_only_config(tfmot_keras)

    def annotate(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        if isinstance(layer, keras.layers.Rescaling):
            return tfmot_keras.quantize_annotate_layer(layer, output_only_config())
        return tfmot_keras.quantize_annotate_layer(layer)

    keras.utils.set_random_seed(seed)
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with tfmot_keras.quantize_scope({"_OutputOnlyConfig": output_only_config}):
        qat_model = tfmot_keras.quantize_apply(annotated)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    qat_model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    qat_model.fit(_shuffled_batches(train_x, train_y, batch_size, seed), epochs=epochs, verbose=2)
    return qat_model


def _shuffled_batches(x: Images, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """(float32 images, integer labels) batches of all of x in a seeded order that changes every epoch. Each batch
    is read from x when it is due, several in parallel: x is never held whole."""
    labels = tf.constant(y)

    def load(indices):
        # Not stateful: the same indices read the same pixels, so tf.data may run reads in parallel.
        images = tf.numpy_function(lambda idx: x[idx], [indices], tf.uint8, stateful=False)
        images.set_shape((None, *x.shape[1:]))
        return tf.cast(images, tf.float32), tf.gather(labels, indices)

    order = tf.data.Dataset.range(len(y)).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    return order.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
