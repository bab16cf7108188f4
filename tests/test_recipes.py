"""Training recipes: augmentation presets (none, basic, strong with RandAugment, erasing, mixup and cutmix), weight EMA
and early stopping -- seeded, checked, and resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.tensorflow_env import prepare
from tests.conftest import PIPELINE, ROOT, run_pipeline
from tests.test_preemption import STOPPED, wait_for


def random_data(count: int = 96, size: int = 16, channels: int = 1):
    from train.data import Dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 4, count)
    return Dataset(list("abcd"), images, labels, images[:0], labels[:0], None, None, "", "random")


def epoch_of(data, batch_size: int = 32, epoch: int = 0, **settings) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of training batches, concatenated, with the images in index order (the epoch's order undone)."""
    prepare()
    from train.batches import epoch_batches, epoch_indices

    config = load_config(None, {"batch_size": batch_size, **settings})
    batches = list(epoch_batches(data, config, epoch))
    x, y = (np.concatenate([batch[i].numpy() for batch in batches]) for i in (0, 1))
    order = np.argsort(epoch_indices(len(data.train_y), config["seed"], epoch, 0, 1).numpy())
    return x[order], y[order]


STRONG = {"augment": "strong", "mixup_probability": 0.3, "cutmix_probability": 0.3}


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_is_seeded_per_image_keeps_shapes_and_ranges_and_mixes_labels_to_one(channels):
    data = random_data(channels=channels)
    plain, one_hot = epoch_of(data, augment="none")
    assert np.array_equal(plain, data.train_x.astype(np.float32)) and np.array_equal(one_hot.argmax(1), data.train_y)
    for settings in ({"augment": "basic"}, STRONG):
        x, y = epoch_of(data, **settings)
        assert x.shape == plain.shape and x.dtype == np.float32 and y.dtype == np.float32
        assert x.min() >= 0 and x.max() <= 255
        assert np.mean(np.any(x != plain, axis=(1, 2, 3))) > 0.9  # nearly every image changed
        # The same images however they are batched: seeded by (seed, epoch, image index), not by batch or step.
        again_x, again_y = epoch_of(data, batch_size=7, **settings)
        assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
        other_epoch, _ = epoch_of(data, epoch=1, **settings)
        assert not np.array_equal(x, other_epoch)
        assert np.allclose(y.sum(axis=1), 1.0, atol=1e-6) and y.min() >= 0
    # Mixing: soft labels, the image's own class keeping the larger share ... or the partner's, never a third one.
    soft = y.max(axis=1) < 1
    assert 0.3 < soft.mean() < 0.9
    assert np.all(np.count_nonzero(y, axis=1) <= 2)
    _, changed = epoch_of(data, **(STRONG | {"seed": 7}))
    assert not np.array_equal(changed, y)


def test_cutmix_labels_follow_the_pasted_area():
    data = random_data(count=64)
    x, y = epoch_of(data, augment="strong", mixup_probability=0.0, cutmix_probability=1.0, randaugment_ops=0)
    own = y[np.arange(len(y)), data.train_y]
    assert np.all((own > 0) & (own <= 1)) and np.mean(own < 1) > 0.5
    # A share of pixels is a multiple of one pixel's share (16 x 16 images).
    shares = (1 - y.max(axis=1)) * 256
    assert np.allclose(shares, np.round(shares), atol=1e-3)


def test_recipe_settings_are_checked_with_one_line_each():
    assert load_config(None, {"augment": True})["augment"] == "basic"  # configs from before the presets
    assert load_config(None, {"augment": False})["augment"] == "none"
    bad = {
        "augment": ("heavy", "augment='heavy': must be none, basic or strong"),
        "randaugment_ops": (11, "randaugment_ops=11: must be a number from 0 to 10"),
        "erase_probability": (1.5, "erase_probability=1.5: must be a number from 0 to 1"),
        "mixup_alpha": (0, "mixup_alpha=0: must be a number above 0, at most 100"),
        "ema_decay": (1.0, "ema_decay=1.0: must be in [0, 1) (0: off)"),
        "patience": (-1, "patience=-1: must be an integer from 0 (off) to 100000"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError) as error:
            load_config(None, {"augment": "strong", key: value})
        assert str(error.value) == message
    part = r"^mixup_probability=0\.5: is a part of augment: strong \(augment is basic\)$"
    with pytest.raises(ConfigError, match=part):
        load_config(None, {"augment": "basic", "mixup_probability": 0.5})
    with pytest.raises(ConfigError, match=r"^cutmix_probability=0\.6: with mixup_probability 0\.5: .* at most 1$"):
        load_config(None, {"augment": "strong", "mixup_probability": 0.5, "cutmix_probability": 0.6})


def test_early_stop_counts_from_the_history():
    prepare()
    from train.run import EarlyStop

    rows = [{"epoch": e, "val_accuracy": a} for e, a in enumerate([0.5, 0.7, 0.7, 0.6], start=1)]
    assert EarlyStop(3, rows).stopped == ""
    assert EarlyStop(0, rows).stopped == ""
    assert EarlyStop(2, rows).stopped == (
        "early stop at epoch 4: val_accuracy did not improve for 2 epochs, best 0.7000 at epoch 2"
    )


def two_tone_folder(root):
    """Dark and light 12x12 images: val_accuracy soon reaches a level it cannot beat (1 at most)."""
    rng = np.random.default_rng(0)
    for name, low in (("dark", 0), ("light", 200)):
        (root / name).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(low, low + 50, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_strong_recipe_with_ema_stops_early_and_a_resume_stops_again(tmp_path):
    data, runs = two_tone_folder(tmp_path / "tones"), tmp_path / "runs"
    args = ["--name", "tones", "--data", str(data), "--set", f"runs_dir={runs}", "--batch-size", "8"]
    recipe = ["--set", "augment=strong", "--set", "ema_decay=0.9", "--set", "learning_rate=0.01"]
    recipe += ["--set", "input_size=12", "--set", "val_fraction=0.25", "--set", "patience=1"]
    result = run_pipeline("train", *args, *recipe, "--epochs", "6")
    history = json.loads((runs / "tones" / "metrics.json").read_text())
    best = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -i))
    assert len(history) == best + 2 < 6  # the first epoch not better than the best one before
    top = history[best]["val_accuracy"]
    said = (
        f"early stop at epoch {best + 2}: val_accuracy did not improve for 1 epochs, best {top:.4f} at epoch {best + 1}"
    )
    assert said in result.stdout.splitlines()
    summary = json.loads((runs / "tones" / "summary.json").read_text())
    assert summary["best_epoch"] == best + 1 and summary["val_accuracy"] == pytest.approx(top)

    again = run_pipeline("train", *args, "--resume", "--epochs", "6")
    assert said in again.stdout.splitlines() and "Epoch" not in again.stdout
    assert json.loads((runs / "tones" / "metrics.json").read_text()) == history


def test_best_model_is_the_weight_average_saved_in_the_checkpoint(tmp_path):
    prepare()
    import tensorflow as tf
    import tf_keras as keras

    from tests.test_train import checkpoint_weights
    from train.models import build_model

    run = tmp_path / "ema"
    args = ["--name", "ema", "--set", f"runs_dir={tmp_path}", "--set", "max_images_per_class=30"]
    run_pipeline("train", *args, "--epochs", "1", "--batch-size", "32", "--set", "ema_decay=0.99")
    best = keras.models.load_model(run / "best.keras", compile=False).get_weights()
    average = build_model("small_cnn", 28, 1, 10, 1.0, 0.3)
    tf.train.Checkpoint(ema=average).read(str(run / "checkpoints" / "epoch_001" / "ckpt")).expect_partial()
    for saved, expected in zip(best, average.get_weights(), strict=True):
        assert np.array_equal(saved, expected)
    # ... which is not the trained weights (the checkpoint's model), though it follows them.
    assert not all(np.array_equal(a, b) for a, b in zip(best, checkpoint_weights(run, 1)))


@pytest.mark.slow
def test_a_run_with_strong_augment_and_ema_stopped_inside_an_epoch_resumes_exactly(tmp_path):
    settings = ["--set", "max_images_per_class=100", "--epochs", "3", "--batch-size", "16", "--set", "ema_decay=0.95"]
    settings += ["--set", "augment=strong", "--set", f"runs_dir={tmp_path}"]
    run_pipeline("train", "--name", "straight", *settings)
    command = [*PIPELINE, "train", "--name", "stopped", *settings]
    first = subprocess.Popen(command, cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (tmp_path / "stopped" / "checkpoints" / "epoch_001").is_dir(), first)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == STOPPED
    assert list((tmp_path / "stopped" / "checkpoints").glob("epoch_*_batch_*"))  # stopped inside an epoch
    run_pipeline("train", "--name", "stopped", "--resume", "--set", f"runs_dir={tmp_path}")
    straight, resumed = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("straight", "stopped"))
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == b[key], (a["epoch"], key)
    for name in ("straight", "stopped"):
        assert (tmp_path / name / "best.keras").is_file()
    best = [json.loads((tmp_path / n / "summary.json").read_text())["val_accuracy"] for n in ("straight", "stopped")]
    assert best[0] == best[1]


@pytest.mark.slow
def test_weight_ema_in_an_elastic_job_is_one_line_error(tmp_path):
    from tests.test_elastic import elastic_train_args

    result = run_pipeline(*elastic_train_args(tmp_path, "ema"), "--set", "ema_decay=0.99", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: ema_decay=0.99: weight EMA is not supported in an elastic job (its rollbacks restore the weights, not "
        "their average); set ema_decay=0 or train with a fixed number of workers"
    )
    assert not (tmp_path / "ema").exists()
