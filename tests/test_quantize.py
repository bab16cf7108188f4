"""Quantisation: the report, the accuracy gate, QAT, and the whole round trip on an image folder."""

from __future__ import annotations

import json

import pytest

from serve import Classifier
from serve.bundle import read_bundle_metadata, read_model_file
from tests.conftest import make_image_folder, run_pipeline


def test_report_compares_every_bundle_with_float(fmnist_run, bundles):
    report = json.loads((fmnist_run / "quantize_report.json").read_text())
    assert report["eval_split"] == "test" and report["eval_images"] == 1500
    assert report["rejected"] == []
    rows = report["bundles"]
    assert list(rows) == ["float32", "int8", "float16"]
    assert rows["float32"]["agreement"] == 1.0
    assert rows["float16"]["agreement"] >= 0.99
    assert abs(rows["int8"]["top1"] - rows["float32"]["top1"]) <= 0.01
    assert rows["int8"]["size_bytes"] < rows["float16"]["size_bytes"] < rows["float32"]["size_bytes"]
    for mode, row in rows.items():
        assert row["latency_ms"] > 0 and row["top5"] >= row["top1"]
        assert row["bundle"] == str(bundles[mode])


def test_gate_refuses_an_int8_model_over_budget_and_keeps_float(tmp_path, fmnist_run):
    run = tmp_path / "fmnist"
    run.mkdir()
    for name in ("config.yaml", "summary.json", "best.keras", "data.json"):
        (run / name).write_bytes((fmnist_run / name).read_bytes())
    # A negative budget demands that int8 beat float by 5 points, which it cannot: the gate must trip.
    result = run_pipeline("quantize", str(run), "--budget", "-5", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "int8 lost more than -5.0 points" in result.stderr.splitlines()[-1]
    assert "REJECTED" in result.stdout
    assert (run / "export" / "fmnist_float32.tflite").is_file()
    assert not (run / "export" / "fmnist_int8.tflite").exists()
    assert json.loads((run / "quantize_report.json").read_text())["rejected"] == ["int8"]


@pytest.mark.slow
def test_image_folder_round_trip_with_qat(tmp_path):
    """train -> quantize (QAT) -> label on a generated image folder, MobileNetV2 with augmentation."""
    root = make_image_folder(tmp_path / "shapes", per_class=30)
    runs = tmp_path / "runs"
    run_pipeline(
        "train",
        "--config",
        "image_folder",
        "--data",
        str(root),
        "--name",
        "shapes",
        "--epochs",
        "2",
        "--set",
        f"runs_dir={runs}",
        "--set",
        "input_size=32",
        "--set",
        "batch_size=16",
    )
    run = runs / "shapes"
    result = run_pipeline(
        "quantize", str(run), "-q", "qat", "--qat-epochs", "1", "--calibration-images", "20", "--budget", "100"
    )
    assert "qat" in result.stdout
    bundle = run / "export" / "shapes_qat.tflite"
    metadata = read_bundle_metadata(bundle, read_model_file(bundle))
    assert metadata["labels"] == ["blue_stripes", "green_discs", "red_squares"]
    assert metadata["input"]["channels"] == 3 and metadata["normalization"]["mean"] == 127.5
    classifier = Classifier(bundle)
    assert classifier.input_dtype.name == "uint8" and (classifier.height, classifier.width) == (32, 32)
    image = next((root / "red_squares").glob("*.png"))
    label = run_pipeline("label", str(image), "-m", str(bundle), "-k", "3")
    assert sorted(line.split(" (")[0] for line in label.stdout.splitlines()) == metadata["labels"]


@pytest.mark.slow
def test_small_cnn_learns_an_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=40)
    runs = tmp_path / "runs"
    run_pipeline(
        "train",
        "--data",
        str(root),
        "--name",
        "cnn",
        "--epochs",
        "8",
        "--set",
        f"runs_dir={runs}",
        "--set",
        "input_size=32",
        "--set",
        "channels=3",
        "--set",
        "batch_size=16",
        "--set",
        "augment=true",
        "--set",
        "learning_rate=0.003",
    )
    summary = json.loads((runs / "cnn" / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.8  # three easy classes: chance is 0.33
    run_pipeline("quantize", str(runs / "cnn"), "--calibration-images", "50", "--budget", "100")
    assert (runs / "cnn" / "export" / "cnn_int8.tflite").is_file()
