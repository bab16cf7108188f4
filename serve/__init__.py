"""Serving: the shared preprocessing, bundle reading and the `Classifier`.

Imports numpy, pillow and ai-edge-litert only, so apps can vendor this package without TensorFlow.
"""

from serve.classifier import Classifier, Prediction
from serve.errors import BundleError, ImageError, PipelineError
from serve.preprocess import IMAGE_EXTENSIONS, to_pixels

__all__ = [
    "IMAGE_EXTENSIONS",
    "BundleError",
    "Classifier",
    "ImageError",
    "PipelineError",
    "Prediction",
    "to_pixels",
]
