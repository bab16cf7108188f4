"""Serving: the shared preprocessing, bundle reading and the `Classifier`.

Imports numpy, pillow and ai-edge-litert only, so apps can vendor this package without TensorFlow. The error
classes load nothing else: `Classifier` (LiteRT) and the preprocessing (Pillow) are imported when first used, so
`from serve import PipelineError` stays cheap for the stages that only need the errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.errors import BundleError, ImageError, PipelineError

if TYPE_CHECKING:
    from serve.classifier import Classifier, Prediction
    from serve.preprocess import IMAGE_EXTENSIONS, to_pixels

_LAZY = {
    "Classifier": "serve.classifier",
    "Prediction": "serve.classifier",
    "IMAGE_EXTENSIONS": "serve.preprocess",
    "to_pixels": "serve.preprocess",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "BundleError",
    "Classifier",
    "ImageError",
    "PipelineError",
    "Prediction",
    "to_pixels",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:  # __import__ rather than importlib, whose import costs start-up time
        return getattr(__import__(_LAZY[name], fromlist=[name]), name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
