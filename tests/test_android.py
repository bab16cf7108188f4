"""The Android demo: its offline APK build, and its plain-Java core against serve on the same images and models.

The core (android_demo/app/src/main/java/com/edgepipeline/core) has no android.* imports, so the host JDK
compiles and runs it here through a small driver (android_demo/offline/host/CoreDriver.java). Images are
decoded by Pillow the way serve decodes them, up to the point where Android's BitmapFactory would hand the
app ARGB pixels; from there the Java side does what the app does. The core's structural check of a model
(ModelStructure.java) is compared with serve's check_structure on the hostile cases and on structure mutants.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from serve import BundleError, Classifier, to_pixels
from serve.bundle import check_model, read_bundle
from serve.preprocess import decode
from tests.conftest import ODDITIES, ROOT
from tests.test_bundle_fuzz import structure_mutants
from tests.test_bundle_structure import HOSTILE, Parts

ANDROID = ROOT / "android_demo"
CORE = ANDROID / "app" / "src" / "main" / "java" / "com" / "edgepipeline" / "core"
DRIVER = ANDROID / "offline" / "host" / "CoreDriver.java"
pytestmark = pytest.mark.skipif(shutil.which("javac") is None, reason="javac not found: install a JDK (17+)")


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Path:
    """The core and its driver compiled for Java 8, as the app is."""
    classes = tmp_path_factory.mktemp("core_classes")
    sources = sorted(str(p) for p in CORE.glob("*.java")) + [str(DRIVER)]
    subprocess.run(
        ["javac", "-Xlint:-options", "-source", "8", "-target", "8", "-d", str(classes), *sources],
        check=True,
        capture_output=True,
        text=True,
    )
    return classes


def java(core: Path, *args: object) -> str:
    result = subprocess.run(["java", "-cp", str(core), "CoreDriver", *map(str, args)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode("utf-8")


def java_check(core: Path, models: list[bytes], folder: Path) -> list[str]:
    """The core's verdict on each model, in one JVM: "ok", or "refused<TAB>why"."""
    paths = []
    for i, model in enumerate(models):
        paths.append(folder / f"model_{i}.tflite")
        paths[-1].write_bytes(model)
    (folder / "models.txt").write_text("".join(f"{path}\n" for path in paths))
    verdicts = java(core, "check", folder / "models.txt").splitlines()
    assert len(verdicts) == len(models)
    return verdicts


def serve_check(model: bytes) -> str:
    """serve's verdict on a model's structure (its checksum aside: the app has none to check)."""
    try:
        check_model("model", model, verify_checksum=False)
    except BundleError as err:
        return f"refused\t{str(err).removeprefix('model: ')}"
    return "ok"


def hostile(model: bytes, case: str) -> tuple[bytes, str]:
    position, data, expected = HOSTILE[case](Parts(model))
    return model[:position] + data + model[position + len(data) :], expected


def decoded_argb(path: Path, draft_side: int) -> np.ndarray:
    """The picture as serve decodes it before its colour conversion and resize, as (H, W) ARGB ints.

    serve's own steps (first frame, JPEG draft, EXIF, 16-bit scaling, palette and CMYK conversion); alpha is
    kept, for the Java side to show it on white as serve does.
    """
    image = decode(path, draft_side)[0].convert("RGBA")
    rgba = np.asarray(image).astype(np.uint32)
    return (rgba[..., 3] << 24) | (rgba[..., 0] << 16) | (rgba[..., 1] << 8) | rgba[..., 2]


def write_images(path: Path, images: list[np.ndarray]) -> Path:
    with open(path, "wb") as f:
        for argb in images:
            f.write(struct.pack(">ii", argb.shape[1], argb.shape[0]) + argb.astype(">u4").tobytes())
    return path


def compare_pixels(got: np.ndarray, want: np.ndarray, resized: bool) -> None:
    """Exact unless resized; then at most 1 apart.

    Pillow resizes in two passes, each rounded to 8 bits. The core does the horizontal pass first, as
    Pillow's Resample.c did up to 12.x; Pillow 13 runs the vertical pass first for some sizes (seen on
    tall images), which moves some pixels by 1. Same weights, same fixed-point arithmetic otherwise.
    """
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= (1 if resized else 0)


@pytest.mark.slow
def test_offline_build_packages_the_int8_bundle_and_passes_its_checks(bundles, tmp_path):
    result = subprocess.run(
        ["bash", str(ANDROID / "build_offline.sh"), str(bundles["int8"]), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for check in [
        "apksigner verify accepts",
        "package: name='com.edgepipeline.demo'",
        "launchable-activity: name='com.edgepipeline.demo.MainActivity'",
        "sdkVersion:'21'",
        "targetSdkVersion:'35'",
        "byte-identical to fmnist_int8.tflite",
        "stored uncompressed",
        "no org.tensorflow stand-in in classes.dex",
        "all checks passed",
    ]:
        assert check in result.stdout, result.stdout
    assert (tmp_path / "edge-pipeline-demo.apk").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "float16", "float32"])
def test_metadata_matches_serve(core, bundles, mode):
    """BundleInfo.java reads what serve's BundleMetadata holds for a bundle `pipeline quantize` wrote, and that
    is what LiteRT reports of the model."""
    _, metadata = read_bundle(bundles[mode])
    lines = java(core, "info", bundles[mode]).splitlines()
    info = dict(line.split("\t", 1) for line in lines if not line.startswith("label\t"))
    assert [line.split("\t", 1)[1] for line in lines if line.startswith("label\t")] == metadata.labels
    assert (info["name"], info["quantization"]) == (metadata.name, metadata.quantization) == ("fmnist", mode)
    stated = (metadata.input.height, metadata.input.width, metadata.input.channels)
    assert (int(info["height"]), int(info["width"]), int(info["channels"])) == stated
    assert info["input_dtype"] == metadata.input_dtype
    # Java holds the scales as float32 and prints the shortest text that reads back as that float32.
    for tensor, quantization in (("input", metadata.input_quantization), ("output", metadata.output_quantization)):
        got = (np.float32(info[f"{tensor}_scale"]), int(info[f"{tensor}_zero_point"]))
        assert got == (np.float32(quantization.scale), quantization.zero_point), tensor
    classifier = Classifier(bundles[mode])
    assert (classifier.labels, (classifier.height, classifier.width, classifier.channels)) == (metadata.labels, stated)
    assert classifier.input_dtype.name == metadata.input_dtype
    assert (classifier.input_quantization, classifier.output_quantization) == (
        metadata.input_quantization,
        metadata.output_quantization,
    )
    interpreter = Interpreter(model_path=str(bundles[mode]))
    assert info["output_dtype"] == np.dtype(interpreter.get_output_details()[0]["dtype"]).name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_input_tensor_matches_serve(core, bundles, fmnist_images, image_zoo, tmp_path, mode):
    classifier = Classifier(bundles[mode])
    paths = [*fmnist_images, *(image_zoo[0][name] for name in ODDITIES)]
    images = [decoded_argb(p, max(classifier.height, classifier.width)) for p in paths]
    java(core, "input", bundles[mode], write_images(tmp_path / "images.bin", images), tmp_path / "input.bin")
    dtype = np.uint8 if mode == "int8" else np.dtype("<f4")
    got = np.fromfile(tmp_path / "input.bin", dtype).reshape(len(paths), 28, 28, 3)  # bundles take RGB
    for path, image, tensor in zip(paths, images, got):
        want = classifier.preprocess(path)
        compare_pixels(tensor, want, resized=image.shape != (28, 28))
        if mode == "float32":
            assert np.array_equal(tensor, tensor.round())  # pixel values, not normalised: the model normalises


def test_rgb_pixels_match_serve(core, image_zoo, tmp_path):
    good, _ = image_zoo
    for size, channels in [((28, 28), 3), ((24, 32), 3), ((40, 36), 1)]:
        images = [decoded_argb(good[name], max(size)) for name in ODDITIES]
        out = tmp_path / "pixels.bin"
        java(core, "pixels", size[1], size[0], channels, write_images(tmp_path / "images.bin", images), out)
        got = np.fromfile(out, np.uint8).reshape(len(ODDITIES), *size, channels)
        for name, image, pixels in zip(ODDITIES, images, got):
            compare_pixels(pixels, to_pixels(good[name], *size, channels), resized=image.shape != size)


def test_unresized_images_are_exact_including_transparency(core, image_zoo, tmp_path):
    """No resize involved: colour conversion, grey luma and transparency on white must be bit-exact."""
    good, _ = image_zoo
    for name in ["rgba.png", "palette_transparent.png", "photo.webp", "grey16.png"]:
        image = decoded_argb(good[name], 10_000)
        height, width = image.shape
        for channels in (1, 3):
            java(core, "pixels", width, height, channels, write_images(tmp_path / "i.bin", [image]), tmp_path / "o")
            got = np.fromfile(tmp_path / "o", np.uint8).reshape(height, width, channels)
            assert np.array_equal(got, to_pixels(good[name], height, width, channels)), (name, channels)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "float16", "float32"])
def test_top_k_matches_serve(core, bundles, fmnist_images, tmp_path, mode):
    classifier = Classifier(bundles[mode])
    interpreter = Interpreter(model_path=str(bundles[mode]))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    raw_rows = []
    for path in fmnist_images:
        pixels = classifier.preprocess(path)[None]
        interpreter.set_tensor(inp["index"], pixels.astype(inp["dtype"]))  # bundles take raw 0..255 pixels
        interpreter.invoke()
        raw_rows.append(interpreter.get_tensor(out["index"])[0].copy())
    if mode == "int8":
        # Ties everywhere, including at the top: lower index first, as serve's stable argsort.
        raw_rows += [np.array([3, 7, 7, 0, 7, 0, 0, 255, 255, 3], np.uint8), np.zeros(10, np.uint8)]
    raw = np.stack(raw_rows)
    raw.tofile(tmp_path / "raw.bin")
    blocks = java(core, "topk", bundles[mode], 10, tmp_path / "raw.bin").split("--\n")[:-1]
    assert len(blocks) == len(raw)
    for row, block in zip(raw, blocks):
        got = [(int(i), np.float32(s)) for i, s in (line.split("\t") for line in block.splitlines())]
        want = classifier.top_k(classifier.dequantize(row), 10)  # serve's scores from the same raw output
        assert [i for i, _ in got] == [p.index for p in want]
        assert [s for _, s in got] == [np.float32(p.score) for p in want]


@pytest.mark.slow
def test_structure_check_accepts_real_bundles_and_refuses_the_hostile_cases(core, bundles, tmp_path):
    """The hostile cases crashed LiteRT or made it allocate gigabytes (tests/test_bundle_structure.py): the core
    refuses each with the message serve gives, naming the tensor, and BundleInfo.read, which the app calls before
    it creates the Interpreter, refuses them too."""
    model = bundles["int8"].read_bytes()
    cases = {case: hostile(model, case) for case in sorted(HOSTILE)}
    real = [path.read_bytes() for path in bundles.values()]
    verdicts = java_check(core, real + [mutant for mutant, _ in cases.values()], tmp_path)
    assert verdicts[: len(real)] == ["ok"] * len(real)
    for (case, (mutant, expected)), verdict in zip(cases.items(), verdicts[len(real) :]):
        assert verdict.startswith(f"refused\t{expected}"), (case, verdict)
        assert serve_check(mutant).startswith(f"refused\t{expected}"), case
    for case in ("batch 2,097,153", "int8 zero point -256"):
        mutant, expected = cases[case]
        (tmp_path / "hostile.tflite").write_bytes(mutant)
        result = subprocess.run(
            ["java", "-cp", str(core), "CoreDriver", "info", str(tmp_path / "hostile.tflite")], capture_output=True
        )
        assert result.returncode != 0 and f"BundleException: {expected}" in result.stderr.decode(), case


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_structure_check_gives_serves_verdict_on_structure_mutants(core, bundles, tmp_path, mode):
    """300 mutants of the bundle's structure, made as tests/test_bundle_fuzz.py makes them (hostile values in its
    shapes, types, quantisation and indices; byte flips in its tables): the core accepts exactly those that serve's
    check accepts, and where both refuse for a reason other than a corrupt offset, says the same."""
    model = bundles[mode].read_bytes()
    mutants = []
    for edits, _ in structure_mutants(model, 300, seed=19):
        mutant = bytearray(model)
        for position, data in edits:
            mutant[position : position + len(data) // 2] = bytes.fromhex(data)
        mutants.append(bytes(mutant))
    verdicts = java_check(core, mutants, tmp_path)
    wanted = [serve_check(mutant) for mutant in mutants]
    assert [v.split("\t")[0] for v in verdicts] == [w.split("\t")[0] for w in wanted]
    refused = sum(w != "ok" for w in wanted)
    assert 0.3 * len(mutants) < refused < len(mutants), refused  # both verdicts well represented
    for verdict, want in zip(verdicts, wanted):
        # The offset messages and a scale's digits are written by each language its own way.
        if want != "ok" and "offset" not in want and "scale " not in want:
            assert verdict == want
