"""The bundle and its users: serve.Classifier and `pipeline label`, with real TFLite models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve import BundleError, Classifier, ImageError
from serve.bundle import CHECKSUM_METADATA_NAME, SMALL_BUNDLE_BYTES, read_bundle_metadata, read_model_file
from serve.tflite_flatbuffer import read_model_metadata
from tests.conftest import PIPELINE, ROOT, run_pipeline
from train.data import FASHION_MNIST_CLASSES

LINE = re.compile(r"^(?P<label>.+) \((?P<index>\d+)\): (?P<score>\d\.\d{6})$")


def test_bundle_carries_labels_input_spec_and_provenance(fmnist_run, bundles):
    data = json.loads((fmnist_run / "data.json").read_text())
    for mode, path in bundles.items():
        metadata = read_bundle_metadata(path, read_model_file(path))
        assert metadata.labels == FASHION_MNIST_CLASSES
        assert metadata.quantization == mode
        assert (metadata.input.height, metadata.input.width, metadata.input.channels) == (28, 28, 3)  # RGB in
        assert metadata.normalization.std == 255.0
        assert metadata.provenance["data_fingerprint"] == data["fingerprint"]
        assert metadata.provenance["config"]["name"] == "fmnist"
        assert set(metadata.metrics) == {"float32", mode}
    int8 = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"]))
    assert int8.input_dtype == "uint8"
    assert int8.output_quantization == (0.0, 0)  # float32 scores: softmax in float
    labels = (fmnist_run / "export" / "labels.txt").read_text().splitlines()
    assert labels == FASHION_MNIST_CLASSES


def test_int8_bundle_is_smaller_and_agrees_with_float(bundles, fmnist_images):
    float_model, int8_model = Classifier(bundles["float32"]), Classifier(bundles["int8"])
    assert bundles["int8"].stat().st_size < 0.5 * bundles["float32"].stat().st_size
    pixels = np.stack([float_model.preprocess(p) for p in fmnist_images])
    float_scores, int8_scores = float_model.predict(pixels), int8_model.predict(pixels)
    assert int8_scores.dtype == np.float32  # dequantised
    np.testing.assert_allclose(int8_scores.sum(axis=1), 1.0, atol=0.05)
    assert np.mean(float_scores.argmax(1) == int8_scores.argmax(1)) >= 0.8
    assert np.abs(float_scores - int8_scores).max() < 0.2


def test_classify_accepts_path_bytes_pil_and_array(bundles, fmnist_images):
    classifier = Classifier(bundles["int8"])
    path = fmnist_images[0]
    expected = classifier.classify(path, top_k=3)
    assert [p.label for p in expected] == [classifier.labels[p.index] for p in expected]
    assert [p.score for p in expected] == sorted((p.score for p in expected), reverse=True)
    for source in (path.read_bytes(), Image.open(path), np.asarray(Image.open(path)), str(path)):
        assert classifier.classify(source, top_k=3) == expected


def test_classifier_from_bytes_equals_classifier_from_path(bundles, fmnist_images):
    pixels = np.stack([Classifier(bundles["float32"]).preprocess(p) for p in fmnist_images])
    for path in bundles.values():
        from_path, from_bytes = Classifier(path), Classifier(path.read_bytes())
        assert from_bytes.model_path == "<bytes>"
        assert from_bytes.metadata == from_path.metadata and from_bytes.labels == from_path.labels
        np.testing.assert_array_equal(from_bytes.predict(pixels), from_path.predict(pixels))


def test_classifier_from_bytes_checks_the_checksum_and_the_metadata(bundles, tmp_path):
    changed = bundles["int8"].read_bytes().replace(b'"Trouser"', b'"Trousen"')
    with pytest.raises(BundleError, match=r"^<bytes>: corrupt bundle: checksum does not match$"):
        Classifier(changed)
    assert Classifier(changed, verify_checksum=False).labels[1] == "Trousen"
    metadata = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"])).to_json()
    edited = resigned(bundles["int8"], tmp_path, {**metadata, "labels": "abcdefghij"})
    with pytest.raises(BundleError, match=r"^<bytes>: bundle metadata has no 'labels' list of strings$"):
        Classifier(edited.read_bytes())
    with pytest.raises(BundleError, match=r"^<bytes>: not a TFLite model"):
        Classifier(b"")


def test_classify_batch_matches_one_by_one_and_threads(bundles, fmnist_images):
    classifier = Classifier(bundles["float32"])
    one_by_one = [classifier.classify(p) for p in fmnist_images]
    batch = classifier.classify_batch(fmnist_images)
    for single, batched in zip(one_by_one, batch):
        assert [p.index for p in single] == [p.index for p in batched]
        np.testing.assert_allclose([p.score for p in single], [p.score for p in batched], atol=1e-5)

    results: dict[int, list] = {}

    def worker(n: int) -> None:
        results[n] = [classifier.classify(fmnist_images[(n + i) % len(fmnist_images)]) for i in range(15)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, got in results.items():
        for i, predictions in enumerate(got):
            reference = one_by_one[(n + i) % len(fmnist_images)]
            assert [p.index for p in predictions] == [p.index for p in reference]


def test_label_prints_label_image_lines(bundles, fmnist_images):
    result = run_pipeline("label", str(fmnist_images[0]), "-m", str(bundles["int8"]))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    scores = [float(m["score"]) for m in parsed]
    assert scores == sorted(scores, reverse=True)
    assert all(m["label"] == FASHION_MNIST_CLASSES[int(m["index"])] for m in parsed)


def test_label_flags_json_top_k_and_several_images(bundles, fmnist_images):
    result = run_pipeline(
        "label",
        "-i",
        str(fmnist_images[0]),
        str(fmnist_images[1]),
        "--top_k",
        "2",
        "--model_file",
        str(bundles["float16"]),
        "--num_threads",
        "1",
        "--json",
    )
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in results] == [str(fmnist_images[1]), str(fmnist_images[0])]
    assert all(len(r["predictions"]) == 2 and r["model"] == str(bundles["float16"]) for r in results)
    # The file names carry the true class; a trained model gets most of them right.
    correct = 0
    classifier = Classifier(bundles["float16"])
    for path in fmnist_images:
        truth = path.stem.split("_", 1)[1]
        best = classifier.classify(path, 1)[0].label
        correct += best.lower().replace("/", "_").replace(" ", "_").replace("-", "_") == truth
    assert correct >= 5


def test_label_uses_newest_bundle_and_label_file(tmp_path, bundles, fmnist_images):
    export = tmp_path / "runs" / "x" / "export"
    export.mkdir(parents=True)
    shutil.copy(bundles["int8"], export / "x_int8.tflite")
    result = run_pipeline("label", str(fmnist_images[0]), "-k", "1", cwd=tmp_path)
    assert LINE.match(result.stdout.strip())
    custom = tmp_path / "shouting.txt"
    custom.write_text("\n".join(name.upper() for name in FASHION_MNIST_CLASSES) + "\n")
    shouted = run_pipeline("label", str(fmnist_images[0]), "-k", "1", "-l", str(custom), cwd=tmp_path)
    assert shouted.stdout == result.stdout.upper()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "name",
    [
        "missing.jpg",
        "a_directory.jpg",
        "empty.jpg",
        "text.jpg",
        "truncated.jpg",
        "bad_crc.png",
        "bomb.png",
        "drawing.svg",
    ],
)
def test_label_bad_images_fail_cleanly(bundles, image_zoo, name):
    path = image_zoo[1][name]
    assert_one_line_error(run_pipeline("label", str(path), "-m", str(bundles["int8"]), check=False), str(path))


def test_label_valid_oddities_classify(bundles, image_zoo):
    good = image_zoo[0]
    result = run_pipeline("label", *map(str, good.values()), "-k", "1", "-m", str(bundles["int8"]))
    assert sum(bool(LINE.match(line)) for line in result.stdout.splitlines()) == len(good)


def test_bad_model_and_label_files_fail_cleanly(tmp_path, bundles, fmnist_images):
    not_tflite = tmp_path / "model.tflite"
    not_tflite.write_text("hello")
    result = run_pipeline("label", str(fmnist_images[0]), "-m", str(not_tflite), check=False)
    assert_one_line_error(result, str(not_tflite), "not a TFLite model")
    with pytest.raises(BundleError, match="not a TFLite model"):
        Classifier(not_tflite)

    short = tmp_path / "labels.txt"
    short.write_text("a\nb\nc\n")
    result = run_pipeline("label", str(fmnist_images[0]), "-m", str(bundles["int8"]), "-l", str(short), check=False)
    assert_one_line_error(result, str(short), "3 labels", "10 outputs")

    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(bundles["int8"].read_bytes()[:2000])
    assert_one_line_error(
        run_pipeline("label", str(fmnist_images[0]), "-m", str(truncated), check=False), str(truncated)
    )


def test_serving_imports_no_tensorflow(bundles, fmnist_images):
    script = f"""
import sys
from pipeline.cli import main
sys.argv = ["pipeline", "label", {str(fmnist_images[0])!r}, "-m", {str(bundles["int8"])!r}]
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras", "horovod",
                                                             "tensorflow_model_optimization", "yaml", "matplotlib"))
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert LINE.match(result.stdout.splitlines()[0])


@pytest.mark.parametrize(
    "statement", ["import serve.errors", "from serve import BundleError, ImageError, PipelineError"]
)
def test_importing_the_errors_loads_no_litert(statement):
    loaded = "sorted({m.split('.')[0] for m in sys.modules} & {'ai_edge_litert', 'PIL'})"
    script = f"import sys\n{statement}\nprint({loaded})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout == "[]\n", result.stdout + result.stderr


def run_label(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pipeline label ARGS`, given a minute: a command that hangs on a special file fails the test instead."""
    command = [*PIPELINE, "label", *map(str, args)]
    return subprocess.run(command, cwd=cwd or ROOT, capture_output=True, text=True, env=os.environ, timeout=60)


def resigned(bundle: Path, folder: Path, document: dict | bytes, name: str = "edited.tflite") -> Path:
    """A copy of `bundle` whose metadata is `document` (a dict as JSON, or raw bytes), signed: its checksum passes."""
    from quantize.metadata import embed_metadata_bytes

    model = bundle.read_bytes()
    # Our entries only: the standard TFLite Metadata cannot describe a malformed document.
    edited = embed_metadata_bytes(model, json.dumps(document).encode() if isinstance(document, dict) else document)
    (folder / name).write_bytes(edited)
    return folder / name


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    """Plain .tflite models (no bundle metadata), converted by TensorFlow from tiny functions."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("odd_models")
    rng = np.random.default_rng(0)
    dense = tf.constant(rng.normal(size=(28 * 28, 10)).astype(np.float32))
    dense7 = tf.constant(rng.normal(size=(4 * 4 * 7, 3)).astype(np.float32))
    functions = {
        "4d_output": (lambda x: x * 2.0, [1, 28, 28, 1]),
        "7_channels": (lambda x: tf.nn.softmax(tf.reshape(x, [-1, 4 * 4 * 7]) @ dense7), [1, 4, 4, 7]),
        "batch_of_one": (lambda x: tf.nn.softmax(tf.reshape(x, [1, 28 * 28]) @ dense), [1, 28, 28, 1]),
    }
    models = {}
    for name, (function, shape) in functions.items():
        concrete = tf.function(function, input_signature=[tf.TensorSpec(shape, tf.float32)]).get_concrete_function()
        models[name] = folder / f"{name}.tflite"
        models[name].write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete], None).convert())
    return models


# Finding 4: serve.Classifier breaks its promise.


def test_empty_batch_is_a_value_error_and_the_classifier_keeps_working(bundles, fmnist_images):
    classifier = Classifier(bundles["int8"])
    expected = classifier.classify(fmnist_images[0])
    with pytest.raises(ValueError, match="at least one image"):
        classifier.predict(np.zeros((0, 28, 28, 3), np.uint8))
    assert classifier.classify(fmnist_images[0]) == expected
    assert classifier.classify_batch(fmnist_images[:3])[0] == expected


def _without_input(metadata: dict) -> dict:
    return {key: value for key, value in metadata.items() if key != "input"}


MALFORMED_METADATA = {
    "a list": (lambda m: b"[1, 2, 3]", "not a JSON object"),
    "a string": (lambda m: b'"labels"', "not a JSON object"),
    "deep nesting": (lambda m: b"[" * 100_000 + b"]" * 100_000, "unreadable bundle metadata"),
    "bad utf-8": (lambda m: b'{"labels": ["\xff\xfe"]}', "unreadable bundle metadata"),
    "not json": (lambda m: b'{"labels": [', "unreadable bundle metadata"),
    "a 5000-digit number": (lambda m: b'{"x": ' + b"7" * 5000 + b"}", "unreadable bundle metadata"),
    "labels with a number": (lambda m: {**m, "labels": m["labels"][:-1] + [9]}, "'labels' list of strings"),
    "no input": (_without_input, "'input' height, width and channels"),
    "input as a list": (lambda m: {**m, "input": [28, 28, 1]}, "'input' height, width and channels"),
    "input huge": (lambda m: {**m, "input": {**m["input"], "height": 10**400}}, "'input' height"),
    "input as text": (lambda m: {**m, "input": {**m["input"], "width": "28"}}, "'input' height"),
    "input not the model's": (lambda m: {**m, "input": {**m["input"], "channels": 1}}, "says 28x28x1 input"),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED_METADATA))
def test_malformed_bundle_metadata_is_a_bundle_error(bundles, tmp_path, shape):
    edit, problem = MALFORMED_METADATA[shape]
    metadata = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"])).to_json()
    edited = resigned(bundles["int8"], tmp_path, edit(metadata))
    with pytest.raises(BundleError, match=re.escape(problem)) as caught:
        Classifier(edited)
    assert str(caught.value).startswith(f"{edited}: ")


def test_out_of_bounds_flatbuffer_offsets_are_a_bundle_error(bundles, tmp_path):
    model = bytearray(bundles["int8"].read_bytes())
    start, _ = read_model_metadata(bytes(model))[CHECKSUM_METADATA_NAME]
    model[start - 4 : start] = (0xFFFFFFF0).to_bytes(4, "little")  # the checksum's length: far past the end
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(model)
    for verify_checksum in (True, False):
        with pytest.raises(BundleError, match="corrupt TFLite flatbuffer"):
            Classifier(broken, verify_checksum=verify_checksum)


def test_model_with_a_4d_output_is_refused_at_load(odd_models, fmnist_images):
    model = odd_models["4d_output"]
    with pytest.raises(BundleError, match=re.escape("its output has shape [1, 28, 28, 1], not [1, classes]")):
        Classifier(model)
    result = run_label(fmnist_images[0], fmnist_images[1], "-m", model)
    assert_one_line_error(result, f"{model}: not an image classifier")
    assert result.stdout == ""


def test_seven_channel_model_is_blamed_not_the_image(odd_models, fmnist_images):
    model = odd_models["7_channels"]
    result = run_label(fmnist_images[0], "-m", model)
    assert_one_line_error(result, f"{model}: takes 7-channel images; only 1 (grey) or 3 (RGB) are supported")
    assert str(fmnist_images[0]) not in result.stderr


def test_labels_given_as_a_string_are_refused(bundles, tmp_path):
    metadata = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"])).to_json()
    edited = resigned(bundles["int8"], tmp_path, {**metadata, "labels": "abcdefghij"})  # split: ten labels
    with pytest.raises(BundleError, match="no 'labels' list of strings"):
        Classifier(edited)


def test_model_with_its_batch_fixed_to_one_classifies_batches(odd_models, fmnist_images):
    classifier = Classifier(odd_models["batch_of_one"])  # a plain .tflite: no metadata, numbered labels
    assert classifier.metadata is None and classifier.labels == [str(i) for i in range(10)]
    one_by_one = [classifier.classify(path) for path in fmnist_images[:3]]
    assert classifier.classify_batch(fmnist_images[:3]) == one_by_one
    assert classifier.classify_batch(fmnist_images[3:5]) == [classifier.classify(p) for p in fmnist_images[3:5]]


# The bundle checksum.


def test_bundles_are_signed_and_a_changed_byte_is_refused(bundles, fmnist_images, tmp_path):
    for path in bundles.values():
        read_model_file(path)  # checks the checksum
    changed = tmp_path / "changed.tflite"
    changed.write_bytes(bundles["int8"].read_bytes().replace(b'"Trouser"', b'"Trousen"'))  # a label, in place
    with pytest.raises(BundleError, match=f"^{re.escape(str(changed))}: corrupt bundle: checksum does not match$"):
        Classifier(changed)
    assert_one_line_error(run_label(fmnist_images[0], "-m", changed), "corrupt bundle: checksum does not match")
    # Changed on purpose: loading it anyway is explicit.
    assert Classifier(changed, verify_checksum=False).labels[1] == "Trousen"
    result = run_label(fmnist_images[0], "-m", changed, "-k", "10", "--ignore-checksum")
    assert "Trousen (1): " in result.stdout and result.returncode == 0

    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(bundles["int8"].read_bytes()[:-1])
    with pytest.raises(BundleError, match="corrupt bundle: checksum does not match"):
        Classifier(truncated)
    unsigned = tmp_path / "unsigned.tflite"  # as if written before bundles carried a checksum
    unsigned.write_bytes(bundles["int8"].read_bytes().replace(CHECKSUM_METADATA_NAME.encode(), b"edge_pipeline.sha000"))
    with pytest.raises(BundleError, match="no checksum"):
        Classifier(unsigned)


def test_the_checksum_is_the_sha256_of_the_bundle_with_zeros_in_its_place(bundles):
    # Small bundles are hashed by Python's own sha256, larger ones by OpenSSL's: both must write the format's.
    sizes = {path.stat().st_size for path in bundles.values()}
    assert min(sizes) <= SMALL_BUNDLE_BYTES < max(sizes)
    for path in bundles.values():
        model = path.read_bytes()
        start, length = read_model_metadata(model)[CHECKSUM_METADATA_NAME]
        zeroed = model[:start] + b"0" * length + model[start + length :]
        assert model[start : start + length].decode() == hashlib.sha256(zeroed).hexdigest()


# Finding 5: special files.


def test_label_refuses_dev_zero_as_model_or_labels(bundles, fmnist_images):
    result = run_label(fmnist_images[0], "-m", "/dev/zero")
    assert_one_line_error(result, "/dev/zero: is a character device, not a .tflite model")
    result = run_label(fmnist_images[0], "-m", bundles["int8"], "-l", "/dev/zero")
    assert_one_line_error(result, "/dev/zero: is a character device, not a labels file")


def test_label_refuses_named_pipes_without_hanging(bundles, fmnist_images, tmp_path):
    pipe = tmp_path / "pipe.tflite"
    os.mkfifo(pipe)
    assert_one_line_error(run_label(fmnist_images[0], "-m", pipe), f"{pipe}: is a named pipe, not a .tflite model")
    result = run_label(fmnist_images[0], "-m", bundles["int8"], "-l", pipe)
    assert_one_line_error(result, f"{pipe}: is a named pipe, not a labels file")
    result = run_label(pipe, fmnist_images[0], "-m", bundles["int8"])
    assert_one_line_error(result, f"{pipe}: is a named pipe, not an image")
    assert sum(bool(LINE.match(line)) for line in result.stdout.splitlines()) == 5  # the other image is labelled


def test_oversized_model_and_labels_files_are_refused_unread(bundles, fmnist_images, tmp_path):
    huge = tmp_path / "huge.tflite"
    with open(huge, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used, and nothing may read it all
    assert_one_line_error(run_label(fmnist_images[0], "-m", huge), f"{huge}: larger than 1024 MiB")
    labels = tmp_path / "labels.txt"
    with open(labels, "wb") as f:
        f.truncate((16 << 20) + 1)
    result = run_label(fmnist_images[0], "-m", bundles["int8"], "-l", labels)
    assert_one_line_error(result, f"{labels}: larger than 16 MiB, too large for a labels file")


def test_newest_bundle_skips_dangling_symlinks_and_special_files(tmp_path, bundles, fmnist_images):
    export = tmp_path / "runs" / "x" / "export"
    export.mkdir(parents=True)
    shutil.copy(bundles["int8"], export / "x_int8.tflite")
    (export / "x_gone.tflite").symlink_to(tmp_path / "deleted.tflite")
    (export / "x_folder.tflite").mkdir()
    os.mkfifo(export / "x_pipe.tflite")  # the newest: it must not be opened
    result = run_label(fmnist_images[0], "-k", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert LINE.match(result.stdout.strip())


# Finding 6: output that lies.


def test_label_names_with_control_characters_are_escaped(bundles, fmnist_images, tmp_path):
    metadata = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"])).to_json()
    labels = ["T\nAnkle boot (9): 1.000000", "\x1b[31mred", "tab\there", "del\x7f", "nel\x85", "cr\r", "par\u2029"]
    labels += ["靴", "Café", "plain"]
    edited = resigned(bundles["int8"], tmp_path, {**metadata, "labels": labels})
    strange = tmp_path / "a\nb (1): 0.5.png"
    shutil.copy(fmnist_images[0], strange)
    result = run_label(strange, fmnist_images[1], tmp_path / "gone\x1b.png", "-m", edited, "-k", "10")
    escaped = ["T\\nAnkle boot (9): 1.000000", "\\x1b[31mred", "tab\\there", "del\\x7f", "nel\\x85", "cr\\r"]
    escaped += ["par\\u2029", "靴", "Café", "plain"]
    lines = result.stdout.splitlines()
    assert len(lines) == 22 and lines[0] == str(strange).replace("\n", "\\n") + ":"
    assert sorted(LINE.match(line)["label"] for line in lines[1:11]) == sorted(escaped)
    assert all(escaped[int(m["index"])] == m["label"] for m in map(LINE.match, lines[1:11]))
    assert result.stderr == f"Error: {tmp_path}/gone\\x1b.png: no such file\n"
    lines = run_label(strange, "-m", edited, "-k", "10", "--json").stdout.splitlines()
    assert len(lines) == 1
    assert sorted(p["label"] for p in json.loads(lines[0])["predictions"]) == sorted(labels)


@pytest.mark.parametrize("value", ["-3", "0"])
def test_label_top_k_below_one_is_a_usage_error(bundles, fmnist_images, value):
    result = run_label(fmnist_images[0], "-m", bundles["int8"], "-k", value)
    assert result.returncode == 2 and result.stdout == ""
    assert f"Invalid value for '-k' / '--top_k': {value} is not in the range x>=1" in result.stderr


@pytest.mark.parametrize("value", ["0", "-0.0", "-127.5", "nan", "inf"])
def test_label_input_std_zero_is_a_usage_error(bundles, fmnist_images, value):
    result = run_label(fmnist_images[0], "-m", bundles["float32"], "--input_std", value)
    assert result.returncode == 2 and result.stdout == ""
    assert "Invalid value for '--input_std'" in result.stderr
    with pytest.raises(ValueError, match="input_std must be a positive finite number"):
        Classifier(bundles["float32"], input_std=float(value))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_label_num_threads_below_one_is_a_usage_error(bundles, fmnist_images, value):
    result = run_label(fmnist_images[0], "-m", bundles["int8"], "--num_threads", value)
    assert result.returncode == 2 and "Invalid value for '--num_threads'" in result.stderr


def test_litert_info_line_is_silenced_and_other_stderr_lines_pass(bundles, fmnist_images, capfd):
    from serve.quiet import LITERT_INFO_LINE, stderr_without

    result = run_label(fmnist_images[0], "-m", bundles["int8"])
    assert result.returncode == 0 and result.stderr == ""
    with stderr_without(LITERT_INFO_LINE.__eq__):
        os.write(2, LITERT_INFO_LINE + b"\nERROR: something LiteRT had to say\n")
    err = capfd.readouterr().err
    assert err == "ERROR: something LiteRT had to say\n"


# serve/files.py: atomic writes.


def test_atomic_writes_take_the_umask_of_the_moment_not_of_the_import(tmp_path):
    from serve.files import write_atomic

    previous = os.umask(0o027)
    try:
        write_atomic(tmp_path / "out" / "private.txt", "x")
        os.umask(0o002)
        write_atomic(tmp_path / "out" / "shared.txt", b"y")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "private.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out" / "shared.txt").stat().st_mode) == 0o664
    assert sorted(os.listdir(tmp_path / "out")) == ["private.txt", "shared.txt"]  # no temporary file left


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path):
    from serve.files import atomic_path

    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


# Issue 19: hostile input to the Classifier.


def test_an_image_of_no_pixels_is_an_image_error(bundles, fmnist_images):
    classifier = Classifier(bundles["int8"])
    empty = {"<array>": np.zeros((0, 0, 3), np.uint8), "<image>": Image.new("RGB", (0, 0))}
    for name, source in empty.items():
        with pytest.raises(ImageError, match=rf"^{name}: empty image \(0x0 pixels\)$"):
            classifier.classify(source)
    with pytest.raises(ImageError, match=r"^<array>: empty image \(0x5 pixels\)$"):
        classifier.classify(np.zeros((5, 0), np.uint8))
    results = list(classifier.classify_many([fmnist_images[0], np.zeros((0, 0), np.uint8), fmnist_images[1]]))
    assert isinstance(results[1], ImageError) and results[0] == classifier.classify(fmnist_images[0])


def test_bad_paths_in_classify_many_are_errors_of_their_own(bundles, fmnist_images, tmp_path):
    classifier = Classifier(bundles["int8"])
    bad = {
        "a\0b.png": "a\0b.png: not a possible file name (embedded null byte)",
        "\ud800.png": "\ud800.png: not a possible file name (",
        "x" * 5000 + ".png": "x" * 5000 + ".png: cannot read (File name too long)",
        3: "<int>: not an image (give a path, bytes, a PIL image or a uint8 array)",
        None: "<NoneType>: not an image (",
        str(tmp_path / "missing.png"): f"{tmp_path / 'missing.png'}: no such file",
    }
    sources = [fmnist_images[0], *bad, fmnist_images[1]]
    for jobs in (1, 3):
        results = list(classifier.classify_many(sources, jobs=jobs, batch_size=2))
        assert len(results) == len(sources)
        assert results[0] == classifier.classify(fmnist_images[0]) and results[-1] == classifier.classify(sources[-1])
        for result, message in zip(results[1:-1], bad.values()):
            assert isinstance(result, ImageError) and str(result).startswith(message), (result, message)


# The peak is VmHWM, this process's own: ru_maxrss carries the parent's peak over exec (pytest's, with TensorFlow).
HUGE_DECODES = """
import json, re, sys
from PIL import Image
from serve import Classifier
def peak_kib():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1))
bundle, image, count, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
classifier = Classifier(bundle)
classifier.classify(Image.new("RGB", (28, 28)))  # everything but the large decodes loaded
before = peak_kib()
results = list(classifier.classify_many([image] * count, jobs=jobs))
grew = peak_kib() - before
print(json.dumps({"grew_mib": grew / 1024, "classified": sum(isinstance(r, list) for r in results)}))
"""


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs procfs")
def test_decoding_threads_share_one_memory_budget(bundles, tmp_path):
    """Four 9000x9000 1-bit PNGs (81 million pixels each, within Pillow's limit) in four decoding threads raise the
    peak memory little more than one alone (~0.3 GB): threads decode at most Pillow's limit of pixels at once, and
    free it for the next. Unbounded, each thread held its own 0.3 GB, and glibc's malloc kept it after use."""
    big = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(big)

    def peak(count: int, jobs: int) -> dict:
        command = [sys.executable, "-c", HUGE_DECODES, str(bundles["int8"]), str(big), str(count), str(jobs)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    one, four = peak(1, 1), peak(4, 4)
    assert one["classified"] == 1 and four["classified"] == 4
    assert one["grew_mib"] > 200, (one, four)  # the decode is as large as it should be
    assert four["grew_mib"] < 1.5 * one["grew_mib"], (one, four)


def test_a_closed_classifier_refuses_work_and_with_closes_it(bundles, fmnist_images):
    with Classifier(bundles["int8"]) as classifier:
        expected = classifier.classify(fmnist_images[0])
    assert classifier._interpreter is None  # the interpreter and its memory are released
    closed = rf"^{re.escape(str(bundles['int8']))}: the classifier is closed$"
    with pytest.raises(ValueError, match=closed):
        classifier.classify(fmnist_images[0])
    with pytest.raises(ValueError, match=closed):
        next(classifier.classify_many(fmnist_images))
    with pytest.raises(ValueError, match=closed):
        classifier.predict(np.zeros((1, 28, 28, 3), np.uint8))
    classifier.close()  # again: nothing happens
    assert classifier.preprocess(fmnist_images[0]).shape == (28, 28, 3)  # no interpreter needed
    assert Classifier(bundles["int8"]).classify(fmnist_images[0]) == expected
