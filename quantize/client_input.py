"""The input every bundle takes, whatever the model was trained on: one RGB image, batch 1.

Standard clients accept nothing else. LiteRT.js refuses a batch dimension of -1 in the input's shape signature;
MediaPipe Tasks and the TFLite Task Library take only RGB (depth 3) images. So the exported model is the trained
one behind a batch-1 RGB input and, for a model trained on grey images, a grey conversion with Pillow's own
weights (ITU-R 601-2, what `Image.convert("L")` uses): grey pictures give the trained model exactly its
training pixels. serve's Classifier still runs batches by resizing the input (resize_tensor_input).
"""

from __future__ import annotations

import numpy as np
import tf_keras as keras

# L = R * 299/1000 + G * 587/1000 + B * 114/1000 (Pillow's ImageMode "L" conversion).
PILLOW_GREY_WEIGHTS = np.array([299, 587, 114], dtype=np.float32) / 1000
CLIENT_CHANNELS = 3


def for_clients(model) -> keras.Model:
    """`model` (input (H, W, 1) or (H, W, 3), any batch) behind a (1, H, W, 3) input named "image"."""
    height, width, channels = model.input_shape[1:]
    image = keras.Input((height, width, CLIENT_CHANNELS), batch_size=1, name="image")
    pixels = image
    if channels == 1:
        grey = keras.layers.Conv2D(1, 1, use_bias=False, trainable=False, name="pillow_grey")
        pixels = grey(image)
        grey.set_weights([PILLOW_GREY_WEIGHTS.reshape(1, 1, CLIENT_CHANNELS, 1)])
    elif channels != CLIENT_CHANNELS:
        raise ValueError(f"a model with {channels}-channel input cannot take RGB images")
    return keras.Model(image, model(pixels), name=f"{model.name}_for_clients")


class RgbImages:
    """A view of grey uint8 images (N, H, W, 1) as RGB (N, H, W, 3), each pixel's grey in all three channels:
    what serve's preprocessing makes of a grey picture. Reads from the underlying images only when indexed."""

    def __init__(self, grey) -> None:
        self.grey = grey
        self.shape = (*grey.shape[:-1], CLIENT_CHANNELS)

    def __len__(self) -> int:
        return len(self.grey)

    def __getitem__(self, key) -> np.ndarray:
        return np.repeat(self.grey[key], CLIENT_CHANNELS, axis=-1)


def as_rgb(images):
    """`images` as RGB: grey (..., 1) arrays repeated into a new array, other grey images (views that read from
    disk) through an RgbImages view; RGB images unchanged."""
    if images.shape[-1] != 1:
        return images
    if isinstance(images, np.ndarray):
        return np.repeat(images, CLIENT_CHANNELS, axis=-1)
    return RgbImages(images)
