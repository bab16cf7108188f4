"""Preemption without loss, one process: SIGTERM or SIGUSR1 stops training at a batch with a checkpoint inside the
epoch (exit code 75), a periodic checkpoint bounds what a SIGKILL costs, and `--resume` continues inside the epoch
exactly: the resumed run's metrics equal an uninterrupted one's. (Several workers, under Slurm: test_slurm.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PIPELINE, ROOT, run_pipeline

# 3,600 training images in 113 batches of 32 per epoch: a signal lands well inside epoch 2.
SETTINGS = ["--set", "max_images_per_class=400", "--epochs", "3", "--batch-size", "32"]
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
STOPPED = 75


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    runs = tmp_path_factory.mktemp("straight")
    run_pipeline("train", "--name", "straight", "--set", f"runs_dir={runs}", *SETTINGS)
    return json.loads((runs / "straight" / "metrics.json").read_text())


def start(runs: Path, name: str, *extra: str) -> subprocess.Popen:
    command = [*PIPELINE, "train", "--name", name, "--resume", "--set", f"runs_dir={runs}", *SETTINGS, *extra]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.Popen(command, cwd=ROOT, env=os.environ, **pipes)


def wait_for(path_exists, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path_exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"


def inside_epoch(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("epoch_*_batch_*"))


def assert_same_metrics(resumed: list[dict], straight: list[dict]) -> None:
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in METRICS:
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])  # exact: the same batches, in the same order


def stop_inside_epoch_2(runs: Path, name: str, stop_signal: signal.Signals) -> int:
    """Start a run, send `stop_signal` in its epoch 2, check how it stopped; the batch it stopped after."""
    run = runs / name
    first = start(runs, name)
    wait_for(lambda: (run / "checkpoints" / "epoch_001").is_dir(), first)
    time.sleep(0.5)  # into epoch 2
    first.send_signal(stop_signal)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == STOPPED, stderr
    lines = [line for line in stderr.splitlines() if stop_signal.name in line]
    assert len(lines) == 1 and lines[0].startswith(f"{run}: {stop_signal.name} after batch "), stderr
    assert "stopped at epoch 2 batch " in lines[0] and "the same command with --resume continues it" in lines[0]
    assert "Error" not in stderr and "Traceback" not in stderr
    (saved,) = inside_epoch(run)
    batch = int(saved.rpartition("_")[2])
    assert saved == f"epoch_002_batch_{batch:06d}" and 0 < batch < 113
    assert f"stopped at epoch 2 batch {batch}," in lines[0]
    # The signal's batch or the next: one process alone agrees at every batch.
    said = int(lines[0].split(" after batch ")[1].split(":")[0])
    assert batch - said <= 1, lines[0]
    return batch


@pytest.mark.slow
def test_sigusr1_stops_as_sigterm_does(tmp_path):
    stop_inside_epoch_2(tmp_path, "usr1", signal.SIGUSR1)  # Slurm's --signal=USR1@120, before a time limit


@pytest.mark.slow
def test_a_signal_inside_an_epoch_saves_it_there_and_resume_continues_exactly(tmp_path, uninterrupted):
    run = tmp_path / "cut"
    batch = stop_inside_epoch_2(tmp_path, "cut", signal.SIGTERM)
    saved = inside_epoch(run)[0]

    # A damaged position.json is one line, and changes nothing.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / saved / "position.json").write_text("{")
    result = run_pipeline("train", "--name", "broken", "--resume", "--set", f"runs_dir={tmp_path}", check=False)
    assert result.returncode == 1 and result.stderr.startswith(f"Error: {broken}/checkpoints/{saved}/position.json:")
    assert len(result.stderr.splitlines()) == 1

    result = run_pipeline("train", "--name", "cut", "--resume", "--set", f"runs_dir={tmp_path}", *SETTINGS)
    assert f"resuming {run} inside epoch 2, after batch {batch}" in result.stderr
    assert_same_metrics(json.loads((run / "metrics.json").read_text()), uninterrupted)
    assert inside_epoch(run) == []  # epoch 2's end superseded it
    assert not [path.name for path in (run / "checkpoints").iterdir() if path.name.startswith(".")]


@pytest.mark.slow
def test_a_periodic_checkpoint_bounds_what_a_kill_costs(tmp_path, uninterrupted):
    run = tmp_path / "killed"
    # Every 0.3 s, past its first: a checkpoint inside the epoch every few batches.
    first = start(tmp_path, "killed", "--set", "checkpoint_minutes=0.005")
    wait_for(lambda: any(name.startswith("epoch_002_") for name in inside_epoch(run)), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = inside_epoch(run)[-1]  # the newest (a kill between its rename and the removal of the one before: two)
    batch = int(saved.rpartition("_")[2])

    result = run_pipeline("train", "--name", "killed", "--resume", "--set", f"runs_dir={tmp_path}", *SETTINGS)
    assert f"resuming {run} inside epoch 2, after batch {batch}" in result.stderr
    assert_same_metrics(json.loads((run / "metrics.json").read_text()), uninterrupted)


def test_checkpoint_minutes_is_checked(tmp_path):
    for value in ("-1", "nan", "true", "1e9"):
        result = run_pipeline(
            "train", "--set", f"runs_dir={tmp_path}", "--set", f"checkpoint_minutes={value}", check=False
        )
        assert result.returncode == 1
        assert result.stderr.startswith("Error: checkpoint_minutes=") and "from 0 (off) to 525600" in result.stderr


@pytest.mark.slow
def test_sigterm_to_the_workers_launcher_stops_both_workers_with_a_checkpoint(tmp_path):
    run = tmp_path / "pair"
    launcher = start(tmp_path, "pair", "--workers", "2")
    wait_for(lambda: (run / "checkpoints" / "epoch_001").is_dir(), launcher)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)  # passed on to the workers, not left to horovodrun's 5 s before SIGKILL
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == STOPPED, stderr
    (saved,) = inside_epoch(run)
    batch = int(saved.rpartition("_")[2])
    assert batch % 10 == 0  # two workers agree every 10 batches
    assert f"{run}: SIGTERM after batch " in stderr and f"every worker stopped at epoch 2 batch {batch}," in stderr
    result = run_pipeline("train", "--workers", "2", "--name", "pair", "--resume", "--set", f"runs_dir={tmp_path}")
    assert f"resuming {run} inside epoch 2, after batch {batch}" in result.stderr
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [1, 2, 3]
