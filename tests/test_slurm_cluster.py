"""The Slurm test cluster itself (tests/slurm.py): what srun and sbatch give each process, and the fake GPUs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm import SlurmCluster, two_node_cluster

ROOT = Path(__file__).resolve().parent.parent
STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    with two_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def task_variables(result: subprocess.CompletedProcess) -> dict[int, dict[str, str]]:
    """`srun -l env` output as {task number: {variable: value}}."""
    assert result.returncode == 0, result.stderr
    tasks: dict[int, dict[str, str]] = {}
    for line in result.stdout.splitlines():
        task, _, variable = line.partition(": ")
        name, _, value = variable.partition("=")
        tasks.setdefault(int(task), {})[name] = value
    return tasks


def test_srun_on_two_nodes_runs_one_task_on_each(cluster):
    tasks = task_variables(cluster.srun("-N2", "-n2", "-l", "env"))
    assert [(tasks[t]["SLURM_PROCID"], tasks[t]["SLURMD_NODENAME"]) for t in (0, 1)] == [("0", "n1"), ("1", "n2")]
    for variables in tasks.values():
        assert variables["SLURM_LOCALID"] == "0"
        assert variables["SLURM_STEP_NUM_TASKS"] == "2"
        assert variables["SLURM_STEP_NODELIST"] == "n[1-2]"
        assert variables["SLURM_STEP_TASKS_PER_NODE"] == "1(x2)"
        assert variables["PATH"].startswith(str(ROOT / ".venv" / "bin"))


def test_srun_on_one_node_numbers_its_tasks_locally(cluster):
    tasks = task_variables(cluster.srun("-N1", "-n2", "-l", "env"))
    assert [(tasks[t]["SLURM_PROCID"], tasks[t]["SLURM_LOCALID"]) for t in (0, 1)] == [("0", "0"), ("1", "1")]
    assert {tasks[t]["SLURMD_NODENAME"] for t in (0, 1)} == {"n1"}
    assert tasks[0]["SLURM_STEP_TASKS_PER_NODE"] == "2"


def test_fake_gpus_give_each_task_its_own_cuda_device(cluster):
    tasks = task_variables(cluster.srun("-N2", "-n4", "--gpus-per-task=1", "-l", "env"))
    devices = {(tasks[t]["SLURMD_NODENAME"], tasks[t]["CUDA_VISIBLE_DEVICES"]) for t in tasks}
    assert devices == {("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")}
    tasks = task_variables(cluster.srun("-N1", "-n2", f"--gres=gpu:{cluster.gpus_per_node}", "-l", "env"))
    assert {tasks[t]["CUDA_VISIBLE_DEVICES"] for t in tasks} == {"0,1"}  # each task takes its own by SLURM_LOCALID


@pytest.mark.slow
def test_batch_script_has_the_job_but_no_step(cluster, tmp_path):
    script = tmp_path / "env.sbatch"
    script.write_text("#!/bin/bash\nenv\n")
    job_id = cluster.sbatch(script, "-N2", "-n2", f"--output={tmp_path / 'env.out'}")
    assert cluster.wait_for_state(job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
    variables = dict(line.partition("=")[::2] for line in cluster.output(job_id).splitlines())
    assert variables["SLURM_JOB_ID"] == str(job_id)
    assert variables["SLURM_PROCID"] == "0"  # like rank 0 of a step: SLURM_PROCID does not tell them apart
    assert [name for name in STEP_VARIABLES if name in variables] == []


@pytest.mark.slow
def test_requeued_job_runs_again_within_seconds(cluster, tmp_path):
    """`scontrol requeue`: SIGTERM to the tasks, and the job runs again once cred_expire (10 s here) has passed."""
    script = tmp_path / "sleep.sbatch"
    script.write_text('#!/bin/bash\necho "run ${SLURM_RESTART_COUNT:-0}"\nsrun sleep 300\n')
    job_id = cluster.sbatch(script, "-N2", "-n2", "--requeue", "--open-mode=append", f"--output={tmp_path / 'out'}")
    cluster.wait_for_state(job_id, {"RUNNING"})
    cluster.requeue(job_id)
    deadline = time.time() + 30
    while cluster.restart_count(job_id) == 0 or cluster.job_state(job_id) != "RUNNING":
        assert time.time() < deadline, f"job {job_id} not running again 30 s after its requeue: {cluster.job(job_id)}"
        time.sleep(0.2)
    deadline = time.time() + 5
    while "run 1" not in cluster.output(job_id) and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.output(job_id).splitlines()[:1] == ["run 0"] and "run 1" in cluster.output(job_id)
    cluster.run("scancel", str(job_id))
    cluster.wait_for_state(job_id, {"CANCELLED"})
