"""Training: data sources, the config, the run directory and an exact resume (the data cache: test_cache.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.tensorflow_env import prepare
from serve.errors import PipelineError
from tests.conftest import PIPELINE, ROOT, SMALL_FMNIST, make_image_folder, run_pipeline
from train.data import DataError, load_dataset, stratified_sample, stratified_split


def folder_config(root, **changes) -> dict:
    return load_config(None, {"data": str(root), "input_size": 24, "channels": 3, **changes})


def test_stratified_split_is_seeded_and_keeps_class_shares():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, val = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(train, stratified_split(labels, 0.2, seed=7)[0])
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=8)[1])
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [20, 10, 6, 4]
    sample = stratified_sample(labels, 40, seed=1)
    assert np.bincount(labels[sample]).tolist() == [20, 10, 6, 4]


def test_image_folder_skips_corrupt_and_stray_files(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes", per_class=12)
    (root / "red_squares" / "notes.txt").write_text("not an image, ignored")
    (root / "green_discs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = load_dataset(folder_config(root))
    assert data.class_names == ["blue_stripes", "green_discs", "red_squares"]
    assert data.skipped == [str(root / "green_discs" / "broken.jpg")]
    assert f"{root / 'green_discs' / 'broken.jpg'}: skipped" in capsys.readouterr().err
    assert len(data.train_y) + len(data.val_y) == 36
    assert data.train_x.shape[1:] == (24, 24, 3) and data.train_x.dtype == np.uint8
    assert np.bincount(data.val_y).tolist() == [1, 1, 1]  # 10% of each class, at least one


def test_bad_data_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        load_dataset(folder_config(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_dataset(folder_config(tmp_path / "empty"))
    root = make_image_folder(tmp_path / "shapes", per_class=4)
    (root / "zebras").mkdir()
    (root / "zebras" / "readme.txt").write_text("no pictures yet")
    with pytest.raises(DataError, match="class 'zebras' has no images"):
        load_dataset(folder_config(root))
    # A class name becomes a line of every bundle's labels.txt: a line break would shift every label after it.
    root = make_image_folder(tmp_path / "broken_names", per_class=4)
    (root / "blue_stripes").rename(root / "blue\nstripes")
    with pytest.raises(DataError, match=r"'blue\\nstripes' has a line break in its name: rename it") as caught:
        load_dataset(folder_config(root))
    assert "\n" not in str(caught.value)


def test_config_layers_and_rejects_unknown_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmodel: mobilenet_v2\ninput_size: 64\n")
    config = load_config(path, {"epochs": 5})
    assert (config["epochs"], config["model"], config["batch_size"]) == (5, "mobilenet_v2", 128)
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        load_config(None, {"epoch": 3})
    with pytest.raises(ConfigError, match="channels"):
        load_config(None, {"channels": 2})
    path.write_text("epochs: [unclosed\n")
    with pytest.raises(ConfigError, match="not a readable YAML"):
        load_config(path)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "lost").mkdir()  # a run with results but no config.yaml: something to resume, and no settings
    (tmp_path / "lost" / "metrics.json").write_text("[]")
    for args, fragment in [
        (["train", "--data", str(tmp_path / "nowhere"), "--set", f"runs_dir={tmp_path}"], "no such data folder"),
        (["train", "--set", "epochs=zero"], "epochs='zero'"),
        (["train", "--config", str(tmp_path / "none.yaml")], "none.yaml: no such file"),
        (["quantize", str(tmp_path)], "not a run directory"),
        (["train", "--name", "lost", "--resume", "--set", f"runs_dir={tmp_path}"], "config.yaml"),
    ]:
        result = run_pipeline(*args, check=False)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr
        assert fragment in result.stderr.strip().splitlines()[-1], result.stderr


def test_run_directory_contract(fmnist_run):
    names = {p.name for p in fmnist_run.iterdir()}
    assert {
        "config.yaml",
        "data.json",
        "checkpoints",
        "best.keras",
        "metrics.csv",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
        "tensorboard",
        "summary.json",
    } <= names
    history = json.loads((fmnist_run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert (fmnist_run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,loss,accuracy")
    assert sorted(p.name for p in (fmnist_run / "checkpoints").iterdir()) == ["epoch_001", "epoch_002"]
    summary = json.loads((fmnist_run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert Image.open(fmnist_run / "curves.png").size[0] > 300
    assert any((fmnist_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_summary_holds_per_class_figures_of_the_best_model(fmnist_run):
    """summary.json's metrics: scikit-learn's classification_report of best.keras on the run's own splits."""
    from sklearn.metrics import classification_report as sklearn_report

    from train.rundir import RunDir

    prepare()
    import tf_keras as keras

    run = RunDir(fmnist_run)
    summary = run.read_summary()
    data = load_dataset(run.read_config(), train_in_memory=False)
    model = keras.models.load_model(run.best_model)
    assert set(summary.metrics) == {"val", "test"}
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
        predicted = np.argmax(model.predict(np.asarray(x[:]), verbose=0), axis=1)
        want = sklearn_report(y, predicted, output_dict=True, zero_division=0, labels=np.unique([*y, *predicted]))
        got = summary.metrics[split]
        assert got["accuracy"] == pytest.approx(np.mean(predicted == y))
        for index in np.unique([*y, *predicted]):
            figures = got["per_class"][data.class_names[index]]
            expected = want[str(index)]
            assert figures["support"] == expected["support"]
            for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
                assert figures[name] == pytest.approx(expected[key]), (split, index, name)
        assert got["macro"]["f1"] == pytest.approx(want["macro avg"]["f1-score"])
        assert got["weighted"]["recall"] == pytest.approx(want["weighted avg"]["recall"])
    assert summary.metrics["test"]["accuracy"] == pytest.approx(summary.test_accuracy)


def test_existing_run_is_not_overwritten(fmnist_run):
    before = (fmnist_run / "metrics.json").read_bytes()
    result = run_pipeline("train", "--name", "fmnist", "--set", f"runs_dir={fmnist_run.parent}", check=False)
    assert result.returncode == 1 and "--resume" in result.stderr
    assert (fmnist_run / "metrics.json").read_bytes() == before


def test_tensorflow_loads_without_its_cuda_plugin_lines_and_other_lines_still_pass():
    script = "from pipeline.tensorflow_env import prepare; prepare(); import os; os.write(2, b'E0000 other\\n')"
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "E0000 other\n", result.stderr


def test_private_keras_api_is_refused_on_an_unsupported_tf_keras(monkeypatch):
    prepare()  # before TensorFlow loads
    import tf_keras as keras

    from train.keras_internals import dropout_generators
    from train.models import build_model

    keras.backend.experimental.enable_tf_random_generator()  # as train() does, for this model only
    try:
        model = build_model("small_cnn", 28, 1, 10, 1.0, 0.3)
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    # On the installed tf_keras: one generator per dropout layer (small_cnn has two).
    assert len(dropout_generators(model)) == 2
    monkeypatch.setattr(keras, "__version__", "2.19.0")
    with pytest.raises(PipelineError, match=r"^tf_keras 2\.19\.0 is installed; .* supports tf_keras 2\.18\.x only"):
        dropout_generators(model)


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    common = [
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "max_images_per_class=400",
        "--epochs",
        "3",
        "--batch-size",
        "32",
    ]
    run_pipeline("train", "--name", "straight", *common)

    worker = subprocess.Popen(
        [*PIPELINE, "train", "--name", "killed", *common],
        cwd=ROOT,
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "killed" / "checkpoints" / "epoch_001"
    deadline = time.time() + 300
    while not first.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not (tmp_path / "killed" / "checkpoints" / "epoch_003").exists()

    run_pipeline("train", "--name", "killed", "--resume", "--set", f"runs_dir={tmp_path}")
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["epoch"], key)
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path):
    # A requeued job's one command line: the first try dies in epoch 1, before anything is saved.
    common = ["--name", "requeued", "--resume", "--set", f"runs_dir={tmp_path}", *SMALL_FMNIST]
    run = tmp_path / "requeued"
    first = subprocess.Popen(
        [*PIPELINE, "train", *common, "--set", "seed=7"],
        cwd=ROOT,
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "data.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # data.json is written just before the first epoch
    first.send_signal(signal.SIGKILL)
    _, stderr = first.communicate()
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert f"{run}: nothing to resume yet, starting it" in stderr
    assert not (run / "checkpoints").exists() and "seed: 7" in (run / "config.yaml").read_text()

    # The same command again starts it over with its own settings (seed 7 is no change to refuse) and finishes.
    result = run_pipeline("train", *common)
    assert f"{run}: nothing to resume yet, starting it" in result.stderr.splitlines()
    assert "seed: 42" in (run / "config.yaml").read_text()
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [1, 2]

    # Once there is a checkpoint, the same command line continues the run.
    result = run_pipeline("train", *common, "--epochs", "3")
    assert "nothing to resume" not in result.stderr and f"resuming {run} after epoch 2" in result.stderr
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [1, 2, 3]


class ViewWithoutArray:
    """uint8 images behind only the interface of the data cache's views (len, shape, dtype, indexing, subset): no
    __array__, no astype. Logs how many images each read returns, so that a consumer converting or copying a whole
    split shows as one read of all of it, or as more images read than it uses."""

    def __init__(self, images: np.ndarray) -> None:
        self._images, self.shape, self.dtype = images, images.shape, images.dtype
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, key) -> np.ndarray:
        images = self._images[key]
        self.reads.append(1 if images.ndim == 3 else len(images))
        return images

    def subset(self, indices: np.ndarray) -> ViewWithoutArray:
        return ViewWithoutArray(self._images[indices])


def test_training_and_evaluation_read_a_split_batch_by_batch():
    prepare()
    import tf_keras as keras

    from train.batches import epoch_indices, eval_batches, train_batches
    from train.data import Dataset
    from train.run import _class_model, _predicted_classes

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 400)
    train, val = ViewWithoutArray(images[:100]), ViewWithoutArray(images[100:])
    data = Dataset(list("abcd"), train, labels[:100], val, labels[100:], None, None, "", "random")

    batches = list(train_batches(data, {"batch_size": 16, "seed": 3, "augment": False, "epochs": 2}, 0))
    order = np.concatenate([epoch_indices(100, 3, epoch, 0, 1).numpy() for epoch in (0, 1)])
    assert np.array_equal(np.concatenate([x for x, _ in batches]), images[order])
    assert np.array_equal(np.concatenate([y for _, y in batches]), np.eye(4)[labels[order]])
    assert max(train.reads) == 16 and sum(train.reads) == 200

    batches = list(eval_batches(val, labels[100:], 4, 32))
    assert np.array_equal(np.concatenate([x for x, _ in batches]), images[100:])
    assert np.array_equal(np.concatenate([y for _, y in batches]), np.eye(4)[labels[100:]])
    assert max(val.reads) == 32 and sum(val.reads) == 300

    val.reads.clear()
    dense = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed=0))
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), dense])
    expected = model.predict(images[100:].astype(np.float32), verbose=0).argmax(axis=1)
    assert len(set(expected)) > 1  # a model that always answered the same class would hide a misordered read
    assert np.array_equal(_predicted_classes(_class_model(model), val), expected)
    assert max(val.reads) == 256 and sum(val.reads) == 300


def checkpoint_weights(run, epoch: int) -> list[np.ndarray]:
    """The model weights of a run's checkpoint of `epoch`, read into a new small_cnn."""
    import tensorflow as tf

    from train.models import build_model

    model = build_model("small_cnn", 28, 1, 10, 1.0, 0.3)
    tf.train.Checkpoint(model=model).read(str(run / "checkpoints" / f"epoch_{epoch:03d}" / "ckpt")).expect_partial()
    return model.get_weights()


def test_best_model_is_the_best_epoch_when_a_later_one_is_worse(tmp_path):
    """best.keras is written when training ends, from the best epoch's checkpoint, which is kept for it however
    many newer ones there are."""
    prepare()
    import tf_keras as keras

    tiny = ["--name", "best", "--set", f"runs_dir={tmp_path}", "--set", "max_images_per_class=40"]
    run_pipeline("train", *tiny, "--epochs", "2", "--batch-size", "16", "--set", "keep_checkpoints=1")
    run = tmp_path / "best"
    # A third epoch at a rate that wrecks the weights: worse than epoch 2.
    run_pipeline(
        "train",
        "--name",
        "best",
        "--set",
        f"runs_dir={tmp_path}",
        "--resume",
        "--epochs",
        "3",
        "--set",
        "learning_rate=1000",  # an int in YAML: read as a float
    )
    history = json.loads((run / "metrics.json").read_text())
    assert history[2]["val_accuracy"] < history[1]["val_accuracy"], history
    best_epoch = 1 + max(range(3), key=lambda i: (history[i]["val_accuracy"], -i))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted({f"epoch_{best_epoch:03d}", "epoch_003"})

    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == best_epoch
    assert set(summary["seconds"]) == {"data", "setup", "training", "bookkeeping", "evaluation"}
    best = keras.models.load_model(run / "best.keras", compile=False).get_weights()
    for saved, expected in zip(best, checkpoint_weights(run, best_epoch), strict=True):
        assert np.array_equal(saved, expected)
    assert not all(np.array_equal(a, b) for a, b in zip(best, checkpoint_weights(run, 3)))


@pytest.mark.slow
def test_interrupted_run_still_draws_its_curves(tmp_path):
    args = ["--name", "stopped", "--set", f"runs_dir={tmp_path}", "--set", "max_images_per_class=400"]
    worker = subprocess.Popen(
        [*PIPELINE, "train", *args, "--epochs", "20", "--batch-size", "32"],
        cwd=ROOT,
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = tmp_path / "stopped" / "checkpoints" / "epoch_001"
    deadline = time.time() + 300
    while not first.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGINT)
    _, errors = worker.communicate(timeout=120)
    assert worker.returncode == 130, errors
    assert errors.strip().splitlines()[-1] == "Aborted." and "Traceback" not in errors
    run = tmp_path / "stopped"
    assert not (run / "summary.json").exists()  # stopped in training, not after it
    assert Image.open(run / "curves.png").size[0] > 300


def test_training_without_tensorflow_names_the_extra_to_install(tmp_path):
    # A TensorFlow that cannot be imported, first on the path: as on a machine with the serving install alone.
    missing = tmp_path / "site" / "tensorflow"
    missing.mkdir(parents=True)
    refusal = "raise ModuleNotFoundError(\"No module named 'tensorflow'\", name='tensorflow')\n"
    (missing / "__init__.py").write_text(refusal)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    command = [*PIPELINE, "train", "--set", f"runs_dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: tensorflow is not installed: training and quantising need the train extra (pip install "
        "'edge-pipeline[train]', or `make setup` in the repository); labelling and serving do not\n"
    )
