"""A bundle's structure, checked before LiteRT sees it: hostile models signed again are refused with one line that
names the file and the tensor (each was a crash, a hang or a UnicodeDecodeError before), real ones pass with room to
spare, and num_threads is bounded everywhere it is taken."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from quantize.metadata import sign_bundle
from serve import Classifier
from serve.bundle import (
    MAX_NUM_THREADS,
    MAX_TENSOR_ELEMENTS,
    TENSOR_ELEMENTS_FLOOR,
    TENSOR_ELEMENTS_PER_BYTE,
    check_model,
)
from serve.tflite_flatbuffer import (
    MODEL_OPERATOR_CODES,
    MODEL_SUBGRAPHS,
    OPERATOR_CODE_BUILTIN_CODE,
    OPERATOR_INPUTS,
    OPERATOR_OPCODE_INDEX,
    QUANTIZATION_SCALE,
    QUANTIZATION_ZERO_POINT,
    SUBGRAPH_INPUTS,
    SUBGRAPH_OPERATORS,
    SUBGRAPH_TENSORS,
    TENSOR_NAME,
    TENSOR_QUANTIZATION,
    TENSOR_SHAPE,
    TENSOR_TYPE,
    TENSOR_TYPES,
    FlatBuffer,
    check_structure,
)
from tests.conftest import ROOT, run_pipeline

CONV_2D = 3  # BuiltinOperator

# Loads argv[1] (a path, or with argv[2] == "bytes" its bytes) under a 2 GiB address-space cap, and prints what
# happened: a crash shows as the child's exit status, a hang as the timeout.
LOAD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from serve import BundleError, Classifier
path, how = sys.argv[1:]
try:
    Classifier(open(path, "rb").read() if how == "bytes" else path)
    print("loaded")
except BundleError as err:
    print("BundleError:", err)
except BaseException as err:
    print(f"{type(err).__name__}: {err}")
"""


def tensor_tables(model: bytes) -> tuple[FlatBuffer, list[int]]:
    buf = FlatBuffer(model)
    return buf, buf.tables(buf.tables(buf.deref(0), MODEL_SUBGRAPHS)[0], SUBGRAPH_TENSORS)


class Parts:
    """Where the parts the hostile cases change lie in a bundle, found by what they are: its input tensor, its first
    int8 tensor with one scale (an activation: the output of the Quantize op after the input), its first CONV_2D."""

    def __init__(self, model: bytes) -> None:
        self.buf = buf = FlatBuffer(model)
        root = buf.deref(0)
        subgraph = buf.tables(root, MODEL_SUBGRAPHS)[0]
        self.tensors = buf.tables(subgraph, SUBGRAPH_TENSORS)
        self.input = buf.numbers(subgraph, SUBGRAPH_INPUTS, "i")[0]
        self.activation = next(i for i, t in enumerate(self.tensors) if self.int8_with_one_scale(t))
        codes = [buf.scalar(code, OPERATOR_CODE_BUILTIN_CODE, "i") for code in buf.tables(root, MODEL_OPERATOR_CODES)]
        operators = buf.tables(subgraph, SUBGRAPH_OPERATORS)
        self.conv = next(
            o for o, op in enumerate(operators) if codes[buf.scalar(op, OPERATOR_OPCODE_INDEX, "I")] == CONV_2D
        )
        self.conv_filter = self.element(operators[self.conv], OPERATOR_INPUTS, 1, 4)

    def int8_with_one_scale(self, tensor: int) -> bool:
        quantization = self.buf.field(tensor, TENSOR_QUANTIZATION)
        return (
            self.buf.scalar(tensor, TENSOR_TYPE, "b") == TENSOR_TYPES.index("int8")
            and quantization is not None
            and len(self.buf.numbers(self.buf.deref(quantization), QUANTIZATION_SCALE, "f") or ()) == 1
        )

    def element(self, table: int, field: int, index: int, size: int) -> int:
        """The position of element `index` of a table's vector field whose elements are `size` bytes."""
        return self.buf.deref(self.buf.field(table, field)) + 4 + size * index

    def quantization(self, tensor: int, field: int, size: int) -> int:
        table = self.buf.deref(self.buf.field(self.tensors[tensor], TENSOR_QUANTIZATION))
        return self.element(table, field, 0, size)

    def label(self, tensor: int) -> str:
        return f"tensor {tensor} ({self.buf.string(self.buf.field(self.tensors[tensor], TENSOR_NAME))!r})"


# What the author saw crash, hang or raise, made on purpose in the int8 bundle: where, the new bytes, and
# what the error must then say.
HOSTILE = {
    "input zero point 16711680": lambda p: (
        p.quantization(p.input, QUANTIZATION_ZERO_POINT, 8),
        struct.pack("<q", 16711680),
        f"{p.label(p.input)}: zero point 16711680 outside uint8's 0..255",
    ),
    "negative input scale": lambda p: (
        p.quantization(p.input, QUANTIZATION_SCALE, 4),
        struct.pack("<f", -1.0),
        f"{p.label(p.input)}: scale -1.0 outside",
    ),
    "int8 zero point -256": lambda p: (
        p.quantization(p.activation, QUANTIZATION_ZERO_POINT, 8),
        struct.pack("<q", -256),
        f"{p.label(p.activation)}: zero point -256 outside int8's -128..127",
    ),
    "a scale of inf": lambda p: (
        p.quantization(p.activation, QUANTIZATION_SCALE, 4),
        struct.pack("<f", math.inf),
        f"{p.label(p.activation)}: scale inf outside",
    ),
    "batch 2,097,153": lambda p: (
        p.element(p.tensors[p.input], TENSOR_SHAPE, 0, 4),
        struct.pack("<i", 2_097_153),
        f"{p.label(p.input)}: its shape [2097153, ",
    ),
    "a name that is not UTF-8": lambda p: (
        p.element(p.tensors[p.input], TENSOR_NAME, 0, 1),
        b"\xff",
        f"tensor {p.input}: its name is not UTF-8",
    ),
    "an unknown type": lambda p: (
        p.buf.field(p.tensors[p.activation], TENSOR_TYPE),
        b"\x63",
        f"{p.label(p.activation)}: unknown type 99",
    ),
    "a convolution without its filter": lambda p: (
        p.conv_filter,
        struct.pack("<i", -1),
        f"operator {p.conv} input 1 names tensor -1 of {len(p.tensors)}",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_structure_signed_again_is_one_line_naming_file_and_tensor(bundles, tmp_path, case):
    model = bundles["int8"].read_bytes()
    position, data, expected = HOSTILE[case](Parts(model))
    path = tmp_path / "hostile.tflite"
    path.write_bytes(sign_bundle(model[:position] + data + model[position + len(data) :]))  # the checksum passes
    for how, name in (("path", str(path)), ("bytes", "<bytes>")):
        result = subprocess.run(
            [sys.executable, "-c", LOAD, str(path), how], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert result.returncode == 0, f"{case} ({how}): exit status {result.returncode}\n{result.stderr[-1000:]}"
        assert result.stdout.startswith(f"BundleError: {name}: {expected}"), f"{case} ({how}): {result.stdout}"
        assert result.stdout.count("\n") == 1


def largest_tensor(model: bytes) -> int:
    buf, tensors = tensor_tables(model)
    return max(math.prod(buf.numbers(tensor, TENSOR_SHAPE, "i") or ()) for tensor in tensors)


@pytest.fixture(params=["fmnist", pytest.param("pretrained", marks=pytest.mark.slow)])
def real_bundles(request) -> list[Path]:
    if request.param == "fmnist":
        return list(request.getfixturevalue("bundles").values())
    return list(request.getfixturevalue("pretrained_bundles").values())


def test_real_bundles_pass_the_structure_check_with_room_to_spare(real_bundles):
    """The Fashion-MNIST CNN's and EfficientNet-Lite0's bundles (int8, float16, float32): their largest tensor is
    under a tenth of the limit, and the limit is what is checked (one element less than the largest is refused)."""
    for path in real_bundles:
        model = path.read_bytes()
        check_model(str(path), model)
        limit = min(MAX_TENSOR_ELEMENTS, TENSOR_ELEMENTS_FLOOR + TENSOR_ELEMENTS_PER_BYTE * len(model))
        largest = largest_tensor(model)
        assert largest * 10 < limit, (path.name, largest, limit)
        check_structure(model, largest)
        with pytest.raises(ValueError, match="holds more than"):
            check_structure(model, largest - 1)


@pytest.mark.parametrize("num_threads", [0, MAX_NUM_THREADS + 1, 65536, 2**31, 2.0, "2"])
def test_classifier_refuses_num_threads_outside_1_to_4_per_core(bundles, num_threads):
    with pytest.raises(ValueError, match=f"num_threads must be a whole number from 1 to {MAX_NUM_THREADS}"):
        Classifier(bundles["int8"], num_threads=num_threads)


def test_classifier_takes_num_threads_up_to_4_per_core(bundles, fmnist_images):
    for num_threads in (1, MAX_NUM_THREADS):
        assert Classifier(bundles["int8"], num_threads=num_threads).classify(fmnist_images[0])


@pytest.mark.parametrize(
    "args",
    [
        ["label", "--num_threads", "65536", "x.png"],
        ["label", f"--num_threads={MAX_NUM_THREADS + 1}", "x.png"],
        ["label", "--num_threads", str(2**31), "x.png"],
        ["quantize", "runs/none", "--num-threads", "100000"],
        # A run name that is refused too: without the bound, the command stops there rather than exporting.
        ["pretrained", "efficientnet-lite0", "--num-threads", str(MAX_NUM_THREADS + 1), "--name", "../outside"],
    ],
)
def test_cli_refuses_num_threads_outside_1_to_4_per_core(args):
    result = run_pipeline(*args, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"is not in the range 1<=x<={MAX_NUM_THREADS}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
