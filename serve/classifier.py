"""`Classifier`: a TFLite image classifier that apps import. numpy + pillow + ai-edge-litert only."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from serve.bundle import MAX_NUM_THREADS, load_bundle, read_bundle, read_labels
from serve.errors import BundleError, ImageError
from serve.metrics import ranked
from serve.preprocess import ImageSource, pixels_in_chunks, to_pixels
from serve.quiet import LITERT_INFO_LINE, stderr_without

# label_image's defaults, used only for float models that carry no bundle metadata.
LABEL_IMAGE_MEAN = 127.5
LABEL_IMAGE_STD = 127.5
INPUT_DTYPES = (np.float32, np.uint8, np.int8)
# The most input bytes classify_many runs at once. XNNPACK gains next to nothing from larger batches on a CPU, and a
# batch whose activations outgrow the caches runs slower per image (EfficientNet-Lite0 at 224x224 int8 in batches
# of 32, for one), besides the time to plan the larger shape.
BATCH_BYTES = 256 * 1024


class Prediction(NamedTuple):
    label: str
    index: int
    score: float


class Classifier:
    """Classify images with a bundle (or any single-input image-classification .tflite).

    `model` is the file's path or its bytes (then "<bytes>" names it in errors). Everything needed comes
    from the bundle: input size and channels, quantisation and labels (`metadata`, the bundle's BundleMetadata;
    None for a plain .tflite).
    `label_file` overrides the labels; `input_mean`/`input_std` apply to float inputs as in
    label_image. A bundle whose checksum does not match its bytes is refused unless `verify_checksum`
    is False. Safe to share between threads: the interpreter is used under a lock.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        label_file: str | os.PathLike | None = None,
        num_threads: int | None = None,
        input_mean: float | None = None,
        input_std: float | None = None,
        *,
        verify_checksum: bool = True,
    ) -> None:
        if num_threads is not None and not (isinstance(num_threads, int) and 1 <= num_threads <= MAX_NUM_THREADS):
            raise ValueError(f"num_threads must be a whole number from 1 to {MAX_NUM_THREADS}, not {num_threads!r}")
        if input_mean is not None and not math.isfinite(input_mean):
            raise ValueError(f"input_mean must be a finite number, not {input_mean}")
        if input_std is not None and not (math.isfinite(input_std) and input_std > 0):
            raise ValueError(f"input_std must be a positive finite number, not {input_std}")
        in_memory = isinstance(model, (bytes, bytearray, memoryview))
        if in_memory:
            self.model_path = "<bytes>"
            model = bytes(model)
            self.metadata = load_bundle(self.model_path, model, verify_checksum=verify_checksum)
        else:
            self.model_path = os.fspath(model)
            model, self.metadata = read_bundle(self.model_path, verify_checksum=verify_checksum)
        try:
            with stderr_without(LITERT_INFO_LINE.__eq__):
                self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
                self._interpreter.allocate_tensors()
            self._check_model()
        except (ValueError, RuntimeError) as err:  # UnicodeDecodeError too, should a name get past check_model
            raise BundleError(f"{self.model_path}: cannot load model ({_first_line(err)})") from None
        # Bundles take raw 0..255 pixels (normalisation is inside the model).
        plain = self.metadata is None
        self.input_mean = input_mean if input_mean is not None else (LABEL_IMAGE_MEAN if plain else 0.0)
        self.input_std = input_std if input_std is not None else (LABEL_IMAGE_STD if plain else 1.0)
        self.labels = self._find_labels(label_file, beside_model=not in_memory)
        # The usual int8 bundle: uint8 input quantised with scale 1, zero point 0 takes pixels unchanged.
        self._takes_pixels_as_they_are = (
            self.metadata is not None
            and self.input_dtype == np.uint8
            and self.input_quantization == (1.0, 0)
            and (self.input_mean, self.input_std) == (0.0, 1.0)
        )
        self._lock = threading.Lock()
        self._batch_size = 1  # what the interpreter is allocated for; 0 while unknown
        # A [1, classes] output may take a batch of images at once; a model with the batch size fixed
        # inside (a reshape to [1, -1], say) turns out not to on its first batch.
        self._batchable = len(self._output["shape"]) == 2

    def _check_model(self) -> None:
        """Refuse at load what could only fail later, at classify time."""
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4 or min(inputs[0]["shape"]) < 1:
            raise BundleError(f"{self.model_path}: not an image classifier (want one NHWC input, one output)")
        self._input = inputs[0]
        self._output = outputs[0]
        _, self.height, self.width, self.channels = (int(d) for d in self._input["shape"])
        if self.channels not in (1, 3):
            raise BundleError(
                f"{self.model_path}: takes {self.channels}-channel images; only 1 (grey) or 3 (RGB) are supported"
            )
        if self.input_dtype not in INPUT_DTYPES:
            raise BundleError(
                f"{self.model_path}: takes {self.input_dtype} input; only float32, uint8 or int8 is supported"
            )
        shape = [int(d) for d in self._output["shape"]]
        if not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) or shape[-1] < 1:
            raise BundleError(
                f"{self.model_path}: not an image classifier (its output has shape {shape}, not [1, classes])"
            )
        output_dtype = np.dtype(self._output["dtype"])
        if output_dtype.kind not in "iuf":
            raise BundleError(f"{self.model_path}: its output is {output_dtype}, not scores")
        self.num_classes = shape[-1]
        if self.metadata is not None:
            size = self.metadata.input
            stated = (size.height, size.width, size.channels)
            if stated != (self.height, self.width, self.channels):
                raise BundleError(
                    f"{self.model_path}: bundle metadata says {'x'.join(map(str, stated))} input but the model "
                    f"takes {self.height}x{self.width}x{self.channels}"
                )

    def _find_labels(self, label_file: str | os.PathLike | None, beside_model: bool) -> list[str]:
        """`label_file`'s labels, else the bundle's, else those of a labels.txt beside the model's file (when
        `beside_model`), else the output indices as text."""
        beside = os.path.join(os.path.dirname(self.model_path), "labels.txt")
        if label_file is not None:
            source, labels = os.fspath(label_file), read_labels(label_file)
        elif self.metadata is not None:
            source, labels = self.model_path, list(self.metadata.labels)
        elif beside_model and os.path.isfile(beside):
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
        """Scores, shape (N, num_classes) float32, for a uint8 batch of shape (N, H, W, C), N >= 1."""
        pixels = np.asarray(pixels)
        expected = (self.height, self.width, self.channels)
        if pixels.ndim != 4 or pixels.shape[1:] != expected or pixels.dtype != np.uint8:
            raise ValueError(f"expected a uint8 batch of shape (N, {expected[0]}, {expected[1]}, {expected[2]})")
        if len(pixels) == 0:
            raise ValueError("expected a batch of at least one image")
        batch = np.ascontiguousarray(self._to_input(pixels))
        with self._lock:
            self._check_open()
            if self._batchable and len(batch) > 1:
                try:
                    return self.dequantize(self._invoke(batch))
                except (ValueError, RuntimeError):
                    self._batchable = False  # from now on one image at a time
            try:
                raw = np.concatenate([self._invoke(batch[i : i + 1]) for i in range(len(batch))])
            except (ValueError, RuntimeError) as err:
                raise BundleError(f"{self.model_path}: the model failed to run ({_first_line(err)})") from None
        return self.dequantize(raw)

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        """The raw output for `batch`, (len(batch), num_classes). Call under the lock."""
        if len(batch) != self._batch_size:
            self._batch_size = 0  # should the resize fail, the next call resizes again
            self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
            self._interpreter.allocate_tensors()
            self._batch_size = len(batch)
        self._interpreter.set_tensor(self._input["index"], batch)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output["index"])
        if raw.size != len(batch) * self.num_classes:
            raise ValueError(f"output of shape {raw.shape} for {len(batch)} images")
        return raw.reshape(len(batch), self.num_classes).copy()

    def close(self) -> None:
        """Release the interpreter and its memory (waiting for a call in progress); classifying afterwards raises
        ValueError. Closing again does nothing."""
        with self._lock:
            self._interpreter = None

    def _check_open(self) -> None:
        if self._interpreter is None:
            raise ValueError(f"{self.model_path}: the classifier is closed")

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def top_k(self, scores: np.ndarray, k: int = 5) -> list[Prediction]:
        """The k best of one row of scores, best first (ties keep the lower index first)."""
        return self._top_k_rows(scores[None], k)[0]

    def _top_k_rows(self, scores: np.ndarray, k: int) -> list[list[Prediction]]:
        """`top_k` of each row of a (N, num_classes) array, sorted in one call."""
        order = ranked(scores, k)
        labels = self.labels
        return [
            [Prediction(labels[i], i, score) for i, score in zip(row.tolist(), row_scores[row].tolist())]
            for row, row_scores in zip(order, scores)
        ]

    def classify(self, image: ImageSource, top_k: int = 5) -> list[Prediction]:
        """Ranked (label, index, score) for one image: a path, bytes, a PIL image or a uint8 array."""
        return self.classify_batch([image], top_k)[0]

    def classify_batch(self, images: Sequence[ImageSource], top_k: int = 5, *, jobs: int = 1) -> list[list[Prediction]]:
        """`classify` for several images, run through the model in batches while `jobs` threads decode them.
        Raises the ImageError of the first image that cannot be used."""
        ranked = []
        for result in self.classify_many(images, top_k, jobs=jobs):
            if isinstance(result, ImageError):
                raise result
            ranked.append(result)
        return ranked

    def classify_many(
        self, images: Sequence[ImageSource], top_k: int = 5, *, jobs: int = 1, batch_size: int = 64
    ) -> Iterator[list[Prediction] | ImageError]:
        """For each image in order, as soon as its batch has run: its ranked predictions, or the ImageError that
        says why it cannot be used. `jobs` threads decode the next batches while the model runs this one; a
        batch holds at most `batch_size` images, and fewer of large ones (BATCH_BYTES)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._check_open()  # before any image is decoded
        shape = (self.height, self.width, self.channels)
        batch_size = min(batch_size, BATCH_BYTES // math.prod(shape))
        chunk_size = max(1, min(batch_size, math.ceil(len(images) / max(jobs, 1))))
        for chunk in pixels_in_chunks(images, *shape, jobs=jobs, chunk_size=chunk_size):
            usable = [item for item in chunk if not isinstance(item, ImageError)]
            ranked = iter(self._top_k_rows(self.predict(np.stack(usable)), top_k) if usable else [])
            yield from (item if isinstance(item, ImageError) else next(ranked) for item in chunk)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
