"""A real two-node Slurm cluster on this machine for tests: slurmctld, and slurmd for nodes n1 (127.0.0.2) and n2
(127.0.0.3), with a munged of its own, each on its own free port, with two fake GPUs per node; its slurm.conf,
gres.conf, munge key and socket, state, spool, pid and log files all in a temporary folder. /etc/slurm, /etc/munge
and /run/munge are never read or touched; Debian's packages are installed with apt-get where slurmctld is missing.

In a test module:

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        with two_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster

What Slurm 22.05 (Debian 12) gives a process, measured on this cluster:
- Every task of `srun -N2 -n2` has SLURM_JOB_ID, SLURM_STEP_ID (and SLURM_STEPID) 0 for the first step,
  SLURM_PROCID 0/1, SLURM_LOCALID 0, SLURM_NODEID 0/1, SLURMD_NODENAME n1/n2, SLURM_STEP_NUM_TASKS=2,
  SLURM_STEP_NUM_NODES=2, SLURM_STEP_NODELIST=n[1-2], SLURM_STEP_TASKS_PER_NODE=1(x2) (and the job's
  SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_TASKS_PER_NODE); `srun -N1 -n2`: SLURM_PROCID 0/1, SLURM_LOCALID 0/1,
  SLURM_NODEID 0, SLURMD_NODENAME n1 for both, SLURM_STEP_NODELIST=n1, SLURM_STEP_TASKS_PER_NODE=2.
- A batch script itself (sbatch, outside srun) has SLURM_JOB_ID, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0,
  SLURMD_NODENAME of its first node, SLURM_NTASKS, SLURM_JOB_NODELIST, but no SLURM_STEP_ID, SLURM_STEPID,
  SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST or SLURM_STEP_TASKS_PER_NODE: SLURM_STEP_ID tells a task of a step
  from the batch script (SLURM_PROCID alone does not).
- `--gpus-per-task=1` sets CUDA_VISIBLE_DEVICES (and GPU_DEVICE_ORDINAL, SLURM_STEP_GPUS) to the task's own GPU,
  numbered from 0 on each node; `--gres=gpu:2` gives every task of the node both ("0,1"): then each task picks
  its own by SLURM_LOCALID.
- `scontrol requeue` of a running `sbatch --requeue` job: its tasks get SIGTERM and SIGCONT at once (the batch
  shell too), SIGKILL KillWait seconds later; once they are gone the job waits PENDING (Reason=BeginTime) until
  the old job credential expires, `AuthInfo=cred_expire` seconds later (120 by default, 10 here), and runs again
  with SLURM_RESTART_COUNT=1 in its environment (scontrol's Restarts=1): 11 s after the requeue here where the
  tasks exit on SIGTERM, 21 s where they ignore it. With `--open-mode=append` the output file is appended to.
  `scontrol requeue $SLURM_JOB_ID` from the batch script itself requeues the job the same way.
- `--signal=USR1@N` sends SIGUSR1 to every task (not the batch shell) N s before the time limit (3 s earlier
  here; Slurm's manual: up to 60 s earlier). With `srun --kill-on-bad-exit=1`, the first task to exit with a
  code other than 0 (75 too) makes srun SIGTERM the others at once, SIGKILL them KillWait seconds later.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODES = ("n1", "n2")
ADDRESSES = ("127.0.0.2", "127.0.0.3")
CPUS_PER_NODE = 2
GPUS_PER_NODE = 2
KILL_WAIT_S = 10
# Daemons by absolute path: /usr/sbin is not on every user's PATH.
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


@dataclass(frozen=True)
class SlurmCluster:
    folder: Path
    conf: Path
    nodes: tuple[str, ...]
    addresses: tuple[str, ...]
    gpus_per_node: int
    logs: tuple[Path, ...]  # slurmctld's, then each slurmd's, then munged's

    def env(self) -> dict[str, str]:
        """The current environment without any Slurm job's variables, with SLURM_CONF set to this cluster's and
        this repository's .venv/bin first on PATH: `pipeline` and `python` inside jobs are the project's."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SLURMD_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return env

    def run(self, *command: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Any Slurm client command (sinfo, scontrol, scancel...) against this cluster, output captured."""
        return subprocess.run(
            command, env=self.env(), cwd=cwd or self.folder, capture_output=True, text=True, timeout=timeout
        )

    def srun(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`srun ARGS` to the end, output captured (not checked: the test reads the return code)."""
        return self.run("srun", *args, timeout=timeout, cwd=cwd)

    def sbatch(self, script: Path, *options: str, script_args: Sequence[str] = (), cwd: Path | None = None) -> int:
        """Submits `sbatch OPTIONS SCRIPT SCRIPT_ARGS` and returns the job id. Without --output the job's output
        goes to slurm-JOBID.out in `cwd` (the cluster's folder by default)."""
        result = self.run("sbatch", "--parsable", *options, str(script), *script_args, cwd=cwd)
        if result.returncode != 0:
            raise AssertionError(f"sbatch {script} failed ({result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields (there is no slurmdbd, so no sacct); finished jobs stay MinJobAge."""
        result = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        if result.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def job_state(self, job_id: int) -> str:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED..."""
        return self.job(job_id)["JobState"]

    def wait_for_state(self, job_id: int, states: Iterable[str], timeout: float = 60) -> str:
        """Polls until the job is in one of `states` and returns it; AssertionError naming the last state after
        `timeout` seconds."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.time() + timeout
        while True:
            fields = self.job(job_id)
            if fields["JobState"] in wanted:
                return fields["JobState"]
            if time.time() > deadline:
                raise AssertionError(
                    f"job {job_id} is {fields['JobState']} (Reason={fields.get('Reason')}) after {timeout:g} s, "
                    f"not {'/'.join(sorted(wanted))}; slurmctld: {_tail(self.logs[0])}"
                )
            time.sleep(0.2)

    def requeue(self, job_id: int) -> None:
        """`scontrol requeue`: the running job's tasks get SIGTERM now and SIGKILL after KillWait; it runs again
        about cred_expire (10 s) after it ended."""
        result = self.run("scontrol", "requeue", str(job_id))
        if result.returncode != 0:
            raise AssertionError(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")

    def restart_count(self, job_id: int) -> int:
        """How often the job was requeued and started again (scontrol's Restarts=)."""
        return int(self.job(job_id)["Restarts"])

    def output(self, job_id: int) -> str:
        """The text of the job's stdout file so far ("" before it exists)."""
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def two_node_cluster(folder: Path) -> Iterator[SlurmCluster]:
    """Slurm with nodes n1 and n2 on this machine until the block ends, then every daemon and job process of it
    killed. pytest.skip where Slurm is missing and cannot be installed (not root)."""
    _install_slurm()
    folder.mkdir(parents=True, exist_ok=True)
    # slurmd's step sockets live in its spool folder: a unix socket's path must stay under 108 bytes.
    if len(str(folder)) > 70:
        raise RuntimeError(f"{folder}: too long a path for Slurm's sockets; use a shorter temporary folder")
    conf = folder / "slurm.conf"
    marker = f"SLURM_CONF={conf}".encode()  # every daemon and job process of this cluster has it in its environment
    daemon_env = dict(os.environ, SLURM_CONF=str(conf))
    munged = _start_munged(folder)
    try:
        fake_gpus = _fake_gpus(folder)
        _write_conf(folder, conf, fake_gpus)
        cluster = SlurmCluster(
            folder=folder,
            conf=conf,
            nodes=NODES,
            addresses=ADDRESSES,
            gpus_per_node=GPUS_PER_NODE,
            logs=(folder / "slurmctld.log", *(folder / f"slurmd.{node}.log" for node in NODES), folder / "munged.log"),
        )
        _start_daemon([SLURMCTLD, "-f", str(conf)], "slurmctld", folder, daemon_env)
        for node in NODES:
            _start_daemon([SLURMD, "-f", str(conf), "-N", node], f"slurmd.{node}", folder, daemon_env)
        _wait_until_idle(cluster)
        yield cluster
    finally:
        _stop(folder, marker, munged)


def _install_slurm() -> None:
    if all(os.path.exists(daemon) for daemon in (SLURMCTLD, SLURMD, MUNGED)) and shutil.which("srun"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{SLURMCTLD} is missing and cannot be installed here (needs root and apt-get)")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in ([*apt, "update", "-qq"], [*apt, "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-300:]}")


def _start_munged(folder: Path) -> subprocess.Popen:
    """munged with its own key, socket, pid, seed and log files in `folder`, in the foreground (-F), so that the
    fixture owns its process; --force: it runs as root and the folder's parents are not root's alone."""
    key = folder / "munge.key"
    key.write_bytes(os.urandom(128))  # what `mungekey` or `dd if=/dev/urandom` would write
    key.chmod(0o600)
    socket_path = folder / "munge.socket"
    log = folder / "munged.log"
    command = [
        MUNGED,
        "-F",
        "--force",
        f"--socket={socket_path}",
        f"--key-file={key}",
        f"--pid-file={folder / 'munged.pid'}",
        f"--seed-file={folder / 'munged.seed'}",
    ]
    with log.open("ab") as log_file:  # in the foreground munged logs to stderr, not to --log-file
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while not socket_path.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"munged did not create {socket_path} within 15 s: {_tail(log)}")
        time.sleep(0.05)
    return process


def _fake_gpus(folder: Path) -> dict[str, list[Path]]:
    """GPUS_PER_NODE device files per node for gres.conf's File=. slurmd refuses plain files ("is not a valid
    character or block device"); links to /dev/null are character devices that nothing opens."""
    devices: dict[str, list[Path]] = {}
    for node in NODES:
        (folder / "dev" / node).mkdir(parents=True, exist_ok=True)
        devices[node] = [folder / "dev" / node / f"nvidia{index}" for index in range(GPUS_PER_NODE)]
        for device in devices[node]:
            device.unlink(missing_ok=True)
            device.symlink_to("/dev/null")
    return devices


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_conf(folder: Path, conf: Path, fake_gpus: dict[str, list[Path]]) -> None:
    hostname = socket.gethostname()
    user = getpass.getuser()  # root in CI; the daemons run as whoever starts them
    for name in ("state", "spool"):
        (folder / name).mkdir(exist_ok=True)
    plugstack = folder / "plugstack.conf"  # empty: not Debian's /etc/slurm/plugstack.conf
    plugstack.touch()
    node_lines = [
        f"NodeName={node} NodeAddr={address} NodeHostname={hostname} Port={_free_port()} CPUs={CPUS_PER_NODE} "
        f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        for node, address in zip(NODES, ADDRESSES)
    ]
    conf.write_text(
        "\n".join(
            [
                "ClusterName=test",
                f"SlurmctldHost={hostname}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmUser={user}",
                f"SlurmdUser={user}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also holds a requeued job back (PENDING, Reason=BeginTime) until its old credential
                # expired: 120 s by default, 10 s here.
                f"AuthInfo=socket={folder / 'munge.socket'},cred_expire=10",
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool' / '%n'}",
                f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder / 'slurmd.%n.pid'}",
                f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'slurmd.%n.log'}",
                f"PlugStackConfig={plugstack}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "ReturnToService=2",
                f"KillWait={KILL_WAIT_S}",
                "JobRequeue=1",
                # The main scheduler every second (60 s by default): a requeued job starts as soon as it may.
                "SchedulerParameters=sched_interval=1",
                "MinJobAge=3600",  # finished jobs stay in `scontrol show job` for the tests to read
                "MailProg=/bin/true",
                "GresTypes=gpu",
                *node_lines,
                # FORCE:4: up to 4 jobs share a CPU without asking, so concurrent jobs do not wait for each other.
                f"PartitionName=main Nodes={','.join(NODES)} Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE "
                "State=UP",
                "",
            ]
        )
    )
    gres_lines = ["AutoDetect=off"]
    for node, devices in fake_gpus.items():
        gres_lines += [f"NodeName={node} Name=gpu File={device}" for device in devices]
    (folder / "gres.conf").write_text("\n".join(gres_lines) + "\n")  # read from slurm.conf's folder


def _start_daemon(command: list[str], name: str, folder: Path, env: dict[str, str]) -> None:
    """Starts a Slurm daemon, which forks into the background; what it says before it has its log file (a bad
    slurm.conf) goes to NAME.start."""
    start_log = folder / f"{name}.start"
    with start_log.open("wb") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, timeout=60)
    if result.returncode != 0:
        log = folder / f"{name}.log"
        raise RuntimeError(f"{name} did not start ({result.returncode}): {_tail(start_log)} {_tail(log)}")


def _wait_until_idle(cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    while time.time() < deadline:
        result = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t")
        states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
        if all(states.get(node) == "idle" for node in NODES):
            return
        time.sleep(0.2)
    logs = " || ".join(f"{log.name}: {_tail(log)}" for log in cluster.logs)
    raise RuntimeError(f"Slurm nodes not idle within {timeout:g} s ({states or 'sinfo: no answer'}): {logs}")


def _stop(folder: Path, marker: bytes, munged: subprocess.Popen) -> None:
    """SIGTERM to slurmctld and the slurmds, then SIGKILL to every process left with this cluster's SLURM_CONF in
    its environment (slurmstepd and job tasks outlive slurmd by design), then munged."""
    for pid_file in (folder / "slurmctld.pid", *(folder / f"slurmd.{node}.pid" for node in NODES)):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    left = _wait_for_exit(marker, timeout=3)  # the daemons save their state and go
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    left = _wait_for_exit(marker, timeout=5)
    munged.terminate()
    munged.wait(timeout=10)
    if left:
        raise RuntimeError(f"Slurm processes {left} still run after the cluster in {folder} stopped")


def _wait_for_exit(marker: bytes, timeout: float) -> list[int]:
    """The processes with `marker` in their environment left after at most `timeout` seconds."""
    deadline = time.time() + timeout
    while (left := _processes_with(marker)) and time.time() < deadline:
        time.sleep(0.1)
    return left


def _processes_with(marker: bytes) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(lines[-3:]) or "no log"
