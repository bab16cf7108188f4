"""The bundle and its users: serve.Classifier and `pipeline label`, with real TFLite models."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from serve import BundleError, Classifier
from serve.bundle import read_bundle_metadata, read_model_file
from tests.conftest import ROOT, run_pipeline
from train.data import FASHION_MNIST_CLASSES

LINE = re.compile(r"^(?P<label>.+) \((?P<index>\d+)\): (?P<score>\d\.\d{6})$")


def test_bundle_carries_labels_input_spec_and_provenance(fmnist_run, bundles):
    data = json.loads((fmnist_run / "data.json").read_text())
    for mode, path in bundles.items():
        metadata = read_bundle_metadata(path, read_model_file(path))
        assert metadata["labels"] == FASHION_MNIST_CLASSES
        assert metadata["quantization"] == mode
        assert metadata["input"] | {"height": 28, "width": 28, "channels": 1} == metadata["input"]
        assert metadata["normalization"]["std"] == 255.0
        assert metadata["provenance"]["data_fingerprint"] == data["fingerprint"]
        assert metadata["provenance"]["config"]["name"] == "fmnist"
        assert set(metadata["metrics"]) == {"float32", mode}
    int8 = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"]))
    assert int8["input_dtype"] == "uint8"
    assert int8["output_quantization"]["scale"] > 0
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
    report = json.loads(result.stdout)
    assert [r["image"] for r in report["results"]] == [str(fmnist_images[1]), str(fmnist_images[0])]
    assert all(len(r["predictions"]) == 2 for r in report["results"])
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
