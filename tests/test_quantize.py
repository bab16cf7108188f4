"""Quantisation: the report, the accuracy gate, QAT, and the whole round trip on an image folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve import Classifier
from serve.bundle import read_bundle_metadata, read_model_file
from serve.errors import PipelineError
from tests.conftest import ROOT, make_image_folder, run_pipeline
from tests.test_train import ViewWithoutArray
from train.rundir import RunDir


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
        # Per class, as serve/metrics.py reports them (checked against scikit-learn in tests/test_evaluate.py).
        assert list(row["per_class"]) == Classifier(bundles[mode]).labels
        assert sum(c["support"] for c in row["per_class"].values()) == row["macro"]["support"] == 1500
        recall = sum(c["recall"] * c["support"] for c in row["per_class"].values()) / 1500
        assert recall == pytest.approx(row["top1"]) and row["weighted"]["recall"] == pytest.approx(row["top1"])
        assert all(0 <= c[key] <= 1 for c in row["per_class"].values() for key in ("precision", "recall", "f1"))


# Adds one large vector to every column of the last layer's kernel: each logit gains the same amount, which
# float32's softmax cannot tell, but the logits' range grows ~1000-fold and int8 loses their ranking.
SPOIL_FOR_INT8 = """
import sys
import tf_keras as keras
model = keras.models.load_model(sys.argv[1], compile=False)
kernel, bias = model.layers[-1].get_weights()
model.layers[-1].set_weights([kernel + 1000.0, bias])
model.save(sys.argv[1])
"""


def copy_run(source: Path, run: Path) -> Path:
    """A run directory with `source`'s trained model and its exported bundles."""
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return run


def test_gate_refuses_an_int8_model_over_budget_and_keeps_float(tmp_path, fmnist_run, bundles):
    run = copy_run(fmnist_run, tmp_path / "runs" / "fmnist")
    subprocess.run([sys.executable, "-c", SPOIL_FOR_INT8, str(run / "best.keras")], check=True, capture_output=True)
    result = run_pipeline("quantize", str(run), "--budget", "0", "--calibration-images", "100", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "int8 lost more than 0.0 points" in result.stderr.splitlines()[-1]
    assert result.stderr.count("\n") == 1, result.stderr  # the error alone: no TensorFlow or converter chatter
    assert "REJECTED" in result.stdout
    assert (run / "export" / "fmnist_float32.tflite").is_file()
    assert json.loads((run / "quantize_report.json").read_text())["rejected"] == ["int8"]


def test_stale_bundle_survives_a_failed_gate(tmp_path, fmnist_run, bundles, fmnist_images):
    """The int8 bundle of an earlier model is set aside when the gate refuses the new one: `pipeline label`
    (newest bundle) must not pick it as this model's."""
    run = copy_run(fmnist_run, tmp_path / "runs" / "fmnist")
    earlier_int8 = (run / "export" / "fmnist_int8.tflite").read_bytes()
    subprocess.run([sys.executable, "-c", SPOIL_FOR_INT8, str(run / "best.keras")], check=True, capture_output=True)
    result = run_pipeline("quantize", str(run), "--budget", "0", "--calibration-images", "100", check=False)
    assert result.returncode == 1
    assert not (run / "export" / "fmnist_int8.tflite").exists()
    assert (run / "export" / "fmnist_int8.tflite.stale").read_bytes() == earlier_int8  # set aside, not lost
    assert "fmnist_int8.tflite.stale" in result.stdout
    label = run_pipeline("label", "--json", str(fmnist_images[0]), cwd=tmp_path)  # newest bundle under runs/
    assert json.loads(label.stdout)["model"].endswith("fmnist_float32.tflite")


@pytest.mark.parametrize(
    "option",
    [
        ("--calibration-images", "0"),
        ("--qat-epochs", "0"),
        ("--budget", "-1"),
        ("--num-threads", "0"),
        ("--sensitive-steps", "0"),
    ],
)
def test_quantize_argument_errors_write_nothing(tmp_path, fmnist_run, bundles, option):
    run = copy_run(fmnist_run, tmp_path / "fmnist")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = run_pipeline("quantize", str(run), "-q", "qat", *option, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert option[0] in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_bundle_provenance_has_no_absolute_paths(fmnist_run, bundles, runs_dir):
    for path in bundles.values():
        metadata = read_bundle_metadata(path, read_model_file(path))
        config = metadata.provenance["config"]
        assert not {"runs_dir", "data_path", "cache_dir"} & set(config)
        assert config["data"] == "fashion-mnist" and config["name"] == "fmnist"
        assert str(runs_dir).encode() not in path.read_bytes()


def test_quantize_waits_for_no_one_while_a_run_is_locked(tmp_path, fmnist_run, bundles):
    """Two processes on one run directory: the second is refused, naming the first's PID."""
    run = copy_run(fmnist_run, tmp_path / "fmnist")
    with RunDir(run).lock("training"):
        result = run_pipeline("quantize", str(run), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"in use by PID {os.getpid()}" in result.stderr
    assert not (run / "export" / "fmnist_int8.tflite.stale").exists()


def test_importing_quantize_sets_no_environment_variable():
    script = (
        "import os, sys\nbefore = dict(os.environ)\nfrom quantize import MODES, QUANTIZED_MODES\n"
        "import quantize.tflite_internals\nprint(dict(os.environ) == before, 'tensorflow' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.stdout.split() == ["True", "False"], result.stdout + result.stderr


def test_unsupported_tensorflow_version_fails_loudly():
    from quantize.tflite_internals import check_version

    for version in ("2.17.1", "2.19.0", "2.180.0", "3.18.0"):
        with pytest.raises(PipelineError, match=rf"^TensorFlow {re.escape(version)} is installed, .* 2\.18\.x only"):
            check_version(version)
    pinned = re.search(r'"tensorflow==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for version in (pinned, "2.18.0", "2.18.2rc0"):
        check_version(version)


def test_qat_without_training_data_is_refused_before_writing(tmp_path, fmnist_run, bundles):
    from pipeline.tensorflow_env import prepare

    prepare()
    from pipeline.jobs import trained_run
    from quantize.export import QuantizeData, QuantizeError, export_bundles

    run = copy_run(fmnist_run, tmp_path / "fmnist")
    trained = trained_run(RunDir(run), ["int8", "qat"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    images = np.zeros((4, 28, 28, 1), np.uint8)
    data = QuantizeData(
        class_names=list("abcdefghij"), calibration=images, eval_x=images, eval_y=None, eval_split="val"
    )
    with pytest.raises(QuantizeError, match="qat fine-tunes on the training split"):
        export_bundles(trained, data, modes=["int8", "qat"], budget=1.0, qat_epochs=1, num_threads=1)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_quantize_reads_eval_and_training_images_batch_by_batch(tmp_path, fmnist_run):
    """Evaluation, latency and QAT fine-tuning take the held-out and training images a batch at a time from views
    that cannot be converted whole, as the data cache's views of a larger-than-memory split."""
    from pipeline.config import load_config
    from pipeline.tensorflow_env import prepare

    prepare()
    from pipeline.jobs import trained_run
    from quantize.export import LATENCY_ROUNDS, LATENCY_RUNS, QuantizeData, export_bundles
    from train.data import load_dataset

    run = copy_run(fmnist_run, tmp_path / "fmnist")
    data = load_dataset(load_config(run / "config.yaml"))
    eval_x, train_x = ViewWithoutArray(data.test_x[:600]), ViewWithoutArray(data.train_x[:300])
    quantize_data = QuantizeData(
        class_names=data.class_names,
        calibration=data.train_x[:50],
        eval_x=eval_x,
        eval_y=data.test_y[:600],
        eval_split="test",
        train_x=train_x,
        train_y=data.train_y[:300],
    )
    trained = trained_run(RunDir(run), ["qat"])
    report = export_bundles(trained, quantize_data, modes=["qat"], budget=100.0, qat_epochs=1, num_threads=1)
    assert report["eval_images"] == 600 and report["bundles"]["qat"]["top1"] > 0.5  # ten classes: chance is 0.1
    # All of it by float32 and by qat, then the few images both are timed on.
    assert max(eval_x.reads) == 256 and sum(eval_x.reads) == 2 * 600 + LATENCY_RUNS // LATENCY_ROUNDS
    assert max(train_x.reads) == 64 and sum(train_x.reads) == 300  # one epoch in batches of the run's 64


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
    assert metadata.labels == ["blue_stripes", "green_discs", "red_squares"]
    assert metadata.input.channels == 3 and metadata.normalization.mean == 127.5
    assert metadata.provenance["config"]["data"] == "shapes"  # the folder's name, not its path
    assert str(tmp_path).encode() not in bundle.read_bytes()
    classifier = Classifier(bundle)
    assert classifier.input_dtype.name == "uint8" and (classifier.height, classifier.width) == (32, 32)
    image = next((root / "red_squares").glob("*.png"))
    label = run_pipeline("label", str(image), "-m", str(bundle), "-k", "2")
    expected = [f"{p.label} ({p.index}): {p.score:.6f}" for p in classifier.classify(image, top_k=2)]
    assert label.stdout.splitlines() == expected


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


def test_standard_metadata_reads_back_and_is_signed_last(bundles):
    """The TFLITE_METADATA entry, read with the vendored schema (no tflite-support needed), and the labels.txt zip
    after the flatbuffer: covered by the checksum, and gone when only our entries are written again."""
    import io
    import zipfile

    from quantize.metadata import LABELS_FILE, STANDARD_METADATA_NAME, embed_metadata, embed_metadata_bytes
    from quantize.vendored import metadata_schema_py_generated as schema
    from serve.bundle import BUNDLE_METADATA_NAME
    from serve.errors import BundleError
    from serve.tflite_flatbuffer import read_model_metadata

    data = bundles["int8"].read_bytes()
    start, length = read_model_metadata(data)[STANDARD_METADATA_NAME]
    buffer = data[start : start + length]
    assert schema.ModelMetadata.ModelMetadataBufferHasIdentifier(buffer, 0)
    found = schema.ModelMetadataT.InitFromObj(schema.ModelMetadata.GetRootAs(buffer, 0))
    assert found.minParserVersion == b"1.0.0" and found.name == b"fmnist"
    (image,), (scores,) = found.subgraphMetadata[0].inputTensorMetadata, found.subgraphMetadata[0].outputTensorMetadata
    assert image.content.contentProperties.colorSpace == schema.ColorSpaceType.RGB
    assert list(image.processUnits[0].options.mean) == [0.0] and list(image.processUnits[0].options.std) == [1.0]
    assert (list(image.stats.min), list(image.stats.max)) == ([0.0], [255.0])
    assert scores.associatedFiles[0].type == schema.AssociatedFileType.TENSOR_AXIS_LABELS
    metadata = read_bundle_metadata(bundles["int8"], data)
    with zipfile.ZipFile(bundles["int8"]) as packed:
        assert packed.read(LABELS_FILE).decode().splitlines() == metadata.labels
    again = embed_metadata(data, metadata)  # replaces the entries and the zip: nothing doubles
    assert read_bundle_metadata("again", again) == metadata and abs(len(again) - len(data)) < 100
    with zipfile.ZipFile(io.BytesIO(again)) as packed:
        assert packed.namelist() == [LABELS_FILE]
    tampered = bytearray(data)
    tampered[-30] ^= 1  # inside the zip's end record, after the flatbuffer
    with pytest.raises(BundleError, match="checksum does not match"):
        Classifier(bytes(tampered))
    ours_only = embed_metadata_bytes(data, metadata.to_bytes())
    assert STANDARD_METADATA_NAME not in read_model_metadata(ours_only) and BUNDLE_METADATA_NAME in read_model_metadata(
        ours_only
    )
    assert b"PK\x05\x06" not in ours_only[-64:]  # no zip left at the end


@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")  # reading a tensor inside, on purpose
def test_int8_logits_are_float_products_of_int8_features_and_int8_stored_weights(bundles, fmnist_images):
    """The int8 bundle runs int8 inside, but its last layer in float32, on the dequantized int8 features, with weights
    stored as int8 (a scale per class) that a DEQUANTIZE turns into float: logits not in steps of an int8 scale, the
    scores their float softmax, still what serve, MediaPipe and the browser read as the output."""
    from ai_edge_litert.interpreter import Interpreter

    classifier = Classifier(bundles["int8"])
    assert classifier.input_dtype == np.uint8 and classifier.input_quantization == (1.0, 0)
    assert classifier.output_quantization == (0.0, 0)
    interpreter = Interpreter(model_path=str(bundles["int8"]), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]  # the graph's own ops
    assert [op["op_name"] for op in ops[-2:]] == ["FULLY_CONNECTED", "SOFTMAX"]
    features, weights, bias = ops[-2]["inputs"]
    (stored,) = [op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] == weights]
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    scales = tensors[stored]["quantization_parameters"]["scales"]
    assert tensors[stored]["dtype"] == np.int8 and tensors[stored]["shape"][0] == len(scales) == 10
    assert all(tensors[i]["dtype"] == np.float32 for i in (features, weights, bias, ops[-2]["outputs"][0]))
    output = interpreter.get_output_details()[0]
    for image in fmnist_images:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], classifier.preprocess(image)[None])
        interpreter.invoke()
        x = interpreter.get_tensor(features)[0].astype(np.float64)
        w = interpreter.get_tensor(stored).astype(np.float64) * scales[:, None]
        logits = interpreter.get_tensor(ops[-2]["outputs"][0])[0]
        np.testing.assert_allclose(logits, w @ x + interpreter.get_tensor(bias), atol=1e-4)
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        scores = interpreter.get_tensor(output["index"])[0]
        np.testing.assert_allclose(scores, softmax, atol=1e-6)
        assert len(np.unique(scores)) == len(scores)  # no two classes tie
        np.testing.assert_allclose(classifier.predict(classifier.preprocess(image)[None])[0], scores)


def test_report_latency_is_a_median_within_its_rounds(fmnist_run, bundles):
    from quantize import SENSITIVE_STEPS
    from quantize.export import LATENCY_ROUNDS

    report = json.loads((fmnist_run / "quantize_report.json").read_text())
    assert report["latency_rounds"] == LATENCY_ROUNDS and report["held_out_images"] == 0
    assert report["sensitive_steps"] == SENSITIVE_STEPS
    for row in report["bundles"].values():
        low, high = row["latency_spread_ms"]
        assert 0 < low <= row["latency_ms"] <= high


def test_bias_correction_moves_only_biases_and_keeps_float_answers(fmnist_run):
    """The copy int8 is converted from (the trained model inside the bundles' RGB wrapper): same kernels, batch-norm
    offsets and dense biases shifted by the rounding's mean effect (small), float predictions all but unchanged;
    the original model, nested one included, untouched."""
    import tf_keras as keras

    from quantize.client_input import as_rgb, for_clients
    from quantize.convert import bias_corrected
    from train.data import find_fashion_mnist, read_fashion_mnist

    model = for_clients(keras.models.load_model(fmnist_run / "best.keras", compile=False))
    before = [w.copy() for w in model.get_weights()]
    images = as_rgb(read_fashion_mnist(find_fashion_mnist(None), "test")[0][:200, :, :, None])
    corrected = bias_corrected(model, images)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    names = [w.name for w in corrected.weights]
    changed = [n for n, a, b in zip(names, before, corrected.get_weights()) if not np.array_equal(a, b)]
    assert changed and all(n.endswith(("beta:0", "bias:0")) for n in changed), changed
    original, shifted = model.predict(images, verbose=0), corrected.predict(images, verbose=0)
    assert np.mean(original.argmax(1) == shifted.argmax(1)) >= 0.99 and np.abs(original - shifted).max() < 0.1


def _tiny_classifier(margin: float):
    """A 16x16 RGB network with fixed random weights whose ten class scores differ by about `margin` (logits):
    small margins make near-ties that int8 rounding flips, as EfficientNet-Lite0 has on texture photos."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    x = keras.layers.Conv2D(16, 3, activation="relu6")(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu6")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(10, activation="softmax")
    model = keras.Model(image, dense(x))
    kernel, bias = dense.get_weights()
    # One shared direction plus `margin` times each class's own: the classes' logits nearly tie when margin is small.
    dense.set_weights([kernel[:, :1] + margin * kernel, bias])
    return model


def _coloured_noise(count: int, seed: int) -> np.ndarray:
    """uint8 16x16 RGB images, each a random colour with noise: they differ in what the tiny network sees."""
    rng = np.random.default_rng(seed)
    colours, noise = rng.integers(0, 256, (count, 1, 1, 3)), rng.normal(0, 40, (count, 16, 16, 3))
    return np.clip(colours + noise, 0, 255).astype(np.uint8)


def test_int8_that_changes_floats_answers_is_made_again_with_corrected_biases(capsys):
    """Near-ties: plain int8 picks another class than float on too many calibration images, so the conversion is
    made again (sensitive layers in float, biases corrected on the int8 graph), still uint8 in and float32 out."""
    from quantize.convert import AGREEMENT_TARGET, to_tflite, top1_agreement

    calibration = _coloured_noise(200, seed=0)
    model = _tiny_classifier(margin=0.02)
    flat = to_tflite(model, "int8", calibration)
    message = capsys.readouterr().out
    agreed = float(re.search(r"agreed with float on ([\d.]+)%", message).group(1)) / 100
    assert agreed < AGREEMENT_TARGET and "corrected the int8 graph's biases" in message
    assert top1_agreement(flat, model, calibration) >= agreed - 0.02  # measured 0.865 after, 0.86 before
    classifier = Classifier(flat, verify_checksum=False)
    assert classifier.input_dtype == np.uint8
    assert classifier.predict(calibration[:3]).dtype == np.float32


def test_lower_sensitive_steps_keep_more_layers_in_float(capsys):
    """Near-ties again, now with every layer counted sensitive: more ops are kept in float, the depthwise convolution
    among them, with its float32 weights (the last layer's stay stored as int8). What that buys on EfficientNet-Lite
    is for benchmarks to measure (docs/quantization.md)."""
    from ai_edge_litert.interpreter import Interpreter

    from quantize.convert import to_tflite

    calibration = _coloured_noise(200, seed=0)
    model = _tiny_classifier(margin=0.02)
    to_tflite(model, "int8", calibration)
    low = to_tflite(model, "int8", calibration, sensitive_steps=0.01)
    kept = [int(n) for n in re.findall(r"kept (\d+) sensitive op", capsys.readouterr().out)]
    assert len(kept) == 2 and kept[1] > kept[0], kept
    interpreter = Interpreter(model_content=low)
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    stored = {op["outputs"][0]: tensors[op["inputs"][0]]["dtype"] for op in ops if op["op_name"] == "DEQUANTIZE"}
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert [tensors[op["outputs"][0]]["dtype"] for op in weighted] == [np.float32] * 3
    assert [stored.get(op["inputs"][1]) for op in weighted] == [None, None, np.int8]


def test_activation_bias_correction_takes_the_mean_error_off_every_layer():
    """Each weighted layer's output, per channel, averaged over images: plain int8 is off from float by the rounding's
    mean effect; after the correction (on other images) it is off by much less, on images it never saw too."""
    from quantize.convert import _channel_means, _integer_converter, activation_bias_corrected
    from quantize.tflite_internals import calibrate_only, graph_ops, quantize_calibrated

    calibration, unseen = _coloured_noise(200, seed=0), _coloured_noise(200, seed=1)
    calibrated = calibrate_only(_integer_converter(_tiny_classifier(margin=1.0), calibration))
    reference = quantize_calibrated(calibrated, [op.name for op in graph_ops(calibrated)])
    plain = quantize_calibrated(calibrated)
    corrected = activation_bias_corrected(plain, reference, calibration)

    def mean_error(flat: bytes) -> float:
        ops = [op for op in graph_ops(flat) if op.weighted]
        float_ops = [op for op in graph_ops(reference) if op.weighted]
        means, _ = _channel_means(flat, ops, unseen)
        float_means, _ = _channel_means(reference, float_ops, unseen)
        return float(np.mean([np.abs(means[a.name] - float_means[b.name]).mean() for a, b in zip(ops, float_ops)]))

    assert len([op for op in graph_ops(plain) if op.weighted]) == 3
    assert mean_error(corrected) < 0.5 * mean_error(plain)


def test_fitted_ranges_trade_a_few_far_values_for_finer_steps():
    """A tensor whose recorded range two far values set (as EfficientNet-Lite's projections' are), the rest
    heavy-tailed: its fitted range clips them and errs much less in all (mean square); values spread evenly keep
    their range; on a real calibrated graph every fitted range lies inside the recorded one (0 added)."""
    from quantize.convert import _integer_converter, _least_error_range, fitted_ranges
    from quantize.tflite_internals import calibrate_only, recorded_ranges

    def error(values, low, high):
        scale = (high - low) / 255
        zero_point = np.round(-low / scale)
        return np.mean(((np.clip(np.round(values / scale) + zero_point, 0, 255) - zero_point) * scale - values) ** 2)

    rng = np.random.default_rng(0)
    far = np.concatenate([rng.laplace(0, 1, 1_000_000), [-50.0, 55.0]])  # the far two: from one image in many
    low, high = _least_error_range(far, -50.0, 55.0)
    assert -50 < low < 0 < high < 20
    assert error(far, low, high) < 0.5 * error(far, -50.0, 55.0)
    assert _least_error_range(rng.uniform(0, 6, 100_000), 0.0, 6.0) == (0.0, 6.0)

    calibration = _coloured_noise(200, seed=0)
    calibrated = calibrate_only(_integer_converter(_tiny_classifier(margin=1.0), calibration))
    recorded, fitted = recorded_ranges(calibrated), recorded_ranges(fitted_ranges(calibrated, calibration[:32]))
    assert fitted.keys() == recorded.keys() and len(fitted) > 3
    for name, (low, high) in fitted.items():
        assert min(recorded[name][0], 0) <= low <= 0 <= high <= max(recorded[name][1], 0), name  # 0 is a level


def test_int8_that_keeps_floats_answers_is_converted_plainly(capsys):
    """Clear margins: plain int8 agrees with float on the calibration images, so nothing more is done (the check is
    all it costs) and every weighted op is integer but the convolution that reads the image and the last layer."""
    from ai_edge_litert.interpreter import Interpreter

    from quantize.convert import to_tflite, top1_agreement
    from quantize.tflite_internals import graph_ops

    calibration = _coloured_noise(200, seed=0)
    model = _tiny_classifier(margin=20.0)
    flat = to_tflite(model, "int8", calibration)
    assert "kept" not in capsys.readouterr().out
    interpreter = Interpreter(model_content=flat)
    types = {detail["name"]: detail["dtype"] for detail in interpreter.get_tensor_details()}
    weighted = [op.name for op in graph_ops(flat) if op.weighted]
    assert [types[name] for name in weighted] == [np.float32, np.int8, np.float32]
    assert top1_agreement(flat, model, calibration) >= 0.95
