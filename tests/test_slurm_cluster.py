"""The Slurm test cluster itself (tests/slurm.py) and the sbatch examples (examples/slurm/) on it: what srun and
sbatch give each process, the fake GPUs, and the examples' requeue on exit code 75."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm import SlurmCluster, two_node_cluster

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "slurm"
STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")
# The examples' shapes (4 GPUs per node, 8 CPUs per task) made to fit the test nodes (2 fake GPUs, 2 CPUs each).
TEST_SIZES = {
    "one_node.sbatch": ["--ntasks=2", "--cpus-per-task=1"],
    "multi_node.sbatch": ["--ntasks-per-node=2", "--gres=gpu:2", "--cpus-per-task=1"],
}


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
    # Both on one node; which one is the scheduler's choice (n1 may still be completing the previous step's job).
    assert len({tasks[t]["SLURMD_NODENAME"] for t in (0, 1)}) == 1
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
    # RUNNING comes before the batch script starts: a requeue before its first line would leave no "run 0".
    deadline = time.time() + 30
    while "run 0" not in cluster.output(job_id):
        assert time.time() < deadline, f"job {job_id} printed nothing 30 s after it started: {cluster.job(job_id)}"
        time.sleep(0.1)
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


@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_example_scripts_parse_and_sbatch_accepts_them(cluster, name):
    script = EXAMPLES / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = cluster.run("sbatch", "--test-only", *TEST_SIZES[name], str(script))
    # --test-only answers on stderr: "sbatch: Job 3 to start at ... using 2 processors on nodes n1 in partition main"
    assert re.search(r"Job \d+ to start at", result.stderr), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_example_requeues_itself_on_exit_code_75(cluster, tmp_path, name):
    """A stand-in `pipeline` first on PATH exits 75 (stopped, checkpoint written) on the job's first run and 0 on
    its second: the script requeues the job, which runs again and completes, appending to the same output."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "pipeline").write_text(
        "#!/bin/bash\n"
        'echo "pipeline $* task=$SLURM_PROCID run=${SLURM_RESTART_COUNT:-0} cpus=${SLURM_CPUS_PER_TASK:-unset}"\n'
        'if [ -z "$SLURM_RESTART_COUNT" ]; then exit 75; fi\n'
    )
    (fake_bin / "pipeline").chmod(0o755)
    path = f"{fake_bin}:{cluster.env()['PATH']}"
    job_id = cluster.sbatch(
        EXAMPLES / name,
        *TEST_SIZES[name],
        "--job-name=requeue_test",
        f"--export=ALL,PATH={path},CONFIG=small",
        f"--output={tmp_path / '%x-%j.out'}",
        script_args=["--epochs", "2"],
        cwd=tmp_path,
    )
    assert cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=90) == "COMPLETED"
    assert cluster.restart_count(job_id) == 1
    output = cluster.output(job_id)
    assert Path(cluster.job(job_id)["StdOut"]) == tmp_path / f"requeue_test-{job_id}.out"
    lines = [line for line in output.splitlines() if line.startswith("pipeline ")]
    tasks = 2 if name == "one_node.sbatch" else 4
    assert len(lines) == 2 * tasks, output
    assert set(lines) >= {
        f"pipeline train --config small --name requeue_test --resume --epochs 2 task=0 run={run} cpus=1"
        for run in (0, 1)
    }, output
