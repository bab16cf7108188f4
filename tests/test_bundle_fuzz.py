"""Fuzzing the bundle reader: over a thousand mutants of a real int8 bundle, each loaded and run by serve.

Truncations and byte flips must be caught (by the checksum, or by the flatbuffer reader); metadata edits
that are signed again, so that the checksum passes, must be caught by the metadata checks. Each mutant is
loaded in a child process, many per child: nothing may crash a process, and nothing may raise anything but
BundleError or ImageError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from serve.bundle import BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME
from serve.tflite_flatbuffer import read_model_metadata
from tests.conftest import ROOT

MUTANTS_PER_CHILD = 100

# Reads [[index, spec], ...] on stdin; prints [index, outcome] per mutant as soon as it is known.
CHILD = """
import json, sys
from serve import BundleError, Classifier, ImageError

bundle, image, scratch = sys.argv[1:]
original = open(bundle, "rb").read()
for index, spec in json.load(sys.stdin):
    path = spec.get("file", scratch)
    if "file" not in spec:
        model = bytearray(original[: spec.get("truncate", len(original))])
        for position, mask in spec.get("flip", []):
            model[position] ^= mask
        with open(scratch, "wb") as f:
            f.write(model)
    try:
        classifier = Classifier(path)
        classifier.classify(image)
        classifier.classify_batch([image, image])
        outcome = "loaded"
    except (BundleError, ImageError) as err:
        outcome = type(err).__name__
    except BaseException as err:
        outcome = f"{type(err).__name__}: {err}"
    print(json.dumps([index, outcome]), flush=True)
"""


def metadata_edits(metadata: dict) -> dict[str, tuple[bytes | dict, str]]:
    """Documents to sign into the bundle, by name, with the outcome each must have."""
    labels, size = metadata["labels"], metadata["input"]
    text = json.dumps(metadata)
    bad = {
        "a list": b"[1, 2, 3]",
        "a string": b'"labels"',
        "a number": b"42",
        "null": b"null",
        "empty": b"",
        "not json": b'{"labels": [',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep nesting inside": (text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
        "bad utf-8": b'{"labels": ["\xff\xfe"]}',
        "utf-16": text.encode("utf-16"),
        "nul bytes": text.encode().replace(b'"labels"', b'"lab\x00els"'),
        "a 5000-digit number": text[:-1].encode() + b', "x": ' + b"9" * 5000 + b"}",
        "height 1e999": text.replace('"height": 28', '"height": 1e999').encode(),
        "height NaN": text.replace('"height": 28', '"height": NaN').encode(),
        "labels as a string": {**metadata, "labels": "abcdefghij"},
        "labels missing": {k: v for k, v in metadata.items() if k != "labels"},
        "labels null": {**metadata, "labels": None},
        "labels one short": {**metadata, "labels": labels[:-1]},
        "labels one more": {**metadata, "labels": labels + ["extra"]},
        "labels with a number": {**metadata, "labels": labels[:-1] + [1]},
        "labels nested": {**metadata, "labels": [[label] for label in labels]},
        "labels as an object": {**metadata, "labels": dict(enumerate(labels))},
        "labels by the hundred thousand": {**metadata, "labels": ["x"] * 100_000},
        "input missing": {k: v for k, v in metadata.items() if k != "input"},
        "input as a list": {**metadata, "input": [28, 28, 1]},
        "input as a string": {**metadata, "input": "28x28x1"},
        "input empty": {**metadata, "input": {}},
        "height huge": {**metadata, "input": {**size, "height": 10**400}},
        "height negative": {**metadata, "input": {**size, "height": -28}},
        "height zero": {**metadata, "input": {**size, "height": 0}},
        "height float": {**metadata, "input": {**size, "height": 28.0}},
        "height text": {**metadata, "input": {**size, "height": "28"}},
        "channels true": {**metadata, "input": {**size, "channels": True}},
        "channels 1": {**metadata, "input": {**size, "channels": 1}},  # the bundles take 3
        "channels 7": {**metadata, "input": {**size, "channels": 7}},
        "width not the model's": {**metadata, "input": {**size, "width": 32}},
    }
    good = {
        "unchanged": metadata,
        "labels with control characters": {**metadata, "labels": ["a\nb", "\x1b[2J", "\x00", "\u2028"] + labels[4:]},
        "labels in other scripts": {**metadata, "labels": ["靴", "Café", "🙂"] + labels[3:]},
        "extra fields": {**metadata, "extra": {"deep": [[[1]]], "big": 10**100}},
        "no provenance": {k: v for k, v in metadata.items() if k != "provenance"},
    }
    return {name: (doc, "BundleError") for name, doc in bad.items()} | {
        name: (doc, "loaded") for name, doc in good.items()
    }


def make_mutants(bundle: Path, folder: Path) -> list[tuple[dict, str]]:
    """(spec, the outcome it must have) for each mutant; "any" allows BundleError or loading fine."""
    from quantize.metadata import embed_metadata_bytes, sign_bundle
    from serve.bundle import read_bundle_metadata

    rng = np.random.default_rng(8)
    model = bundle.read_bytes()
    size = len(model)
    mutants: list[tuple[dict, str]] = []
    # Truncations, some to the first bytes, most anywhere.
    for length in [0, 4, 8, 16, 64, size - 64, size - 1, *rng.integers(0, size, 150).tolist()]:
        mutants.append(({"truncate": int(length)}, "BundleError"))
    # Byte flips: anywhere (mostly weights), near the start and end (tables, vtables, the metadata), in our entries.
    json_start, json_length = read_model_metadata(model)[BUNDLE_METADATA_NAME]
    checksum_start, _ = read_model_metadata(model)[CHECKSUM_METADATA_NAME]
    regions = [(0, size), (0, 4096), (size - 4096, size), (checksum_start - 64, json_start + json_length)]
    for i in range(760):
        low, high = regions[i % len(regions)]
        positions = rng.choice(np.arange(low, high), int(rng.integers(1, 9)), replace=False)
        flips = [[int(p), int(rng.integers(1, 256))] for p in positions]
        mutants.append(({"flip": flips}, "any"))
    # Metadata edits, signed so that the checksum passes.
    for name, (document, outcome) in metadata_edits(read_bundle_metadata(bundle, model)).items():
        path = folder / f"edit_{len(mutants)}.tflite"
        path.write_bytes(
            # Our entries only: the standard TFLite Metadata cannot describe a malformed document.
            embed_metadata_bytes(model, json.dumps(document).encode() if isinstance(document, dict) else document)
        )
        mutants.append(({"file": str(path), "edit": name}, outcome))
    # Byte flips inside the JSON, signed again: broken UTF-8 or JSON is refused, a changed letter may load.
    for _ in range(100):
        edited = bytearray(model)
        for position in rng.integers(json_start, json_start + json_length, int(rng.integers(1, 5))):
            edited[position] ^= int(rng.integers(1, 256))
        path = folder / f"edit_{len(mutants)}.tflite"
        path.write_bytes(sign_bundle(bytes(edited)))
        mutants.append(({"file": str(path), "edit": "json flips"}, "any"))
    # The checksum itself: in capitals, zeroed, its entry renamed (as if unsigned).
    start = checksum_start
    for name, checksum in (("capitals", model[start : start + 64].upper()), ("zeroed", b"0" * 64)):
        path = folder / f"checksum_{name}.tflite"
        path.write_bytes(model[:start] + checksum + model[start + 64 :])
        mutants.append(({"file": str(path), "edit": f"checksum {name}"}, "BundleError"))
    path = folder / "unsigned.tflite"
    path.write_bytes(model.replace(CHECKSUM_METADATA_NAME.encode(), b"edge_pipeline.sha000"))
    mutants.append(({"file": str(path), "edit": "checksum entry renamed"}, "BundleError"))
    return mutants


def run_child(items: list, bundle: Path, image: Path, scratch: Path) -> tuple[dict[int, str], int]:
    """Outcomes by mutant index, and the child's exit code (negative: killed by a signal)."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(image), str(scratch)],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ,
        timeout=300,
    )
    outcomes = dict(json.loads(line) for line in result.stdout.splitlines() if line.startswith("["))
    return outcomes, result.returncode


def test_mutated_bundles_never_crash_or_raise_anything_else(bundles, fmnist_images, tmp_path):
    mutants = make_mutants(bundles["int8"], tmp_path)
    assert len(mutants) >= 1000
    items = [[index, spec] for index, (spec, _) in enumerate(mutants)]
    outcomes: dict[int, str] = {}
    for start in range(0, len(items), MUTANTS_PER_CHILD):
        chunk = items[start : start + MUTANTS_PER_CHILD]
        got, code = run_child(chunk, bundles["int8"], fmnist_images[0], tmp_path / "mutant.tflite")
        outcomes.update(got)
        if code != 0:  # a crash: run each of this child's mutants alone to name the one that did it
            for index, spec in chunk:
                alone, code = run_child([[index, spec]], bundles["int8"], fmnist_images[0], tmp_path / "alone.tflite")
                outcomes[index] = alone.get(index, f"crashed the process (exit code {code})")
    wrong = []
    for index, (spec, expected) in enumerate(mutants):
        allowed = {"BundleError", "loaded"} if expected == "any" else {expected}
        if outcomes.get(index) not in allowed:
            wrong.append(f"{spec}: {outcomes.get(index, 'no outcome')} (expected {' or '.join(sorted(allowed))})")
    assert not wrong, f"{len(wrong)} of {len(mutants)} mutants:\n" + "\n".join(wrong[:20])
