"""Keras model -> TFLite flatbuffer: float32, float16, post-training int8, or quantisation-aware int8."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import tensorflow as tf
import tf_keras as keras

from quantize import MODES, QUANTIZED_MODES
from quantize.tflite_internals import softmax_in_float


class Images(Protocol):
    """uint8 images (N, H, W, C) indexed like a numpy array: an array, or a view that reads them from disk when
    indexed (train's data cache). A view may be larger than memory: take slices or index arrays, never all of it."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...


def to_tflite(model, mode: str, calibration: Images | None = None) -> bytes:
    """Convert `model` (a QAT model for mode "qat"), which ends in a softmax. Integer modes take uint8 pixels,
    run int8 inside and return float32 scores (the softmax in float on the dequantized int8 logits: an int8
    softmax would give scores in steps of 1/256, and ties); `calibration` (uint8 images) sets the activation
    ranges."""
    if mode in QUANTIZED_MODES and (calibration is None or not len(calibration)):
        raise ValueError("integer quantisation needs calibration images")
    if mode == "int8":  # post-training; QAT's weights have already learnt to live with their rounding
        model = bias_corrected(model, calibration)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode in QUANTIZED_MODES:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # QAT models carry their own ranges, but the converter insists on a representative dataset
        # for full-integer output; the result is the same with or without it.
        converter.representative_dataset = lambda: (
            [calibration[i : i + 1].astype(np.float32)] for i in range(len(calibration))
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # uint8 in: what MediaPipe Tasks, LiteRT.js and the Task Library feed (they take no int8 input).
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
        return softmax_in_float(converter.convert())
    elif mode != "float32":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return converter.convert()


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
