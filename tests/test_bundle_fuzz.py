"""Fuzzing the bundle reader: thousands of mutants of real bundles, each loaded and run by serve.

Truncations and byte flips must be caught (by the checksum, or by the flatbuffer reader); metadata edits
that are signed again, so that the checksum passes, must be caught by the metadata checks. Each mutant is
loaded in a child process, many per child: nothing may crash a process, and nothing may raise anything but
BundleError or ImageError.

The checksum is no signature, so the second test signs its mutants again: changes to the model's structure
(shapes, types, quantisation, indices, the tables themselves) that only serve's structural checks stand between
and LiteRT. Each of those runs in a process of its own, forked from a server that imported serve once, with its
address space capped: a crash, a hang or an allocation past the cap is counted, never hidden.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve.bundle import BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME
from serve.tflite_flatbuffer import (
    MODEL_BUFFERS,
    MODEL_OPERATOR_CODES,
    MODEL_SIGNATURE_DEFS,
    MODEL_SUBGRAPHS,
    OPERATOR_INPUTS,
    OPERATOR_OPCODE_INDEX,
    OPERATOR_OUTPUTS,
    QUANTIZATION_QUANTIZED_DIMENSION,
    QUANTIZATION_SCALE,
    QUANTIZATION_ZERO_POINT,
    SIGNATURE_DEF_INPUTS,
    SIGNATURE_DEF_OUTPUTS,
    SIGNATURE_DEF_SUBGRAPH_INDEX,
    SUBGRAPH_INPUTS,
    SUBGRAPH_OPERATORS,
    SUBGRAPH_OUTPUTS,
    SUBGRAPH_TENSORS,
    TENSOR_BUFFER,
    TENSOR_MAP_TENSOR_INDEX,
    TENSOR_NAME,
    TENSOR_QUANTIZATION,
    TENSOR_SHAPE,
    TENSOR_SHAPE_SIGNATURE,
    TENSOR_TYPE,
    FlatBuffer,
    read_model_metadata,
)
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
        "input_dtype a number": {**metadata, "input_dtype": 3},
        "input quantization as text": {**metadata, "input_quantization": "1.0, 0"},
        "output zero point a fraction": {**metadata, "output_quantization": {"scale": 0.1, "zero_point": 0.5}},
        "normalization without std": {**metadata, "normalization": {"mean": 0.0}},
        "batch true": {**metadata, "input": {**size, "batch": True}},
    }
    good = {
        "unchanged": metadata,
        "labels with control characters": {**metadata, "labels": ["a\nb", "\x1b[2J", "\x00", "\u2028"] + labels[4:]},
        "labels in other scripts": {**metadata, "labels": ["靴", "Café", "🙂"] + labels[3:]},
        "extra fields": {**metadata, "extra": {"deep": [[[1]]], "big": 10**100}},
        "no provenance": {k: v for k, v in metadata.items() if k != "provenance"},
        "labels and input only": {"labels": labels, "input": {k: size[k] for k in ("height", "width", "channels")}},
    }
    return {name: (doc, "BundleError") for name, doc in bad.items()} | {
        name: (doc, "loaded") for name, doc in good.items()
    }


def test_bundle_metadata_reads_back_what_it_wrote_and_names_a_field_of_the_wrong_type():
    from serve.bundle_metadata import BUNDLE_FORMAT, BundleMetadata, InputSpec, Normalization, Quantization
    from serve.errors import BundleError

    metadata = BundleMetadata(
        format=BUNDLE_FORMAT,
        labels=["cat", "dog"],
        input=InputSpec(height=24, width=32, channels=3, pixel_range=[0, 255], batch=1),
        normalization=Normalization(mean=127.5, std=127.5, inside_model=True),
        quantization="int8",
        input_dtype="uint8",
        input_quantization=Quantization(scale=1.0, zero_point=0),
        output_quantization=Quantization(scale=0.00390625, zero_point=0),
        provenance={"config": {"epochs": 2, "test_accuracy": None}},
    )
    document = json.loads(metadata.to_bytes())
    assert document == metadata.to_json() and "name" not in document  # absent fields are left out
    assert BundleMetadata.from_bytes(metadata.to_bytes(), "b.tflite") == metadata
    assert BundleMetadata.from_json({**document, "future": [1]}, "b.tflite") == metadata  # unknown fields ignored
    wrong = [
        ({**document, "input_dtype": 3}, "'input_dtype' is not a string"),
        (
            {**document, "output_quantization": {"scale": "1", "zero_point": 0}},
            "'output_quantization.scale' is not a number",
        ),
        ({**document, "normalization": {"mean": 0.0}}, "'normalization.std' is missing"),
        ({**document, "input": {**document["input"], "batch": True}}, "'input.batch' is not a whole number"),
        ({**document, "provenance": []}, "'provenance' is not an object"),
    ]
    for edited, message in wrong:
        with pytest.raises(BundleError, match=f"^b.tflite: bundle metadata field {message}$"):
            BundleMetadata.from_json(edited, "b.tflite")


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
    for name, (document, outcome) in metadata_edits(read_bundle_metadata(bundle, model).to_json()).items():
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


# schema.fbs fields that only this test mutates.
OPERATOR_BUILTIN_OPTIONS = 4
OPERATOR_CODE_DEPRECATED_BUILTIN_CODE = 0
OPERATOR_CODE_VERSION = 2
OPERATOR_CODE_BUILTIN_CODE = 3

STRUCTURE_MUTANTS = {"int8": 1150, "float32": 1050}  # over 2,000 in all, with room for a few that lose the checksum
MEMORY_CAP = 2 << 30  # each mutant's address space (RLIMIT_AS); the unchanged bundles use ~0.7 GiB of it
HANG_SECONDS = 10

# Reads [index, edits] lines on stdin; forks a process per mutant, which caps its memory, applies the edits, signs
# the result again, loads it (as bytes for even indices, from a file for odd ones) and classifies an image alone
# and in a batch. Prints [index, outcome, signed, exit status, peak RSS in KiB, seconds] per mutant.
FORK_SERVER = """
import json, os, resource, select, signal, sys, time
from quantize.metadata import sign_bundle
from serve import BundleError, Classifier, ImageError

bundle, image, scratch, cap, hang_seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
original = open(bundle, "rb").read()


def load(index, edits):
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # LiteRT's complaints, thousands of them
    model = bytearray(original)
    for position, data in edits:
        model[position : position + len(data) // 2] = bytes.fromhex(data)
    try:
        model, signed = sign_bundle(bytes(model)), True
    except Exception:  # the edit broke the way to the checksum entry: the mutant goes in unsigned
        model, signed = bytes(model), False
    source = model
    if index % 2:
        source = os.path.join(scratch, f"{index}.tflite")
        with open(source, "wb") as f:
            f.write(model)
    try:
        classifier = Classifier(source)
        classifier.classify(image)
        classifier.classify_batch([image, image])
        outcome = "loaded"
    except (BundleError, ImageError) as err:
        outcome = f"{type(err).__name__}: {err}"
    except BaseException as err:
        outcome = f"unexpected {type(err).__name__}: {err}"
    if index % 2:
        os.remove(source)
    return json.dumps([outcome[:2000], signed])


for line in sys.stdin:
    index, edits = json.loads(line)
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, load(index, edits).encode())
        os._exit(0)
    os.close(write_end)
    report = b""
    while True:
        left = started + hang_seconds - time.monotonic()
        if left <= 0 or not select.select([read_end], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        report += chunk
    os.close(read_end)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    outcome, signed = json.loads(report) if report else ("no report", None)
    print(json.dumps([index, outcome, signed, status, usage.ru_maxrss, round(seconds, 3)]), flush=True)
"""


def structure_targets(model: bytes) -> tuple[dict[str, list[tuple[int, str]]], list[tuple[int, int]]]:
    """Where the model's structure lies: its values by kind, as (position, struct code), and the (start, length)
    spans of its tables, vtables and the small vectors in them (shapes, indices, quantisation, names; not the
    weights), for random flips."""
    buf = FlatBuffer(model)
    targets: dict[str, list[tuple[int, str]]] = {}
    spans: list[tuple[int, int]] = []

    def table(pos: int) -> int:
        vtable = pos - struct.unpack_from("<i", model, pos)[0]
        vtable_size, object_size = struct.unpack_from("<HH", model, vtable)
        spans.extend([(vtable, vtable_size), (pos, object_size)])
        return pos

    def scalar(pos: int, index: int, kind: str, code: str) -> None:
        where = buf.field(pos, index)
        if where is not None:
            targets.setdefault(kind, []).append((where, code))

    def vector(pos: int, index: int, kind: str, code: str) -> None:
        where = buf.field(pos, index)
        if where is None:
            return
        start = buf.deref(where)
        count, size = buf.u32(start), struct.calcsize(code)
        spans.append((start, 4 + count * size))
        targets.setdefault("vector length", []).append((start, "I"))
        if kind in ("scale", "zero point"):  # a tensor's own (LiteRT crashed on the input's) or its channels'
            kind = f"{'tensor' if count == 1 else 'channel'} {kind}"
        targets.setdefault(kind, []).extend((start + 4 + size * i, code) for i in range(count))

    root = table(buf.deref(0))
    for subgraph in buf.tables(root, MODEL_SUBGRAPHS):
        table(subgraph)
        for field in (SUBGRAPH_INPUTS, SUBGRAPH_OUTPUTS):
            vector(subgraph, field, "tensor index", "i")
        for tensor in buf.tables(subgraph, SUBGRAPH_TENSORS):
            table(tensor)
            for field in (TENSOR_SHAPE, TENSOR_SHAPE_SIGNATURE):
                vector(tensor, field, "dimension", "i")
            scalar(tensor, TENSOR_TYPE, "type", "b")
            scalar(tensor, TENSOR_BUFFER, "buffer index", "I")
            vector(tensor, TENSOR_NAME, "name byte", "B")
            quantization = buf.field(tensor, TENSOR_QUANTIZATION)
            if quantization is not None:
                quantization = table(buf.deref(quantization))
                vector(quantization, QUANTIZATION_SCALE, "scale", "f")
                vector(quantization, QUANTIZATION_ZERO_POINT, "zero point", "q")
                scalar(quantization, QUANTIZATION_QUANTIZED_DIMENSION, "quantized dimension", "i")
        for operator in buf.tables(subgraph, SUBGRAPH_OPERATORS):
            table(operator)
            scalar(operator, OPERATOR_OPCODE_INDEX, "operator code index", "I")
            for field in (OPERATOR_INPUTS, OPERATOR_OUTPUTS):
                vector(operator, field, "tensor index", "i")
            options = buf.field(operator, OPERATOR_BUILTIN_OPTIONS)
            if options is not None:
                table(buf.deref(options))  # strides, paddings, activations: flipped at random
    for code in buf.tables(root, MODEL_OPERATOR_CODES):
        table(code)
        scalar(code, OPERATOR_CODE_DEPRECATED_BUILTIN_CODE, "operator", "b")
        scalar(code, OPERATOR_CODE_BUILTIN_CODE, "operator", "i")
        scalar(code, OPERATOR_CODE_VERSION, "operator version", "i")
    for buffer in buf.tables(root, MODEL_BUFFERS):
        table(buffer)
    for signature in buf.tables(root, MODEL_SIGNATURE_DEFS):
        table(signature)
        scalar(signature, SIGNATURE_DEF_SUBGRAPH_INDEX, "subgraph index", "I")
        for field in (SIGNATURE_DEF_INPUTS, SIGNATURE_DEF_OUTPUTS):
            for entry in buf.tables(signature, field):
                table(entry)
                scalar(entry, TENSOR_MAP_TENSOR_INDEX, "tensor index", "I")
    return targets, spans


def hostile_value(kind: str, old: float, rng: random.Random) -> float:
    """A value for a structural field that a careless reader would trust: out of range, huge, negative, NaN."""
    if kind.endswith("scale"):
        return rng.choice(
            [math.inf, -math.inf, math.nan, 0.0, -0.0, -old, old * 1e30, old * 1e-30, 3.4e38, 1e-45, 1e-38, 1e19]
            + [struct.unpack("<f", rng.randbytes(4))[0]]
        )
    if kind.endswith("zero point"):
        return rng.choice([-256, 256, 16_711_680, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 127, -128, 255, 32767])
    if kind == "type":
        return rng.choice([*range(25), 127, -1, rng.randrange(-128, 128)])
    if kind == "name byte":
        return rng.choice([0x80, 0xFF, 0xC3, 0xE2, 0xFE, 0x00, 0x22, 0x27])
    if kind == "dimension":
        return rng.choice([0, -1, -2, 2_097_153, 65536, 1 << 20, 2**31 - 1, -(2**31), old * 2, old + 1, old * 1000])
    if kind == "quantized dimension":
        return rng.choice([-1, 1, 2, 3, 4, 100, 2**31 - 1])
    # Indices and lengths: one past the end, far past it, negative, the largest of the type, another valid one.
    return rng.choice([0, 1, old + 1, old + 2, old * 2, old + 1000, -1, -2, 2**31 - 1, -(2**31), rng.randrange(64)])


def packed(value: float, code: str) -> bytes:
    if code == "f":
        return struct.pack("<f", value)
    bits = struct.calcsize(code) * 8
    unsigned = int(value) % (1 << bits)  # two's complement, whatever the field's signedness
    return unsigned.to_bytes(bits // 8, "little")


def structure_mutants(model: bytes, count: int, seed: int) -> list[tuple[list, str]]:
    """`count` (edits, what they change) pairs: each edit [position, new bytes in hex]. A third change one
    structural value to a hostile one, a sixth two to four of them, the rest flip one to four bytes inside the
    tables and their small vectors."""
    targets, spans = structure_targets(model)
    kinds = sorted(targets)
    rng = random.Random(seed)
    mutants = []
    while len(mutants) < count:
        choice = rng.random()
        edits, what = [], []
        if choice < 0.5:
            for _ in range(1 if choice < 1 / 3 else rng.randint(2, 4)):
                kind = rng.choice(kinds)
                position, code = rng.choice(targets[kind])
                old = struct.unpack_from("<" + code, model, position)[0]
                new = packed(hostile_value(kind, old, rng), code)
                if new != model[position : position + len(new)]:
                    edits.append([position, new.hex()])
                    what.append(f"{kind} {old} -> {struct.unpack('<' + code, new)[0]}")
        else:
            for _ in range(rng.randint(1, 4)):
                start, length = rng.choices(spans, weights=[length for _, length in spans])[0]
                position = start + rng.randrange(max(length, 1))
                edits.append([position, bytes([model[position] ^ rng.randrange(1, 256)]).hex()])
            what.append(f"{len(edits)} byte flips in the tables")
        if edits:
            mutants.append((edits, "; ".join(what)))
    return mutants


def run_fork_server(bundle: Path, image: Path, scratch: Path, mutants: list) -> dict[int, list]:
    """Each mutant's [outcome, signed, exit status, peak RSS KiB, seconds], by index."""
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", FORK_SERVER, str(bundle), str(image), str(scratch), str(MEMORY_CAP), str(HANG_SECONDS)],
        input="".join(json.dumps([index, edits]) + "\n" for index, (edits, _) in enumerate(mutants)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {line[0]: line[1:] for line in map(json.loads, result.stdout.splitlines())}


@pytest.mark.slow
def test_resigned_structure_mutants_never_crash_hang_or_raise_anything_else(bundles, fmnist_images, tmp_path):
    """Over 2,000 re-signed mutants of the int8 and float32 bundles' structure, each in a forked process of its own
    under a 2 GiB address-space cap: 0 crashes, 0 hangs (killed after 10 s), 0 errors but BundleError/ImageError."""
    jobs = {
        mode: structure_mutants(bundles[mode].read_bytes(), count, seed)
        for seed, (mode, count) in enumerate(STRUCTURE_MUTANTS.items())
    }
    with ThreadPoolExecutor(len(jobs)) as pool:  # one fork server a bundle, side by side
        results = dict(
            zip(
                jobs,
                pool.map(
                    lambda mode: run_fork_server(bundles[mode], fmnist_images[0], tmp_path / mode, jobs[mode]), jobs
                ),
            )
        )
    wrong, tally, signed, peak_kib, slowest = [], Counter(), 0, 0, 0.0
    for mode, mutants in jobs.items():
        for index, (edits, what) in enumerate(mutants):
            outcome, was_signed, status, rss_kib, seconds = results[mode][index]
            signed += bool(was_signed)
            peak_kib, slowest = max(peak_kib, rss_kib), max(slowest, seconds)
            if os.WIFSIGNALED(status) and seconds >= HANG_SECONDS:
                kind = "hang"
            elif os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                kind = "crash"
            else:
                kind = outcome.split(":")[0]
            tally[kind] += 1
            if kind not in ("loaded", "BundleError", "ImageError"):
                wrong.append(f"{mode} #{index} ({what}; {edits}): {kind} {outcome[:300]} (status {status})")
    summary = (
        f"{sum(tally.values())} mutants, {signed} signed again: {dict(tally)}; "
        f"peak RSS {peak_kib / 1024:.0f} MiB, slowest {slowest:.1f} s"
    )
    print(summary)
    assert signed >= 2000, summary
    assert not wrong, f"{summary}\n{len(wrong)} wrong:\n" + "\n".join(wrong[:30])
    assert peak_kib * 1024 < MEMORY_CAP, summary
