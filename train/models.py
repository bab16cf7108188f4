"""The models to train: a small fast CNN (the default for 28x28 data), MobileNetV2 with a width multiplier,
and EfficientNet-Lite0, Lite1 or Lite2 (train/efficientnet_lite.py), from scratch or from ImageNet weights.

Every model takes raw pixels (0..255, float32, NHWC) and normalises them itself, so every client feeds
the same plain pixels. Plain tf_keras layers only: tfmot's QAT and the TFLite converter both need that.
"""

from __future__ import annotations

import tf_keras as keras

from train import efficientnet_lite

# (mean, std) each model's first layer applies: x -> (x - mean) / std.
NORMALIZATION = {
    "small_cnn": (0.0, 255.0),
    "mobilenet_v2": (127.5, 127.5),
    **{name: (efficientnet_lite.MEAN, efficientnet_lite.STD) for name in efficientnet_lite.VARIANTS},
}
# tf_keras' MobileNetV2 uses BatchNorm momentum 0.999; after a short run its moving statistics are still
# far from the data and evaluation sits near chance. 0.9 follows the data within a few hundred steps.
BATCHNORM_MOMENTUM = 0.9


def build_model(
    name: str,
    input_size: int,
    channels: int,
    num_classes: int,
    width: float,
    dropout: float,
    pretrained: bool = False,
    fine_tune_blocks: int = 0,
):
    """A compiled-ready tf_keras model ending in softmax over `num_classes`.

    `pretrained` (efficientnet_lite0, 1 and 2 only): ImageNet weights in a frozen backbone under a new head, the
    transfer learning of MediaPipe Model Maker; `fine_tune_blocks` lets the top MBConv blocks (and the 1x1
    head) train too.
    """
    inputs = keras.Input((input_size, input_size, channels), name="pixels")
    mean, std = NORMALIZATION[name]
    x = keras.layers.Rescaling(1.0 / std, offset=-mean / std, name="normalize")(inputs)
    if name == "small_cnn":
        x = _small_cnn(x, width, dropout)
    elif name == "mobilenet_v2":
        x = _mobilenet_v2(x, input_size, channels, width, dropout)
    else:
        x = keras.layers.Dropout(dropout)(efficientnet_lite.backbone(x, name))
    model = keras.Model(inputs, efficientnet_lite.probabilities(x, num_classes), name=name)
    if pretrained:
        efficientnet_lite.load_imagenet_weights(model, name, classifier=False)
        efficientnet_lite.freeze_backbone(model, fine_tune_blocks)
    return model


def _conv_bn_relu(x, filters: int):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM)(x)
    return keras.layers.ReLU()(x)


def _small_cnn(x, width: float, dropout: float):
    """Two VGG-style blocks then a small dense head: ~0.2M parameters, ~92-93% on Fashion-MNIST."""
    filters = max(4, int(round(16 * width)))
    for block_filters in (filters, 2 * filters):
        x = _conv_bn_relu(x, block_filters)
        x = _conv_bn_relu(x, block_filters)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(8 * filters, activation="relu")(x)
    return keras.layers.Dropout(dropout)(x)


def _mobilenet_v2(x, input_size: int, channels: int, width: float, dropout: float):
    # Built on our tensor, not nested as a sub-model: tfmot cannot quantise nested models.
    backbone = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, channels),
        input_tensor=x,
        alpha=width,
        include_top=False,
        weights=None,
        pooling="avg",
    )
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCHNORM_MOMENTUM
    return keras.layers.Dropout(dropout)(backbone.output)
