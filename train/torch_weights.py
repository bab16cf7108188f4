"""Read a PyTorch checkpoint in the legacy (non-zip) format as numpy arrays, without torch and without running
arbitrary pickle code: the unpickler below only builds the handful of objects such a file contains.

Layout of the format (torch/serialization.py, `_legacy_save`): five pickles in a row, then raw bytes:
magic number, protocol version, system info, the state dict (tensors refer to storages by key through
persistent ids), the list of storage keys; then each storage as an 8-byte element count and its data.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from serve.errors import PipelineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
}


class _Storage:
    def __init__(self, key: str, dtype: np.dtype) -> None:
        self.key, self.dtype = key, dtype


class _TensorRef:
    """What a tensor is until the storages are read: a view into a storage."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, strides: tuple) -> None:
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only the names a state dict needs; anything else is refused, so nothing else can run."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, element count[, view metadata])
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid[:3]}")
        return self.storages.setdefault(key, _Storage(key, storage_type.dtype))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array for every tensor in a legacy-format .pth file."""
    path = Path(path)
    data = path.read_bytes()
    stream = io.BytesIO(data)
    try:
        if pickle.load(stream) != LEGACY_MAGIC:  # plain ints: safe with the default unpickler
            raise PipelineError(f"{path}: not a legacy PyTorch checkpoint")
        pickle.load(stream)  # protocol version
        _RestrictedUnpickler(stream).load()  # system info: a dict of plain values
        unpickler = _RestrictedUnpickler(stream)
        unpickler.storages = {}
        state = unpickler.load()
        keys = _RestrictedUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError) as err:
        raise PipelineError(f"{path}: unreadable PyTorch checkpoint ({err})") from None
    arrays = {}
    for key in keys:
        (count,) = struct.unpack("<q", stream.read(8))
        storage = unpickler.storages[key]
        arrays[key] = np.frombuffer(stream.read(count * np.dtype(storage.dtype).itemsize), dtype=storage.dtype)
    tensors = {}
    for name, ref in state.items():
        flat = arrays[ref.storage.key]
        itemsize = flat.itemsize
        tensors[name] = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], shape=ref.shape, strides=tuple(s * itemsize for s in ref.strides)
        ).copy()
    return tensors
