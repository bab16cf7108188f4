"""Writing the bundle's metadata into the .tflite flatbuffer, signed (serve/bundle.py reads and checks it)."""

from __future__ import annotations

import json

from quantize.tflite_internals import replace_metadata
from serve.bundle import BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME, CHECKSUM_PLACEHOLDER, bundle_digest
from serve.tflite_flatbuffer import read_model_metadata


def embed_metadata(model: bytes, metadata: dict) -> bytes:
    """`model` with `metadata` stored as JSON under BUNDLE_METADATA_NAME and its checksum under
    CHECKSUM_METADATA_NAME (replacing older copies of both)."""
    return embed_metadata_bytes(model, json.dumps(metadata, sort_keys=True).encode("utf-8"))


def embed_metadata_bytes(model: bytes, document: bytes) -> bytes:
    """`embed_metadata` with the document's bytes given as they are (tests give it malformed ones)."""
    # The checksum goes in as a placeholder; once the flatbuffer is laid out, sign_bundle writes it in place.
    entries = {BUNDLE_METADATA_NAME: document, CHECKSUM_METADATA_NAME: CHECKSUM_PLACEHOLDER}
    return sign_bundle(replace_metadata(model, entries))


def sign_bundle(model: bytes) -> bytes:
    """`model`, whose CHECKSUM_METADATA_NAME entry holds 64 placeholder bytes, with its checksum written there."""
    start, length = read_model_metadata(model)[CHECKSUM_METADATA_NAME]
    if length != len(CHECKSUM_PLACEHOLDER):
        raise ValueError(f"the {CHECKSUM_METADATA_NAME} entry holds {length} bytes, not 64")
    return model[:start] + bundle_digest(model, start).encode("ascii") + model[start + length :]
