"""Who started this process, read from its environment, and the timeouts every launcher gives Horovod. Imports only
os: the supervisor (train/launch.py) and the Slurm rendezvous (train/slurm.py) ask before TensorFlow loads, the
training loop (train/distributed.py) after."""

from __future__ import annotations

import os

# What each launcher puts in its workers' environment: horovodrun --gloo, then mpirun (Open MPI, MPICH, PMIx).
LAUNCHER_VARIABLES = ("HOROVOD_RANK", "HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# Seconds a stalled worker may hold up the others (`pipeline train --worker-timeout`).
DEFAULT_WORKER_TIMEOUT = 120


def launcher_variable() -> str | None:
    """The variable by which a launcher (horovodrun or mpirun) marked this process as one worker of a job;
    None for a process alone."""
    return next((name for name in LAUNCHER_VARIABLES if name in os.environ), None)


def in_slurm_step() -> bool:
    """Whether this process is one task of a srun job step of several tasks. (The batch script itself, and
    `srun -n1`, are not: they train alone; a task horovodrun or mpirun started belongs to their job.)"""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    return "SLURM_STEP_ID" in os.environ and tasks.isdigit() and int(tasks) > 1 and launcher_variable() is None


def horovod_timeouts(worker_timeout: int) -> dict[str, str]:
    """Horovod's stall check and Gloo's timeout for a job whose stalled worker may hold up the others
    `worker_timeout` seconds. Gloo's is a backstop, 30 s later: a frozen worker also blocks Gloo, whose timeout
    would end the job naming no rank, so the supervisor's heartbeat watch (or Horovod's stall check) acts first."""
    return {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(min(worker_timeout, 60)),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(worker_timeout),
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(worker_timeout + 30),
    }
