"""Several machines: `pipeline train --workers` over ssh to two real sshd "hosts" (127.0.0.2 and 127.0.0.3, see
tests/sshd.py), and each way such a job can fail, named in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PIPELINE, ROOT
from tests.sshd import two_hosts

TINY = ["--set", "max_images_per_class=40", "--epochs", "2", "--batch-size", "32"]
# Jobs that are killed or stopped mid-training, never run to their end: epochs of about a second,
ENDLESS = ["--set", "max_images_per_class=100", "--epochs", "500", "--batch-size", "32"]
# or of about 10 s, in which rank 0 prints nothing: a worker that found out only when its output failed would go on.
SLOW_EPOCHS = ["--set", "max_images_per_class=600", "--epochs", "500", "--batch-size", "4"]
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    with two_hosts(tmp_path_factory.mktemp("sshd")) as hosts:
        yield hosts


def train_command(runs: Path, name: str, *args: str) -> list[str]:
    return [*PIPELINE, "train", "--name", name, "--set", f"runs_dir={runs}", *args]


def train(runs: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = train_command(runs, name, *args)
    return subprocess.run(command, cwd=ROOT, env=env or os.environ, capture_output=True, text=True, timeout=300)


def start_training(runs: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The job under way: started, and its first epoch checkpointed."""
    command = train_command(runs, name, *args)
    job = subprocess.Popen(command, cwd=ROOT, env=env or os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = runs / name / "checkpoints" / "epoch_001"
    deadline = time.time() + 120
    while not first.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not first.exists():
        job.kill()
        raise AssertionError(f"the job did not get under way: {job.communicate()[1].decode()[-2000:]}")
    return job


def processes(marker: str, rank: int | None = None) -> list[int]:
    """Pids of the processes whose command line holds `marker` (and, given a rank, that are that Horovod rank:
    the worker itself, not the ssh client in front of it, which has no HOROVOD_RANK)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and (rank is None or f"HOROVOD_RANK={rank}".encode() in environ):
            found.append(int(pid))
    return found


def worker(marker: str, rank: int) -> int:
    pids = processes(marker, rank)
    assert len(pids) == 1, pids
    return pids[0]


def kill_leftovers(marker: str) -> None:
    """After a failed test: no worker of its job may go on training (or stay stopped) behind it."""
    for pid in processes(marker):
        os.kill(pid, signal.SIGKILL)


def last_line(stderr: bytes) -> str:
    return stderr.decode().strip().splitlines()[-1]


def test_ssh_and_network_options_need_workers(tmp_path):
    for option in (["--ssh-port", "2222"], ["--network-interface", "eth0"]):
        result = train(tmp_path, "alone", *option)
        assert result.returncode == 2 and f"Error: {option[0]} needs --workers" in result.stderr
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hosts": "a:1"}, "--hosts needs --workers or --min-workers"),
        ({"ssh_identity_file": "key"}, "--ssh-identity-file needs --workers or --min-workers"),
        ({"workers": 2, "min_workers": 2, "hosts": "a:2"}, "--min-workers and --workers exclude each other"),
        ({"workers": 2, "max_workers": 3}, "--max-workers and --host-discovery-script need --min-workers"),
        ({"host_discovery_script": "hosts.sh"}, "--max-workers and --host-discovery-script need --min-workers"),
        ({"min_workers": 2}, "--min-workers needs --host-discovery-script or --hosts (two hosts or more)"),
        ({"min_workers": 3, "max_workers": 2, "hosts": "a:3"}, "--max-workers 2 is less than --min-workers 3"),
    ],
)
def test_launch_options_that_cannot_go_together_are_a_usage_error(options, message):
    from train.launch import LaunchOptions, LaunchOptionsError

    with pytest.raises(LaunchOptionsError) as refused:
        LaunchOptions(**options)
    assert str(refused.value).startswith(message) and refused.value.exit_code == 2


def test_hosts_whose_slots_do_not_add_up_to_the_workers_are_refused(tmp_path):
    result = train(tmp_path, "pair", "--workers", "2", "--hosts", "localhost:3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --hosts localhost:3 has 3 slots for 2 workers: give one slot per worker "
        "(horovodrun starts a worker in every slot)"
    )


def test_an_unreachable_host_is_named_with_ssh_own_message(tmp_path, ssh_hosts):
    hosts = f"{ssh_hosts.addresses[0]}:1,127.0.0.9:1"  # nothing listens on 127.0.0.9
    result = train(tmp_path, "pair", "--workers", "2", "--hosts", hosts, *ssh_hosts.ssh_options(), env=ssh_hosts.env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot reach 127.0.0.9 by ssh: ssh: connect to host 127.0.0.9 port {ssh_hosts.port}: "
        "Connection refused"
    )
    assert not (tmp_path / "pair").exists()


@pytest.mark.slow
def test_two_hosts_train_exactly_as_one_host(tmp_path, ssh_hosts):
    one = train(tmp_path, "one", "--workers", "2", *TINY)
    assert one.returncode == 0, one.stderr
    two_hosts = ["--workers", "2", "--hosts", ssh_hosts.hosts(), *ssh_hosts.ssh_options(), "--network-interface", "lo"]
    two = train(tmp_path, "two", *two_hosts, *TINY, env=ssh_hosts.env())
    assert two.returncode == 0, two.stderr
    for log in ssh_hosts.logs:  # the workers went through sshd, one to each host
        assert "Accepted publickey" in log.read_text()
    metrics = {
        name: [[row[key] for key in METRICS] for row in json.loads((tmp_path / name / "metrics.json").read_text())]
        for name in ("one", "two")
    }
    assert len(metrics["one"]) == 2 and metrics["one"] == metrics["two"]
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")}
    checksums = [summary["rank_weight_checksums"] for summary in summaries.values()]
    assert len(set(checksums[0])) == 1 and checksums[0] == checksums[1]


@pytest.mark.slow
def test_a_killed_remote_worker_is_named_lost(tmp_path, ssh_hosts):
    args = ["--workers", "2", "--hosts", ssh_hosts.hosts(), *ssh_hosts.ssh_options(), *ENDLESS]
    job = start_training(tmp_path, "lost", *args, env=ssh_hosts.env())
    try:
        os.kill(worker(str(tmp_path), 1), signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
        kill_leftovers(str(tmp_path))
    assert job.returncode == 1 and b"Traceback" not in stderr
    assert last_line(stderr) == (
        f"Error: worker rank 1 on {ssh_hosts.addresses[1]} lost (its ssh connection ended with 255: "
        "the worker or its host died)"
    )


@pytest.mark.slow
def test_a_stopped_worker_is_named_stalled_within_the_timeout(tmp_path):
    job = start_training(tmp_path, "stalled", "--workers", "2", "--worker-timeout", "10", *ENDLESS)
    try:
        os.kill(worker(str(tmp_path), 1), signal.SIGSTOP)
        stopped = time.time()
        _, stderr = job.communicate(timeout=60)
        took = time.time() - stopped
        left = processes(str(tmp_path))
    finally:
        job.kill()
        kill_leftovers(str(tmp_path))
    assert job.returncode == 1 and b"Traceback" not in stderr
    assert re.fullmatch(
        r"Error: worker rank 1 on localhost stalled for 1[0-2] s; the job was stopped", last_line(stderr)
    )
    # Found silent after 10-11 s; then horovodrun, told to stop, gives the stopped worker (which cannot end on
    # SIGTERM) and then its children 5 s each before it kills them.
    assert took < 10 + 15, took
    assert left == []


@pytest.mark.slow
def test_killing_the_launcher_ends_every_worker(tmp_path, ssh_hosts):
    # Both workers behind ssh, where horovodrun can end only the connection; killed in a quiet stretch.
    args = ["--workers", "2", "--hosts", ssh_hosts.hosts(), *ssh_hosts.ssh_options(), *SLOW_EPOCHS]
    command = train_command(tmp_path, "orphans", *args)
    job = subprocess.Popen(command, cwd=ROOT, env=ssh_hosts.env(), stdout=subprocess.PIPE, text=True)
    for line in job.stdout:
        if line.startswith("Epoch 2/"):  # Keras's line; the next comes at the end of the epoch
            break
    try:
        assert len(processes(str(tmp_path), 0)) == 1 and len(processes(str(tmp_path), 1)) == 1
        job.kill()  # kill -9: the launcher runs no clean-up code of its own
        job.wait()
        killed = time.time()
        while processes(str(tmp_path)) and time.time() < killed + 5:  # measured: 0.4 s
            time.sleep(0.2)
        left = processes(str(tmp_path))
    finally:
        job.kill()
        kill_leftovers(str(tmp_path))
    assert left == []
