"""`Classifier`: a TFLite image classifier that apps import. numpy + pillow + ai-edge-litert only."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from serve.bundle import read_bundle_metadata, read_labels, read_model_file
from serve.errors import BundleError
from serve.preprocess import ImageSource, to_pixels

# label_image's defaults, used only for float models that carry no bundle metadata.
LABEL_IMAGE_MEAN = 127.5
LABEL_IMAGE_STD = 127.5


class Prediction(NamedTuple):
    label: str
    index: int
    score: float


class Classifier:
    """Classify images with a bundle (or any single-input image-classification .tflite).

    Everything needed comes from the bundle: input size and channels, quantisation and labels.
    `label_file` overrides the labels; `input_mean`/`input_std` apply to float inputs as in
    label_image. Safe to share between threads: the interpreter is used under a lock.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        label_file: str | os.PathLike | None = None,
        num_threads: int | None = None,
        input_mean: float | None = None,
        input_std: float | None = None,
    ) -> None:
        self.model_path = os.fspath(model_path)
        model = read_model_file(self.model_path)
        self.metadata = read_bundle_metadata(self.model_path, model)
        try:
            self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise BundleError(f"{self.model_path}: cannot load model ({str(err).splitlines()[0]})") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4:
            raise BundleError(f"{self.model_path}: not an image classifier (want one NHWC input, one output)")
        self._input = inputs[0]
        self._output = outputs[0]
        _, self.height, self.width, self.channels = (int(d) for d in self._input["shape"])
        self.num_classes = int(self._output["shape"][-1])
        # Bundles take raw 0..255 pixels (normalisation is inside the model).
        plain = self.metadata is None
        self.input_mean = input_mean if input_mean is not None else (LABEL_IMAGE_MEAN if plain else 0.0)
        self.input_std = input_std if input_std is not None else (LABEL_IMAGE_STD if plain else 1.0)
        self.labels = self._find_labels(label_file)
        # The usual int8 bundle: uint8 input quantised with scale 1, zero point 0 takes pixels unchanged.
        self._takes_pixels_as_they_are = (
            self.metadata is not None
            and self.input_dtype == np.uint8
            and self.input_quantization == (1.0, 0)
            and (self.input_mean, self.input_std) == (0.0, 1.0)
        )
        self._lock = threading.Lock()
        self._batch_size = 1

    def _find_labels(self, label_file: str | os.PathLike | None) -> list[str]:
        beside = os.path.join(os.path.dirname(self.model_path), "labels.txt")
        if label_file is not None:
            source, labels = os.fspath(label_file), read_labels(label_file)
        elif self.metadata and self.metadata.get("labels"):
            source, labels = self.model_path, list(self.metadata["labels"])
        elif os.path.isfile(beside):
            source, labels = beside, read_labels(beside)
        else:
            return [str(i) for i in range(self.num_classes)]
        if len(labels) != self.num_classes:
            raise BundleError(
                f"{source}: has {len(labels)} labels but {os.path.basename(self.model_path)} "
                f"has {self.num_classes} outputs"
            )
        return labels

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    @property
    def input_quantization(self) -> tuple[float, int]:
        """(scale, zero_point) of the input tensor; (0.0, 0) for float inputs."""
        scale, zero_point = self._input["quantization"]
        return float(scale), int(zero_point)

    @property
    def output_quantization(self) -> tuple[float, int]:
        scale, zero_point = self._output["quantization"]
        return float(scale), int(zero_point)

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """The (height, width, channels) uint8 pixels this model takes for `image`."""
        return to_pixels(image, self.height, self.width, self.channels)

    def _to_input(self, pixels: np.ndarray) -> np.ndarray:
        dtype = self.input_dtype
        if self._takes_pixels_as_they_are:
            return pixels
        if dtype == np.float32:
            return ((pixels.astype(np.float32) - self.input_mean) / self.input_std).astype(np.float32)
        if self.metadata is None:
            # A foreign quantised model: feed raw pixels, as label_image does.
            return pixels if dtype == np.uint8 else (pixels.astype(np.int16) - 128).astype(np.int8)
        scale, zero_point = self._input["quantization"]
        real = (pixels.astype(np.float32) - self.input_mean) / self.input_std
        info = np.iinfo(dtype)
        return np.clip(np.round(real / scale + zero_point), info.min, info.max).astype(dtype)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Scores from the model's raw output: (q - zero_point) * scale for quantised outputs."""
        scale, zero_point = self._output["quantization"]
        if raw.dtype in (np.uint8, np.int8) and scale:
            return ((raw.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return raw.astype(np.float32)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Scores, shape (N, num_classes) float32, for a uint8 batch of shape (N, H, W, C)."""
        pixels = np.asarray(pixels)
        expected = (self.height, self.width, self.channels)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (N, {expected[0]}, {expected[1]}, {expected[2]})")
        batch = np.ascontiguousarray(self._to_input(pixels))
        with self._lock:
            if len(batch) != self._batch_size:
                self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
                self._interpreter.allocate_tensors()
                self._batch_size = len(batch)
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output["index"]).copy()
        return self.dequantize(raw.reshape(len(batch), self.num_classes))

    def top_k(self, scores: np.ndarray, k: int = 5) -> list[Prediction]:
        """The k best of one row of scores, best first (ties keep the lower index first)."""
        order = np.argsort(-scores, kind="stable")[: max(k, 0)]
        return [Prediction(self.labels[i], int(i), float(scores[i])) for i in order]

    def classify(self, image: ImageSource, top_k: int = 5) -> list[Prediction]:
        """Ranked (label, index, score) for one image: a path, bytes, a PIL image or a uint8 array."""
        return self.classify_batch([image], top_k)[0]

    def classify_batch(self, images: Sequence[ImageSource], top_k: int = 5) -> list[list[Prediction]]:
        """`classify` for several images, run through the model as one batch."""
        if not images:
            return []
        scores = self.predict(np.stack([self.preprocess(image) for image in images]))
        return [self.top_k(row, top_k) for row in scores]
