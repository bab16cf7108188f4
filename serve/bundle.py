"""Reading a bundle: one .tflite file whose metadata carries labels, input spec and provenance, and a checksum.

The quantize stage stores a JSON document (serve/bundle_metadata.py's BundleMetadata) under the metadata name
`BUNDLE_METADATA_NAME` in the model's flatbuffer (the `Model.metadata` list of the TFLite schema), and a second
entry, `CHECKSUM_METADATA_NAME`, whose 64 bytes are the hex sha256 of the whole file with those 64 bytes read as
ASCII '0's. Reading needs no TensorFlow: serve/tflite_flatbuffer.py finds the entries (once per load) and checks
every offset against the file's length. The standard TFLite Metadata for other clients (a `TFLITE_METADATA`
entry, and labels.txt in a zip after the flatbuffer: quantize/metadata.py) is not read here, but the checksum
covers it, zip included.

The checksum is no signature: anyone can compute it for a file they changed. What keeps a hostile file from
crashing LiteRT, or from making it allocate gigabytes, is `check_model`'s look at the model's structure (every
tensor's shape, type and quantisation, every index), which runs whether the checksum is checked or not.
"""

from __future__ import annotations

import contextlib
import os
import struct

from serve.bundle_metadata import BundleMetadata
from serve.errors import BundleError
from serve.files import MiB, read_regular_file
from serve.tflite_flatbuffer import TFLITE_IDENTIFIER, check_structure, read_model_metadata

BUNDLE_METADATA_NAME = "edge_pipeline.bundle"
CHECKSUM_METADATA_NAME = "edge_pipeline.sha256"
CHECKSUM_PLACEHOLDER = b"0" * 64
MAX_MODEL_BYTES = 1024 * MiB
MAX_LABELS_BYTES = 16 * MiB
SMALL_BUNDLE_BYTES = 512 * 1024  # hashed without OpenSSL: _sha256
# The elements one tensor of a model may hold, declared in its flatbuffer: TENSOR_ELEMENTS_FLOOR for any file (the
# model's input, up to a 1024x1024 RGBA image, whatever the weights weigh) plus TENSOR_ELEMENTS_PER_BYTE for each
# byte of the file, at most MAX_TENSOR_ELEMENTS (1 GiB of float32). The input's own shape cannot be the yardstick:
# it is one of the file's tensors (one flipped byte made a 234 KB bundle's batch 2,097,153, and LiteRT allocated
# 12.9 GB). Real models pass with room to spare: the largest tensor of the Fashion-MNIST CNN's int8 bundle (its
# 128x1568 dense weights) is 3.9% of its 5.1M limit, that of EfficientNet-Lite0's (1001x1280) 5.0% of its 25M.
# android_demo/.../ModelStructure.java holds the same three bounds.
TENSOR_ELEMENTS_FLOOR = 1 << 22
TENSOR_ELEMENTS_PER_BYTE = 4
MAX_TENSOR_ELEMENTS = 1 << 28
# Interpreter threads a Classifier, `pipeline label --num_threads` and the latency figures may ask for: more
# than a few per core only costs, and LiteRT crashed (65536) or refused with a TypeError (2^31) on huge counts.
MAX_NUM_THREADS = 4 * (os.cpu_count() or 1)


def _entries(path: str | os.PathLike, model: bytes) -> dict[str, tuple[int, int]]:
    try:
        return read_model_metadata(model)
    except (ValueError, struct.error) as err:
        raise BundleError(f"{path}: corrupt TFLite flatbuffer ({err})") from None


def _sha256(size: int):
    """A new sha256 object for `size` bytes. Loading OpenSSL for hashlib takes ~2 ms, more than Python's own
    sha256 needs for a small bundle (0.7 ms for 230 KiB: a cold `pipeline label` feels it); OpenSSL hashes ~5x
    faster, which pays from ~1 MiB. Builds without Python's own hashes use hashlib."""
    if size <= SMALL_BUNDLE_BYTES:
        for module in ("_sha2", "_sha256"):  # Python 3.12, 3.10-3.11
            with contextlib.suppress(ImportError):
                return __import__(module).sha256()
    import hashlib

    return hashlib.sha256()


def bundle_digest(model: bytes, start: int) -> str:
    """The hex sha256 of `model` with the 64 bytes at `start` (where the checksum goes) read as ASCII '0's."""
    view = memoryview(model)
    digest = _sha256(len(model))
    digest.update(view[:start])
    digest.update(CHECKSUM_PLACEHOLDER)
    digest.update(view[start + len(CHECKSUM_PLACEHOLDER) :])
    return digest.hexdigest()


def _verify_checksum(path: str | os.PathLike, model: bytes, entries: dict[str, tuple[int, int]]) -> None:
    """Raise BundleError unless the bundle's checksum matches its bytes (`entries`: where its metadata entries lie).
    A plain .tflite, without our metadata, has nothing to check."""
    if CHECKSUM_METADATA_NAME not in entries:
        if BUNDLE_METADATA_NAME in entries:
            raise BundleError(
                f"{path}: corrupt or unsigned bundle: no checksum (export it again, or skip the check: "
                "--ignore-checksum, Classifier(verify_checksum=False))"
            )
        return
    start, length = entries[CHECKSUM_METADATA_NAME]
    if length != len(CHECKSUM_PLACEHOLDER) or model[start : start + length] != bundle_digest(model, start).encode():
        raise BundleError(f"{path}: corrupt bundle: checksum does not match")


def read_bundle(path: str | os.PathLike, *, verify_checksum: bool = True) -> tuple[bytes, BundleMetadata | None]:
    """The bytes of a .tflite file and its bundle metadata (None for a plain .tflite), or a BundleError naming the
    file: `load_bundle` on the file's bytes."""
    path = os.fspath(path)
    model = read_regular_file(path, MAX_MODEL_BYTES, "a .tflite model", BundleError)
    return model, load_bundle(path, model, verify_checksum=verify_checksum)


def read_model_file(path: str | os.PathLike, *, verify_checksum: bool = True) -> bytes:
    """The bytes of a .tflite file, checked as `read_bundle` checks them."""
    return read_bundle(path, verify_checksum=verify_checksum)[0]


def load_bundle(name: str, model: bytes, *, verify_checksum: bool = True) -> BundleMetadata | None:
    """`check_model`, then the bundle metadata of `model` (None for a plain .tflite). The flatbuffer's metadata
    entries are found once for both."""
    entries = _check(name, model, verify_checksum)
    return _metadata(name, model, _entries(name, model) if entries is None else entries)


def check_model(name: str, model: bytes, *, verify_checksum: bool = True) -> None:
    """BundleError naming `name` unless `model` is a TFLite flatbuffer, safe to hand to LiteRT (its structure
    checked, always), and, if it is a bundle and `verify_checksum` is True, its checksum matches. Its metadata is
    not read unless the checksum is checked (android_demo's ModelStructure.java checks the same, no more)."""
    _check(name, model, verify_checksum)


def _check(name: str, model: bytes, verify_checksum: bool) -> dict[str, tuple[int, int]] | None:
    """`check_model`'s checks; the metadata entries where the checksum's check found them."""
    if len(model) < 8 or model[4:8] != TFLITE_IDENTIFIER:
        raise BundleError(f"{name}: not a TFLite model (no TFL3 identifier)")
    entries = None
    if verify_checksum:
        entries = _entries(name, model)
        _verify_checksum(name, model, entries)
    limit = min(MAX_TENSOR_ELEMENTS, TENSOR_ELEMENTS_FLOOR + TENSOR_ELEMENTS_PER_BYTE * len(model))
    try:
        check_structure(model, limit)
    except struct.error as err:
        raise BundleError(f"{name}: corrupt TFLite flatbuffer ({err})") from None
    except ValueError as err:
        raise BundleError(f"{name}: {err}") from None
    return entries


def read_bundle_metadata(path: str | os.PathLike, model: bytes) -> BundleMetadata | None:
    """The bundle metadata inside `model` (bytes already checked), or None for a plain .tflite file; BundleError
    unless it holds labels and an input size (BundleMetadata.from_bytes)."""
    return _metadata(path, model, _entries(path, model))


def _metadata(path: str | os.PathLike, model: bytes, entries: dict[str, tuple[int, int]]) -> BundleMetadata | None:
    where = entries.get(BUNDLE_METADATA_NAME)
    if where is None:
        return None
    start, length = where
    return BundleMetadata.from_bytes(model[start : start + length], str(path))


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line (any newline convention); blank trailing lines ignored."""
    path = os.fspath(path)
    data = read_regular_file(path, MAX_LABELS_BYTES, "a labels file", BundleError)
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: labels file is not UTF-8 text") from None
    return text.rstrip("\n").split("\n") if text.strip() else []
