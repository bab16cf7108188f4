"""Training under Slurm on a real two-node cluster on this machine (tests/slurm.py): `srun pipeline train` makes every
task a Horovod worker and equals `pipeline train --workers 2`; the example job script, requeued in the middle of an
epoch, resumes inside it and ends as an uninterrupted run; a killed task is named, and the requeued job resumes from
the last periodic checkpoint; a rendezvous that never completes names the ranks missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_pipeline
from tests.slurm import two_node_cluster

# 3,600 training images: 57 steps of 2 x 32 per epoch, ~4 s an epoch here. Interrupted in epoch 2, the last:
# test_preemption.py checks the epochs after a resumed one.
SETTINGS = ["--set", "max_images_per_class=400", "--epochs", "2", "--batch-size", "32"]
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
EXAMPLE = ROOT / "examples" / "slurm" / "multi_node.sbatch"
# The example asks for 2 nodes of 4 tasks and 4 GPUs; this cluster has 2 CPUs and 2 fake GPUs a node.
SMALLER = ["--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1", "--time=00:10:00"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    """The same training as `pipeline train --workers 2`, uninterrupted: what every Slurm run here must equal."""
    runs = tmp_path_factory.mktemp("runs")
    run_pipeline("train", "--workers", "2", "--name", "workers", "--set", f"runs_dir={runs}", *SETTINGS)
    return runs / "workers"


def assert_same_run(run: Path, reference: Path) -> None:
    history = json.loads((run / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    for a, b in zip(expected, history):
        for key in METRICS:
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
    checksums = json.loads((run / "summary.json").read_text())["rank_weight_checksums"]
    assert checksums == json.loads((reference / "summary.json").read_text())["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)


def inside_epoch(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("epoch_*_batch_*"))


def submit(cluster, tmp_path: Path, name: str, *extra: str) -> tuple[int, Path]:
    """The example job script on both nodes, one task each, training runs/<name> under tmp_path."""
    out = tmp_path / f"{name}.out"
    job = cluster.sbatch(
        EXAMPLE,
        *SMALLER,
        f"--output={out}",
        f"--export=ALL,RUN_NAME={name}",
        script_args=["--set", f"runs_dir={tmp_path}", *SETTINGS, *extra],
        cwd=ROOT,
    )
    return job, out


@pytest.mark.slow
def test_srun_makes_every_task_a_worker_and_equals_workers_2(cluster, tmp_path, two_workers):
    train = ["pipeline", "train", "--name", "srun", "--set", f"runs_dir={tmp_path}", *SETTINGS]
    result = cluster.srun("-N2", "-n2", *train)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(tmp_path / "srun", two_workers)
    assert result.stdout.count("best epoch") == 1  # rank 0 alone reports

    # More tasks than training images: one line, before any collective.
    folder = tmp_path / "two_images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        (folder / label / "1.png").write_bytes((ROOT / "tests" / "data" / "chelsea.png").read_bytes())
    tiny = ["--data", str(folder), "--set", "val_fraction=0.5", "--set", "channels=3", "--set", "input_size=16"]
    result = cluster.srun("-N2", "-n4", "pipeline", "train", "--name", "tiny", "--set", f"runs_dir={tmp_path}", *tiny)
    assert result.returncode == 1
    assert f"Error: {folder}: 2 training images for 4 workers, who need one each at least" in result.stderr


@pytest.mark.slow
def test_a_rendezvous_that_never_completes_names_the_ranks_missing(cluster, tmp_path):
    train = f"pipeline train --name lonely --set runs_dir={tmp_path} --worker-timeout 5"
    # Task 1 never joins: rank 0 gives up after the timeout and says which ranks did not come.
    script = f'if [ "$SLURM_PROCID" = 0 ]; then exec {train}; else sleep 20; fi'
    result = cluster.srun("-N2", "-n2", "bash", "-c", script, timeout=120)
    assert result.returncode != 0
    assert "incomplete after the timeout: 1 of 2 ranks never came (ranks 1)" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_requeued_job_resumes_inside_its_epoch_and_ends_as_an_uninterrupted_run(cluster, tmp_path, two_workers):
    job, out = submit(cluster, tmp_path, "requeued")
    run = tmp_path / "requeued"
    wait_for(lambda: (run / "checkpoints" / "epoch_001").is_dir(), "epoch 1's checkpoint")
    time.sleep(1.0)  # into epoch 2
    cluster.requeue(job)
    wait_for(lambda: cluster.restart_count(job) == 1, "the requeue")
    cluster.wait_for_state(job, {"COMPLETED", "FAILED"}, timeout=300)
    text = out.read_text()
    assert cluster.job_state(job) == "COMPLETED", text
    stopped = [line for line in text.splitlines() if line.startswith(f"{run}: SIGTERM")]
    assert len(stopped) == 1 and "every worker stopped at epoch 2 batch " in stopped[0], text
    batch = int(stopped[0].split("stopped at epoch 2 batch ")[1].split(",")[0])
    assert batch % 10 == 0  # the workers agree every 10 batches
    # What was lost: nothing trained -- the batches after the signal are in the checkpoint too -- and the time
    # the checkpoint took, which the line prints.
    assert " s after the signal" in stopped[0]
    assert f"resuming {run} inside epoch 2, after batch {batch}" in text, text
    assert_same_run(run, two_workers)


@pytest.mark.slow
def test_a_killed_task_is_named_and_the_requeued_job_resumes_from_the_periodic_checkpoint(
    cluster, tmp_path, two_workers
):
    job, out = submit(cluster, tmp_path, "killed", "--set", "checkpoint_minutes=0.005")
    run = tmp_path / "killed"
    wait_for(lambda: any(name.startswith("epoch_002_") for name in inside_epoch(run)), "a checkpoint in epoch 2")
    pid = task_pid(rank=1, marker="killed")
    os.kill(pid, signal.SIGKILL)
    cluster.wait_for_state(job, {"FAILED", "COMPLETED"}, timeout=120)
    text = out.read_text()
    assert "srun: error: n2: task 1: Killed" in text, text
    saved = inside_epoch(run)[-1]
    batch = int(saved.rpartition("_")[2])

    cluster.requeue(job)
    wait_for(lambda: cluster.restart_count(job) == 1, "the requeue")
    cluster.wait_for_state(job, {"COMPLETED", "FAILED"}, timeout=300)
    text = out.read_text()
    assert cluster.job_state(job) == "COMPLETED", text
    assert f"resuming {run} inside epoch 2, after batch {batch}" in text, text
    assert_same_run(run, two_workers)


def task_pid(rank: int, marker: str, timeout: float = 60) -> int:
    """The pid of the `pipeline train` task with this Slurm rank whose command line holds `marker`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_PROCID={rank}".encode() in environ and b"train" in cmdline and marker.encode() in cmdline:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no task of rank {rank} running {marker}")


def test_the_docs_show_the_multi_node_script_as_it_is():
    clusters = (ROOT / "docs" / "clusters.md").read_text()
    assert f"```bash\n{EXAMPLE.read_text()}```" in clusters


@pytest.mark.slow
def test_without_kill_on_bad_exit_the_survivor_says_it_lost_a_task(cluster, tmp_path):
    train = ["pipeline", "train", "--name", "orphan", "--set", f"runs_dir={tmp_path}", *SETTINGS]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    srun = subprocess.Popen(["srun", "-N2", "-n2", *train], env=cluster.env(), **pipes)
    wait_for(lambda: (tmp_path / "orphan" / "checkpoints" / "epoch_001").is_dir(), "epoch 1's checkpoint")
    os.kill(task_pid(rank=1, marker="orphan"), signal.SIGKILL)
    _, stderr = srun.communicate(timeout=300)
    assert "srun: error: n2: task 1: Killed" in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 0 on n1: lost touch with another task of the job")
