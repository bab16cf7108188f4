"""Keras model -> TFLite flatbuffer: float32, float16, post-training int8, or quantisation-aware int8."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from quantize import MODES, QUANTIZED_MODES

_tfmot = tfmot.quantization.keras


class Images(Protocol):
    """uint8 images (N, H, W, C) indexed like a numpy array: an array, or a view that reads them from disk when
    indexed (train's data cache). A view may be larger than memory: take slices or index arrays, never all of it."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...


def to_tflite(model, mode: str, calibration: np.ndarray | None = None) -> bytes:
    """Convert `model` (a QAT model for mode "qat"). Integer modes take uint8 pixels and return uint8
    scores; `calibration` (uint8 images) sets the activation ranges."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode in QUANTIZED_MODES:
        if calibration is None or not len(calibration):
            raise ValueError("integer quantisation needs calibration images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # QAT models carry their own ranges, but the converter insists on a representative dataset
        # for full-integer output; the result is the same with or without it.
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif mode != "float32":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return converter.convert()


class _OutputOnlyConfig(_tfmot.QuantizeConfig):
    """For the normalisation (Rescaling) layer, which tfmot does not know: no weights, quantised output."""

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
            _tfmot.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
        ]

    def get_config(self):
        return {}


def quantization_aware(
    model, train_x: Images, train_y: np.ndarray, epochs: int, batch_size: int, learning_rate: float, seed: int
):
    """Fine-tune a fake-quantised copy of `model` for a few epochs (tfmot QAT) and return it."""

    def annotate(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        if isinstance(layer, keras.layers.Rescaling):
            return _tfmot.quantize_annotate_layer(layer, _OutputOnlyConfig())
        return _tfmot.quantize_annotate_layer(layer)

    keras.utils.set_random_seed(seed)
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with _tfmot.quantize_scope({"_OutputOnlyConfig": _OutputOnlyConfig}):
        qat_model = _tfmot.quantize_apply(annotated)
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
