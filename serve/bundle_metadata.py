"""A bundle's own metadata: the one type that quantize writes and serve reads.

It is stored as a JSON document (`to_bytes`, keys sorted) under serve.bundle.BUNDLE_METADATA_NAME inside the
.tflite file. The Android core (android_demo/.../BundleInfo.java) and the browser page (serve/web/app.js, given the
document less its provenance by serve-web) read the same document: tests/test_android.py and tests/test_web.py
check that what they read equals what this type holds for a bundle quantize wrote.

Reading (`from_bytes`) needs the labels and the input's height, width and channels; every other field may be
absent (None), as in a bundle made by other tools or a model evaluated before its bundle is written, but when
present it must have its type. A document's unknown fields are ignored.

NamedTuples, not dataclasses, for start-up time: `pipeline label` loads this module, and `dataclasses` imports
`inspect`, which that command otherwise never loads (many times the cost of these four classes); `typing` is
loaded already.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from serve.errors import BundleError

BUNDLE_FORMAT = "edge-pipeline bundle"
BUNDLE_FORMAT_VERSION = 1
MAX_INPUT_SIDE = 65535  # height, width or channels a bundle's metadata may state


class InputSpec(NamedTuple):
    """The model's input as every client feeds it: one image of raw 0..255 pixels (the model normalises)."""

    height: int
    width: int
    channels: int
    layout: str | None = None  # "NHWC"
    color: str | None = None  # "rgb"
    pixel_range: list | None = None  # [0, 255]
    batch: int | None = None  # the batch in the model's signature: 1
    note: str | None = None


class Normalization(NamedTuple):
    """What the model computes from the pixels it is fed, (x - mean) / std, inside itself."""

    mean: float
    std: float
    inside_model: bool | None = None
    note: str | None = None


class Quantization(NamedTuple):
    """A tensor's quantisation: real value = (q - zero_point) * scale; scale 0 for a float tensor."""

    scale: float
    zero_point: int


class BundleMetadata(NamedTuple):
    """What a bundle says about itself. The fields the clients need (labels, input, input_dtype and the
    quantisation of input and output) are typed; provenance and metrics are records for people, kept as JSON."""

    labels: list[str]
    input: InputSpec
    format: str | None = None  # BUNDLE_FORMAT
    format_version: int | None = None  # BUNDLE_FORMAT_VERSION
    name: str | None = None  # the run's name
    quantization: str | None = None  # the bundle's mode: "int8", "qat", "float16" or "float32"
    normalization: Normalization | None = None
    preprocessing: str | None = None  # how serve prepares an image, in words
    # The model's tensors as LiteRT reports them, added once the bundle has passed the accuracy gate.
    input_dtype: str | None = None  # "uint8", "int8" or "float32"
    input_quantization: Quantization | None = None
    output_quantization: Quantization | None = None
    provenance: dict | None = None  # run, created, config, data_fingerprint, training, versions
    metrics: dict | None = None  # float32's and this mode's: top1, top5, agreement, latency_ms, size_bytes...

    def to_json(self) -> dict:
        """The JSON document: absent (None) fields left out, a new object throughout."""
        return _plain(self)

    def to_bytes(self) -> bytes:
        """The document as stored in the bundle: UTF-8 JSON, keys sorted."""
        return json.dumps(self.to_json(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> BundleMetadata:
        """The metadata stored as `data`, or a BundleError naming `source` (the bundle) and the problem."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, an integer too long, nesting too deep
            raise BundleError(f"{source}: unreadable bundle metadata ({err})") from None
        return cls.from_json(document, source)

    @classmethod
    def from_json(cls, document: object, source: str) -> BundleMetadata:
        """The metadata a JSON document holds, or a BundleError naming `source` and the problem."""
        if not isinstance(document, dict):
            raise BundleError(f"{source}: bundle metadata is not a JSON object")
        labels = document.get("labels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise BundleError(f"{source}: bundle metadata has no 'labels' list of strings")
        size = document.get("input")
        if not isinstance(size, dict) or not all(_is_side(size.get(key)) for key in ("height", "width", "channels")):
            raise BundleError(
                f"{source}: bundle metadata has no 'input' height, width and channels "
                f"(whole numbers, 1 to {MAX_INPUT_SIDE})"
            )
        fields = _Fields(document, source)
        return cls(
            labels=labels,
            input=InputSpec(
                height=size["height"],
                width=size["width"],
                channels=size["channels"],
                **_Fields(size, source, "input.").take(layout=str, color=str, pixel_range=list, batch=int, note=str),
            ),
            normalization=fields.record(
                "normalization", Normalization, mean=float, std=float, inside_model=bool, note=str
            ),
            input_quantization=fields.record("input_quantization", Quantization, scale=float, zero_point=int),
            output_quantization=fields.record("output_quantization", Quantization, scale=float, zero_point=int),
            **fields.take(
                format=str,
                format_version=int,
                name=str,
                quantization=str,
                preprocessing=str,
                input_dtype=str,
                provenance=dict,
                metrics=dict,
            ),
        )


def _is_side(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_INPUT_SIDE


# What a field of each type must be, as an error message says it.
_KINDS = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


class _Fields:
    """The optional fields of one JSON object, each checked against its type."""

    def __init__(self, document: dict, source: str, prefix: str = "") -> None:
        self.document, self.source, self.prefix = document, source, prefix

    def take(self, **types: type) -> dict:
        """{field: value} for each of `types`' fields, None where absent; BundleError where of another type."""
        return {key: self.value(key, kind) for key, kind in types.items()}

    def value(self, key: str, kind: type) -> object:
        value = self.document.get(key)
        if value is None:
            return None
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is not kind:  # `type`, not isinstance: true is no whole number
            raise BundleError(f"{self.source}: bundle metadata field '{self.prefix}{key}' is not {_KINDS[kind]}")
        return value

    def record(self, key: str, record: type, **types: type) -> tuple | None:
        """The object under `key` as a `record` (a NamedTuple of `types`' fields, those without a default
        required), or None when absent."""
        found = self.value(key, dict)
        if found is None:
            return None
        fields = _Fields(found, self.source, f"{self.prefix}{key}.")
        for name in types:
            if name not in record._field_defaults and found.get(name) is None:
                raise BundleError(f"{self.source}: bundle metadata field '{fields.prefix}{name}' is missing")
        return record(**fields.take(**types))


def _plain(value: object) -> object:
    """`value` as JSON values, copied: a record as an object without its None fields."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {key: _plain(item) for key, item in zip(value._fields, value) if item is not None}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
