"""The bundles in the clients that apps use besides serve: MediaPipe Tasks, the TFLite Task Library, TensorFlow's
label_image.py. Each runs as a user would run it, on the same prepared pixels as `pipeline label`.

The int8 bundles' answers depend on the CPU: XNNPACK (ai-edge-litert's and TensorFlow's default, MediaPipe's,
LiteRT.js's) picks int8 kernels by instruction set, and rounds int8 results otherwise than TFLite's own kernels. The
tests that compare int8 answers name the CPU's features in their messages (tests/conftest.py cpu_features).

MediaPipe and tflite-support live in venvs of their own (`make clients`, made here on first use): they pin
their own numpy and protobuf.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from serve import Classifier
from serve.tflite_flatbuffer import input_shape_signatures
from tests.conftest import ROOT, cpu_features, run_pipeline

CLIENTS = ROOT / ".venv-clients"
MEDIAPIPE_PYTHON = CLIENTS / "mediapipe" / "bin" / "python"
TASK_LIBRARY_PYTHON = CLIENTS / "tflite-support" / "bin" / "python"
TASK_LIBRARY_STAMP = CLIENTS / "tflite-support.done"
SCRIPTS = Path(__file__).parent / "clients"
LABEL_IMAGE = SCRIPTS / "vendored" / "label_image.py"  # TensorFlow's example script, unchanged
GRACE_HOPPER = ROOT / "tests" / "data" / "grace_hopper.jpg"
CHELSEA = ROOT / "tests" / "data" / "chelsea.png"
MODES = ("float32", "float16", "int8")
TOP_K = 5
# Float scores of float bundles: the clients run other float kernels on the same pixels, 1e-5 leaves room for
# summation order. Quantised (uint8) scores: the same integer arithmetic, so the same integers, dequantised
# alike: exactly equal. int8 bundles whose softmax runs in float on dequantised int8 logits: the Task Library's
# older runtime computes that softmax with other exp kernels (1.6e-5 measured on 0.40), and, since EfficientNet-Lite0's
# int8 activation ranges are fitted, its scores differ more (1.3e-4 on Chelsea's 0.79, AMD EPYC without AMX,
# 2026-12-08; not yet traced to the op: an int8 step rounded otherwise would do it).
FLOAT_TOLERANCE = 1e-5
FLOAT_SOFTMAX_ON_INT8_TOLERANCE = 5e-4
# int8 bundles in TFLite's own kernels against XNNPACK's: XNNPACK rounds each int8 result through float, TFLite in
# fixed point, and the two differ by a step here and there (AMD EPYC with AVX512-VNNI, no AMX: Fashion-MNIST int8 on
# 1,500 test images, scores up to 0.0052 apart; EfficientNet-Lite0 int8 on the 20 sample photos, up to 0.036, and
# 0.0076 on the two these tests use).
INT8_KERNELS_TOLERANCE = 0.02
CPU = cpu_features()


def score_tolerance(bundle: Path) -> float:
    classifier = Classifier(bundle)
    if classifier.output_quantization[0]:
        return 0.0
    return FLOAT_SOFTMAX_ON_INT8_TOLERANCE if classifier.input_dtype == "uint8" else FLOAT_TOLERANCE


@pytest.fixture(scope="session")
def clients() -> None:
    """The clients' venvs, made by `make clients` when missing (a first run downloads ~700 MB)."""
    if not (MEDIAPIPE_PYTHON.exists() and TASK_LIBRARY_STAMP.exists()):
        result = subprocess.run(["make", "-s", "clients"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def task_library(clients) -> Path:
    stamp = TASK_LIBRARY_STAMP.read_text().strip()
    if stamp != "installed":
        pytest.skip(stamp)
    return TASK_LIBRARY_PYTHON


def client(python: Path, script: str, *args: object) -> list | dict:
    result = subprocess.run([str(python), str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def prepared_pixels(bundle: Path, images: list[Path], folder: Path) -> list[Path]:
    """Each image as the pipeline's own input for `bundle` (RGB at the input size), saved as PNG: every client then
    sees the same pixels, whatever resizing it would do."""
    classifier = Classifier(bundle)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        paths.append(folder / f"{Path(image).stem}.png")
        Image.fromarray(classifier.preprocess(image)).save(paths[-1])
    return paths


def pipeline_label(bundle: Path, images: list[Path]) -> list[list[dict]]:
    """`pipeline label --json`'s top 10 per image (more than TOP_K, so that ties at the edge show)."""
    result = run_pipeline("label", "--json", "-k", "10", "-m", str(bundle), *map(str, images))
    return [json.loads(line)["predictions"] for line in result.stdout.splitlines()]  # one JSON line per image


def assert_same_ranking(expected: list[dict], got: list[dict], tolerance: float, who: str) -> None:
    """`got` (a client's top entries) ranks as `expected` (pipeline label's): the same score at each rank, and each
    label with the score pipeline gives it. Labels may only swap places where their scores tie."""
    who = f"{who} on {CPU}"
    assert len(got) == min(TOP_K, len(expected)), who
    by_label = {row["label"]: row["score"] for row in expected}
    for rank, row in enumerate(got):
        assert abs(row["score"] - expected[rank]["score"]) <= tolerance, (who, rank, row, expected[rank])
        assert row["label"] in by_label and abs(by_label[row["label"]] - row["score"]) <= tolerance, (who, row)


@pytest.fixture(params=["fmnist", pytest.param("pretrained", marks=pytest.mark.slow)])
def bundle_family(request) -> tuple[dict[str, Path], list[Path]]:
    """(bundles by mode, a few images) of the Fashion-MNIST model or of the pretrained EfficientNet-Lite0."""
    if request.param == "fmnist":
        return request.getfixturevalue("bundles"), request.getfixturevalue("fmnist_images")[:3]
    return request.getfixturevalue("pretrained_bundles"), [GRACE_HOPPER, CHELSEA]


def test_bundles_take_one_rgb_image_and_serve_still_runs_batches(bundles, fmnist_images):
    images = fmnist_images[:6]
    for mode, bundle in bundles.items():
        model = bundle.read_bytes()
        assert input_shape_signatures(model) == [[1, 28, 28, 3]], mode  # no -1: LiteRT.js takes it
        classifier = Classifier(bundle)
        assert classifier.channels == 3 and classifier.metadata.input.channels == 3
        pixels = np.stack([classifier.preprocess(image) for image in images])
        one_by_one = np.concatenate([classifier.predict(p[None]) for p in pixels])
        np.testing.assert_array_equal(classifier.predict(pixels), one_by_one)
        # The batch really runs as one: the interpreter takes the resized input.
        interpreter = Interpreter(model_content=model)
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], pixels.shape)
        interpreter.allocate_tensors()
        assert list(interpreter.get_output_details()[0]["shape"]) == [len(images), 10], mode


def test_grey_trained_bundle_converts_rgb_as_pillow_does(fmnist_run, bundles, image_zoo):
    """The float32 bundle of the grey-trained model, fed RGB, against the trained Keras model fed grey.
    Grey pictures (R = G = B): the same scores within 1e-5. Colour pictures: the model's grey is Pillow's
    L = R*299/1000 + G*587/1000 + B*114/1000 before Pillow rounds it to a whole number, so it is compared
    with the Keras model on that unrounded grey, and that grey with Pillow's own (at most 0.5 apart)."""
    import tf_keras as keras

    model = keras.models.load_model(fmnist_run / "best.keras", compile=False)
    classifier = Classifier(bundles["float32"])
    rgb = np.stack([classifier.preprocess(image_zoo[0][name]) for name in ("photo.webp", "cmyk.jpg", "grey.bmp")])
    grey = rgb.astype(np.float64) @ (np.array([299, 587, 114]) / 1000)
    pillow = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    assert np.abs(grey - pillow).max() <= 0.5
    expected = model.predict(grey[..., None].astype(np.float32), verbose=0)
    np.testing.assert_allclose(classifier.predict(rgb), expected, atol=1e-5)
    assert np.array_equal(rgb[2, ..., 0], rgb[2, ..., 1])  # the grey picture: exactly Keras on its pixels
    np.testing.assert_allclose(classifier.predict(rgb[2:]), model.predict(rgb[2:, ..., :1], verbose=0), atol=1e-5)


def test_int8_taking_rgb_is_as_close_to_float_as_int8_taking_grey(fmnist_run):
    """The RGB int8 conversion against the int8 conversion of the same model taking grey directly, with the same
    calibration images, both against the Keras float model on held-out images. The RGB one may miss float's top-1
    on at most 1% more images, and its largest score error may be at most 0.01 larger (2.5 steps of a uint8 score;
    2026-11-29, when the grey conversion ran in int8, whose weights cannot hold Pillow's exactly: 0.0326 against
    0.0323, top-1 agreement 0.992 for both; it runs in float now)."""
    from pipeline.config import load_config
    from pipeline.tensorflow_env import prepare

    prepare()
    import tf_keras as keras

    from quantize.client_input import for_clients
    from quantize.convert import to_tflite
    from train.data import load_dataset

    data = load_dataset(load_config(fmnist_run / "config.yaml"))
    model = keras.models.load_model(fmnist_run / "best.keras", compile=False)
    images, calibration = np.asarray(data.test_x[:500]), np.asarray(data.train_x[:200])
    grey_int8 = Classifier(to_tflite(model, "int8", calibration))
    rgb_int8 = Classifier(to_tflite(for_clients(model), "int8", np.repeat(calibration, 3, axis=-1)))
    want = model.predict(images.astype(np.float32), verbose=0)
    grey, rgb = grey_int8.predict(images), rgb_int8.predict(np.repeat(images, 3, axis=-1))
    agreement = {name: np.mean(got.argmax(1) == want.argmax(1)) for name, got in (("grey", grey), ("rgb", rgb))}
    assert agreement["rgb"] >= agreement["grey"] - 0.01, agreement
    assert np.abs(rgb - want).max() <= np.abs(grey - want).max() + 0.01


def test_bundles_carry_standard_metadata_and_labels(bundles, task_library):
    """What tflite-support's own reader finds in each bundle; the labels.txt zipped on keeps the checksum valid."""
    for bundle in bundles.values():
        classifier = Classifier(bundle)  # checks the checksum, which covers the zip at the end too
        with zipfile.ZipFile(bundle) as packed:
            assert packed.namelist() == ["labels.txt"]
            assert packed.read("labels.txt").decode().splitlines() == classifier.labels
        found = client(task_library, "task_library_classify.py", "describe", bundle)
        assert found["packed_files"] == ["labels.txt"] and found["labels"] == classifier.labels
        assert found["needs_parser_version"] == found["metadata"]["min_parser_version"] == "1.0.0"
        subgraph = found["metadata"]["subgraph_metadata"][0]
        (image,), (scores,) = subgraph["input_tensor_metadata"], subgraph["output_tensor_metadata"]
        assert image["content"] == {
            "content_properties_type": "ImageProperties",
            "content_properties": {"color_space": "RGB"},
        }
        assert image["process_units"] == [
            {"options_type": "NormalizationOptions", "options": {"mean": [0.0], "std": [1.0]}}
        ]
        assert image["stats"] == {"min": [0.0], "max": [255.0]}
        assert scores["content"]["content_properties_type"] == "FeatureProperties"
        assert scores["associated_files"][0]["name"] == "labels.txt"
        assert scores["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"


@pytest.fixture
def family_answers(bundle_family, tmp_path) -> tuple[list, list[tuple[str, Path, list[dict]]]]:
    """(the (bundle, prepared image) pairs to give a client, flat; per pair, its mode, bundle and what
    `pipeline label` answers) for every mode of one family."""
    bundles, images = bundle_family
    pairs, expected = [], []
    for mode in MODES:
        prepared = prepared_pixels(bundles[mode], images, tmp_path / mode)
        expected += [(mode, bundles[mode], rows) for rows in pipeline_label(bundles[mode], prepared)]
        pairs += [item for image in prepared for item in (bundles[mode], image)]
    return pairs, expected


def test_mediapipe_answers_as_pipeline_label(family_answers, clients):
    pairs, expected = family_answers
    got = client(MEDIAPIPE_PYTHON, "mediapipe_classify.py", TOP_K, *pairs)
    for (mode, bundle, want), rows in zip(expected, got, strict=True):
        assert_same_ranking(want, rows, score_tolerance(bundle), f"MediaPipe {mode}")


def test_task_library_answers_as_pipeline_label(family_answers, task_library):
    pairs, expected = family_answers
    got = client(task_library, "task_library_classify.py", "classify", TOP_K, *pairs)
    for (mode, bundle, want), rows in zip(expected, got, strict=True):
        assert_same_ranking(want, rows, score_tolerance(bundle), f"Task Library {mode}")


def test_standard_clients_take_pipeline_samples_as_written(bundles, fmnist_images, clients, task_library):
    """`pipeline samples` writes what MediaPipe and the Task Library take as they are (RGB PNGs: both refuse grey
    ones, "Grayscale format does not convert"), and they answer as `pipeline label` does on them."""
    assert {Image.open(path).mode for path in fmnist_images} == {"RGB"}
    images = fmnist_images[:3]
    want = pipeline_label(bundles["int8"], images)
    pairs = [item for image in images for item in (bundles["int8"], image)]
    for who, got in [
        ("MediaPipe", client(MEDIAPIPE_PYTHON, "mediapipe_classify.py", TOP_K, *pairs)),
        ("Task Library", client(task_library, "task_library_classify.py", "classify", TOP_K, *pairs)),
    ]:
        for expected, rows in zip(want, got, strict=True):
            assert_same_ranking(expected, rows, score_tolerance(bundles["int8"]), f"{who} on a sample as written")


def test_label_image_gives_pipeline_labels_top5(bundle_family, tmp_path):
    """TensorFlow's own label_image.py with `-l labels.txt --input_mean 0 --input_std 1`: the bundle's labels
    (here read from the labels.txt packed in it) and raw pixels, as docs/clients.md says. It runs TensorFlow 2.18's
    XNNPACK, an older one than ai-edge-litert's, whose int8 kernels depend on the CPU: on one with AMX, the int8
    Fashion-MNIST bundle whose grey conversion ran in int8 gave Sneaker 0.248 where other runtimes gave Ankle boot
    0.555. int8 scores are held to INT8_KERNELS_TOLERANCE; the message names the CPU's features."""
    bundles, images = bundle_family
    for mode in MODES:
        labels = tmp_path / mode / "labels.txt"
        prepared = prepared_pixels(bundles[mode], images[:1], tmp_path / mode)
        with zipfile.ZipFile(bundles[mode]) as packed:
            labels.write_bytes(packed.read("labels.txt"))
        command = [sys.executable, str(LABEL_IMAGE), "-m", str(bundles[mode]), "-i", str(prepared[0])]
        result = subprocess.run(
            [*command, "-l", str(labels), "--input_mean", "0", "--input_std", "1"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        printed = [line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith("time: ")]
        got = label_image_scores(bundles[mode], printed)
        assert_same_ranking(pipeline_label(bundles[mode], prepared)[0], got, label_image_tolerance(bundles[mode]), mode)


def test_int8_bundles_read_the_image_and_make_logits_in_float(bundle_family):
    """Not CPU-dependent: in each int8 bundle, the layers that read the image (input 3 channels deep or less: the
    grey conversion, the first convolution of grey, EfficientNet's stem) run in float: the int8 grey conversion is
    the suspect where TensorFlow 2.18's XNNPACK changed the int8 answer on a CPU with AMX. So does the layer that
    makes the logits, from weights stored as int8 per class (int8 logits tie classes that float tells apart), and
    the softmax."""
    from quantize.tflite_internals import graph_ops

    bundles, _ = bundle_family
    model = bundles["int8"].read_bytes()
    interpreter = Interpreter(model_content=model)
    tensors = {detail["name"]: detail for detail in interpreter.get_tensor_details()}
    ops = graph_ops(model)
    weighted = [op for op in ops if op.weighted]
    image_side = weighted[: next(i for i, op in enumerate(weighted) if op.input_depth > 3)]
    assert image_side and all(tensors[op.name]["dtype"] == np.float32 for op in image_side), image_side
    assert any(tensors[op.name]["dtype"] == np.int8 for op in weighted)  # the rest is int8
    head = weighted[-1]
    assert tensors[head.name]["dtype"] == np.float32 and ops[-1].weighted is False
    stored = [detail for name, detail in tensors.items() if name.endswith("_int8")]
    (weights,) = [detail for detail in stored if detail["shape"][0] == tensors[head.name]["shape"][-1]]
    assert weights["dtype"] == np.int8 and len(weights["quantization_parameters"]["scales"]) == weights["shape"][0]


@pytest.mark.filterwarnings("ignore:.*Please use the LiteRT interpreter")  # TensorFlow's own, on purpose
@pytest.mark.parametrize("delegates", ["XNNPACK", "none"])
def test_tensorflow_with_and_without_xnnpack_names_the_pipeline_labels(bundle_family, tmp_path, delegates):
    """TensorFlow 2.18's tf.lite.Interpreter, with its default delegate (XNNPACK) and without
    (BUILTIN_WITHOUT_DEFAULT_DELEGATES, TFLite's own kernels), against `pipeline label` (ai-edge-litert): the same
    ranking, the int8 scores within INT8_KERNELS_TOLERANCE. CPU-dependent: the message names the CPU's features."""
    import tensorflow as tf

    resolver = tf.lite.experimental.OpResolverType
    bundles, images = bundle_family
    for mode in MODES:
        interpreter = tf.lite.Interpreter(
            model_path=str(bundles[mode]),
            experimental_op_resolver_type=resolver.AUTO
            if delegates == "XNNPACK"
            else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
        prepared = prepared_pixels(bundles[mode], images, tmp_path / mode)
        labels = Classifier(bundles[mode]).labels
        for image, want in zip(prepared, pipeline_label(bundles[mode], prepared), strict=True):
            pixels = np.asarray(Image.open(image))[None].astype(interpreter.get_input_details()[0]["dtype"])
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
            interpreter.invoke()
            scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
            got = [{"label": labels[i], "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")[:TOP_K]]
            tolerance = INT8_KERNELS_TOLERANCE if mode == "int8" else FLOAT_TOLERANCE
            assert_same_ranking(want, got, tolerance, f"TensorFlow {tf.__version__} ({delegates}) {mode} {image.name}")


def label_image_scores(bundle: Path, printed: list[list[str]]) -> list[dict]:
    """label_image's printed (score, label) lines as our scores. For a model with uint8 input it prints the raw
    output divided by 255: a uint8 output q as q / 255 (ours: (q - zero point) * scale), a float one as score / 255.
    """
    classifier = Classifier(bundle)
    scale, zero_point = classifier.output_quantization
    rows = []
    for score, label in printed:
        if classifier.input_dtype == np.float32:
            rows.append({"label": label, "score": float(score)})
        elif scale:
            rows.append({"label": label, "score": (round(float(score) * 255) - zero_point) * scale})
        else:
            rows.append({"label": label, "score": float(score) * 255})
    return rows


def label_image_tolerance(bundle: Path) -> float:
    """Scores are printed with 6 decimals: 5e-7 of rounding, 255 times that where label_image divided by 255. int8
    bundles run TensorFlow's XNNPACK int8 kernels, not ai-edge-litert's: INT8_KERNELS_TOLERANCE."""
    classifier = Classifier(bundle)
    if classifier.input_dtype == np.float32:
        return FLOAT_TOLERANCE + 5e-7
    return 0.0 if classifier.output_quantization[0] else INT8_KERNELS_TOLERANCE + 255 * 5e-7
