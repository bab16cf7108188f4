"""Data-parallel training with Horovod: real 2-process Gloo jobs on localhost; one process alone without it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PIPELINE, ROOT, SMALL_FMNIST, run_pipeline, worker_pid

HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
# fp16 keeps 11 significant bits (relative error <= 2**-11 per gradient value); after 8 SGD steps at
# learning rate 0.1 the weights of the 2-worker fp16 job stay within this of the 1-process float32 job.
FP16_TOLERANCE = 2e-3


def equivalence_weights(tmp_path: Path, workers: int, batch_size: int, compression: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"w{workers}_{compression}.npz"
    script = [
        sys.executable,
        str(ROOT / "tests" / "hvd_equivalence.py"),
        str(out),
        "--batch-size",
        str(batch_size),
        "--compression",
        compression,
    ]
    if workers > 1:
        script = [HOROVODRUN, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo", *script]
    result = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(out) as npz:
        return {name: npz[name] for name in npz.files}


# On PYTHONPATH as sitecustomize.py: `import horovod` fails as if it were not installed, and every attempt is
# logged beside the file, so that one caught by a try/except still shows.
NO_HOROVOD = """\
import os
import sys


class NoHorovod:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "horovod":
            return None
        with open(os.path.join(os.path.dirname(__file__), "horovod_imports.txt"), "a") as log:
            log.write(name + "\\n")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoHorovod())
"""


def without_horovod(folder: Path) -> dict[str, str]:
    """An environment whose processes cannot import horovod; checked before it is handed out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NO_HOROVOD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import horovod"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'horovod'" in probe.stderr, probe.stderr
    (folder / "horovod_imports.txt").unlink()  # the probe was logged: the log works; start it empty
    return env


def horovod_imports(folder: Path) -> list[str]:
    log = folder / "horovod_imports.txt"
    return log.read_text().splitlines() if log.exists() else []


def test_one_process_training_needs_no_horovod(tmp_path):
    env = without_horovod(tmp_path / "site")
    tiny = ["--set", "max_images_per_class=20", "--epochs", "1", "--batch-size", "32"]
    command = [*PIPELINE, "train", "--name", "alone", "--set", f"runs_dir={tmp_path / 'runs'}", *tiny]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "runs" / "alone" / "summary.json").read_text())
    assert summary["workers"] == 1 and len(summary["rank_weight_checksums"]) == 1
    assert horovod_imports(tmp_path / "site") == []  # not even an attempt


def test_a_worker_without_horovod_is_a_one_line_error(tmp_path):
    env = dict(without_horovod(tmp_path / "site"), PMI_SIZE="2")  # as mpirun would start it
    command = [*PIPELINE, "train", "--name", "worker", "--set", f"runs_dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: PMI_SIZE is set: this process is one worker of a distributed job, but horovod")
    assert not (tmp_path / "runs" / "worker").exists()


def test_mpirun_with_a_horovod_built_without_mpi_is_refused(tmp_path):
    import horovod.tensorflow as hvd

    if hvd.mpi_built():
        pytest.skip("this Horovod was built with MPI: mpirun works")
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")  # as `mpirun -np 2` starts each copy
    command = [*PIPELINE, "train", "--name", "copy", "--set", f"runs_dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: launched by mpirun, but this Horovod was built without MPI: use `pipeline train --workers N` "
        "(Gloo), or rebuild Horovod with HOROVOD_WITH_MPI=1"
    )
    assert not (tmp_path / "runs" / "copy").exists()


def test_pretrained_run_directory_needs_no_horovod(tmp_path):
    env = without_horovod(tmp_path / "site")
    script = (
        "from pathlib import Path\n"
        "from pipeline.tensorflow_env import prepare\n"
        "prepare()\n"
        "from train.pretrained import create_run\n"
        "from train.rundir import RunDir\n"
        f"create_run(RunDir(Path({str(tmp_path / 'lite0')!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "lite0").iterdir()) == ["best.keras", "config.yaml", "summary.json"]
    assert horovod_imports(tmp_path / "site") == []


def test_workers_share_each_epoch_without_overlap():
    """Worker r of N takes every N-th image of the one-process order from the r-th: together, the epoch once."""
    import tensorflow as tf

    from train.batches import epoch_indices

    count, seed = 103, 7
    for epoch in (0, 1):
        alone = epoch_indices(count, seed, epoch, 0, 1).numpy()
        assert sorted(alone) == list(range(count))
        for workers in (2, 3):
            usable = count // workers * workers  # the rest sit the epoch out: every worker takes as many steps
            shards = [epoch_indices(count, seed, epoch, rank, workers).numpy() for rank in range(workers)]
            assert [len(shard) for shard in shards] == [count // workers] * workers
            together = np.concatenate(shards)
            assert len(np.unique(together)) == usable and set(together) == set(alone[:usable])
            for rank, shard in enumerate(shards):
                assert np.array_equal(shard, alone[:usable][rank::workers])
    assert not np.array_equal(epoch_indices(count, seed, 0, 0, 1), epoch_indices(count, seed, 1, 0, 1))
    # train_batches computes the order inside tf.data, from an int64 epoch: the same order as eagerly.
    traced = next(iter(tf.data.Dataset.range(1, 2).map(lambda epoch: epoch_indices(count, seed, epoch, 1, 2))))
    assert np.array_equal(traced, epoch_indices(count, seed, 1, 1, 2))


@pytest.mark.slow
def test_two_workers_equal_one_worker_with_twice_the_batch(tmp_path):
    alone = equivalence_weights(tmp_path, 1, 64, "none")
    finals = [name for name in alone if name.startswith("final_")]
    # Training must move the weights far beyond the tolerances, or agreeing within them would prove nothing:
    # a job whose steps did nothing would still end where the other started.
    moved = max(np.abs(alone[name] - alone[name.replace("final_", "initial_")]).max() for name in finals)
    assert moved > 10 * FP16_TOLERANCE, moved
    for compression, tolerance in (("none", 1e-5), ("fp16", FP16_TOLERANCE)):
        pair = equivalence_weights(tmp_path, 2, 32, compression)
        assert len(set(pair["checksums"])) == 1, "the two ranks ended with different weights"
        difference = max(np.abs(alone[name] - pair[name]).max() for name in finals)
        assert difference <= tolerance, (compression, difference)


@pytest.mark.slow
def test_pipeline_train_with_two_workers_then_quantize_label_and_resume_alone(tmp_path, fmnist_images):
    runs = tmp_path / "runs"
    # --resume with nothing to resume starts the run: rank 0 decides, under the lock, for both workers.
    pair = ["--workers", "2", "--name", "pair", "--resume", "--set", f"runs_dir={runs}", *SMALL_FMNIST]
    result = run_pipeline("train", *pair)
    assert "[rank 1]" not in result.stdout  # only rank 0 prints progress
    run = runs / "pair"
    assert result.stderr.count(f"{run}: nothing to resume yet, starting it") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["compression"] == "fp16"
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    history = json.loads((run / "metrics.json").read_text())
    parameters = 218_778 - 2 * (16 + 16 + 32 + 32)  # trainable: all but BatchNorm's moving statistics
    assert all(row["workers"] == 2 and row["images_per_second"] > 0 for row in history)
    assert history[0]["allreduce_bytes_per_step"] == 2 * parameters
    assert "fp16" in (run / "config.yaml").read_text()

    run_pipeline("quantize", str(run), "--calibration-images", "100")
    label = run_pipeline("label", str(fmnist_images[0]), "-m", str(run / "export" / "pair_int8.tflite"), "-k", "1")
    assert label.stdout.count("\n") == 1

    # The worker count may change between runs: resume the 2-worker run alone for one more epoch.
    run_pipeline("train", "--name", "pair", "--resume", "--epochs", "3", "--set", f"runs_dir={runs}")
    history = json.loads((run / "metrics.json").read_text())
    assert [(row["epoch"], row["workers"]) for row in history] == [(1, 2), (2, 2), (3, 1)]


@pytest.mark.slow
def test_a_dead_worker_stops_the_job_and_is_named(tmp_path):
    command = [
        *PIPELINE,
        "train",
        "--workers",
        "2",
        "--name",
        "doomed",
        "--epochs",
        "50",
        "--worker-timeout",
        "30",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "max_images_per_class=300",
    ]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until training is under way (the first checkpoint), then kill rank 1.
        first = tmp_path / "doomed" / "checkpoints" / "epoch_001"
        deadline = time.time() + 240
        while not first.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        pid = worker_pid(1, str(tmp_path), timeout=10)
        assert pid is not None and job.poll() is None, "the job did not get under way"
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert time.time() - killed < 60
    assert job.returncode == 1
    assert "Traceback" not in stderr
    assert (
        stderr.strip().splitlines()[-1] == "Error: worker rank 1 on localhost died (exit code 137, killed by SIGKILL); "
        "Horovod stopped the job"
    )
