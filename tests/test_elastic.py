"""Elastic training (Horovod Elastic): an epoch re-split after a change of size, a learning rate that follows the
worker count, the options, and a real job on localhost that loses a worker mid-epoch and goes on."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from tests.conftest import PIPELINE, ROOT, run_pipeline, worker_pid
from tests.sshd import two_hosts
from train.batches import epoch_indices, remaining_indices, resume_point


def test_an_epoch_resplit_after_a_change_of_size_trains_each_image_once():
    count, seed, epoch, batch_size = 1000, 7, 3, 16
    order = epoch_indices(count, seed, epoch, 0, 1).numpy()
    for before, after, batches in ((2, 1, 5), (2, 3, 7), (3, 2, 0), (1, 2, 20), (4, 4, 3)):
        trained = np.concatenate(
            [epoch_indices(count, seed, epoch, rank, before)[: batches * batch_size] for rank in range(before)]
        )
        done = batches * batch_size * before
        # What `before` workers trained in their first batches is the start of the epoch's order...
        assert len(trained) == done and set(trained) == set(order[:done])
        rest = np.concatenate([remaining_indices(count, seed, epoch, done, rank, after) for rank in range(after)])
        together = np.concatenate([trained, rest])
        # ...and the `after` workers train the rest of it: no image twice, none skipped but the last
        # (count - done) % after of the order, which sit the epoch out as they do without a change.
        assert len(np.unique(together)) == len(together)
        sitting_out = order[done + (count - done) // after * after :]
        assert set(together) | set(sitting_out) == set(order) and len(sitting_out) < after


def test_an_elastic_epoch_with_fewer_images_left_than_workers_still_trains_a_step_each():
    count, workers = 100, 3
    assert resume_point(count, 40, workers) == 40
    for done in (98, 99, 100):
        rest = resume_point(count, done, workers)
        parts = [remaining_indices(count, 1, 0, rest, rank, workers).numpy() for rank in range(workers)]
        assert [len(part) for part in parts] == [1] * workers


def test_the_elastic_learning_rate_is_the_fixed_size_schedule_of_the_current_worker_count():
    from train.elastic import rate

    learning_rate, epochs, warmup_epochs, steps = 0.001, 5, 1.0, 10
    for workers in (1, 2, 4):
        peak = learning_rate * workers
        warmup_steps = int(warmup_epochs * steps) if workers > 1 else 0
        fixed = keras.optimizers.schedules.CosineDecay(
            learning_rate if warmup_steps else peak,
            decay_steps=epochs * steps - warmup_steps,
            alpha=0.01,
            warmup_target=peak if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
        for step in range(0, epochs * steps, 3):
            expected = float(fixed(step))
            assert rate(learning_rate, epochs, warmup_epochs, step / steps, workers) == pytest.approx(expected)


class CommitLog(keras.callbacks.Callback):
    """Stands in for the training state: notes the batch (of the fit) each commit comes after."""

    def __init__(self) -> None:
        super().__init__()
        self.batches_done, self.commits = 0, []

    def on_train_batch_end(self, batch, logs=None):
        self.batches_done = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self.batches_done = "end"

    def commit(self) -> None:
        self.commits.append(self.batches_done)


def test_an_elastic_epoch_never_commits_after_its_last_batch_only_at_its_end():
    # A commit there, rolled back to, resumed an epoch with no batch left: "steps_per_epoch must be positive".
    from train.elastic import CommitState

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((16, 2), "float32"), np.zeros((16, 1), "float32")
    for steps, expected in [(6, [3, "end"]), (7, [3, 6, "end"]), (1, ["end"])]:
        log = CommitLog()
        model.fit(x, y, batch_size=2, steps_per_epoch=steps, callbacks=[log, CommitState(log, 3, steps)], verbose=0)
        assert log.commits == expected, steps


def test_min_workers_without_hosts_is_a_usage_error():
    result = run_pipeline("train", "--min-workers", "1", check=False)
    assert result.returncode == 2
    assert "--min-workers needs --host-discovery-script or --hosts" in result.stderr


def test_commit_every_must_be_a_positive_integer():
    result = run_pipeline("train", "--set", "commit_every=0", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: commit_every=0: must be an integer from 1 to 1000000"


def test_an_elastic_job_refused_by_rank_0_ends_with_its_one_line_error(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("an earlier run\n")
    result = run_pipeline(*elastic_train_args(tmp_path, "taken"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'taken'}: run directory already exists; pass --resume to continue it, --exist-ok to "
        "start it over, or --name for a new run"
    )
    assert (tmp_path / "taken" / "notes.txt").read_text() == "an earlier run\n"


class Lines(threading.Thread):
    """Reads a process's output as it comes, each line with the time it arrived."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, text: str, timeout: float) -> float | None:
        """When the first line containing `text` arrived (None if none did within `timeout` seconds)."""
        deadline = time.time() + timeout
        while True:
            found = [arrived for arrived, line in self.lines if text in line]
            if found or time.time() > deadline:
                return found[0] if found else None
            time.sleep(0.05)


def test_two_live_workers_that_started_with_the_same_rank_are_watched_apart():
    """After a loss and a join, two live workers can carry the same number in front of their lines (the rank each
    started with) on different hosts: the one that falls silent is found, not hidden by the other's heartbeats."""
    from train.launch import HEARTBEAT, _relay, _watch_silence

    # horovodrun's output as it relays two workers that both started as rank 2: hostC beats throughout, hostD twice.
    script = (
        "import sys, time\n"
        "for beat in range(25):\n"
        f"    print('[2]<stderr>:{HEARTBEAT} on hostC', flush=True)\n"
        f"    if beat < 2: print('[2]<stderr>:{HEARTBEAT} on hostD', flush=True)\n"
        "    time.sleep(0.2)\n"
    )
    horovodrun = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    heard: dict = {}
    silent: list = []
    watch = threading.Thread(target=_watch_silence, args=(horovodrun, heard, 2, lambda *a: silent.append(a) or True))
    watch.start()
    shown: list = []
    _relay(horovodrun, lambda *line: shown.append(line), heard)
    horovodrun.wait()
    watch.join()
    assert [worker for worker, _ in silent] == [(2, "hostD")]  # hostC's beats never stopped
    assert shown == []  # heartbeats are the launcher's own


def test_a_silent_worker_is_stopped_on_its_own_host_only():
    """_kill_worker ends the shell horovodrun started for (rank, host) and what it runs, not the same rank's
    shell for another host."""
    from train.launch import _kill_worker

    # Two shells as horovodrun starts them (its environment on the command line), each running a worker stand-in.
    shell = "HOROVOD_HOSTNAME={} HOROVOD_RANK=2 sleep 60; :"
    starter = (
        "import subprocess, sys, time\n"
        f"for host in ('hostC', 'hostD'): subprocess.Popen(['/bin/sh', '-c', {shell!r}.format(host)])\n"
        "time.sleep(60)\n"
    )
    horovodrun = subprocess.Popen([sys.executable, "-c", starter])
    try:
        deadline = time.time() + 30
        while len(shells := _shells_under(horovodrun.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert _kill_worker(horovodrun.pid, 2, "hostD") == ["hostD"]
        time.sleep(0.5)
        alive = _shells_under(horovodrun.pid)
        assert [host for host, _ in alive] == ["hostC"] and len(shells) == 2
        assert _kill_worker(horovodrun.pid, 3, "hostC") == []  # no worker started as rank 3
    finally:
        horovodrun.kill()
        for _, pid in _shells_under(horovodrun.pid):
            os.kill(pid, signal.SIGKILL)
        horovodrun.wait()


def _shells_under(parent: int) -> list[tuple[str, int]]:
    """(host, pid) of each live worker-stand-in shell started by `parent`, by host."""
    shells = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found = re.search(r"HOROVOD_HOSTNAME=(\w+)", command)
            if int(fields[1]) == parent and fields[0] != "Z" and found:
                shells.append((found[1], pid))
    return sorted(shells)


def kill_mid_epoch(
    job: subprocess.Popen, output: Lines, runs_dir: Path, rank: int, signal_number: int = signal.SIGKILL
) -> float:
    """Send the worker of `rank` SIGKILL (or `signal_number`) a little into epoch 2 (of 225 steps: some commits
    made), let the job finish, and return when the signal was sent. The job must end well: the survivor trains on."""
    pid = None
    try:
        assert output.first("Epoch 2/", timeout=180), "\n".join(line for _, line in output.lines)
        time.sleep(2)
        pid = worker_pid(rank, str(runs_dir), timeout=5)
        assert pid is not None and job.poll() is None
        os.kill(pid, signal_number)
        killed = time.time()
        code = job.wait(timeout=180)
        output.join(timeout=10)
        assert code == 0, "\n".join(line for _, line in output.lines[-40:])
    finally:
        job.kill()
        if pid is not None and signal_number != signal.SIGKILL:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # a frozen worker the job did not end
    output.join(timeout=10)
    return killed


def elastic_train_args(
    folder: Path, name: str, hosts: tuple[str, str] = ("localhost", "127.0.0.1"), epochs: int = 6
) -> list[str]:
    """`pipeline train` as 1 to 2 elastic workers on two hosts, one slot each: Horovod takes a failed worker's
    whole host out for a while, so a survivor must be on another. By default both are this machine's own
    addresses, whose workers horovodrun starts without ssh. Six epochs leave a lost host time to join again."""
    script = folder / "hosts.sh"
    script.write_text("#!/bin/sh\n" + "".join(f"echo {host}:1\n" for host in hosts))
    script.chmod(0o755)
    elastic = ["--min-workers", "1", "--max-workers", "2", "--host-discovery-script", str(script)]
    small = [
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--set",
        "max_images_per_class=400",
        "--set",
        "commit_every=5",
    ]
    return ["train", *elastic, "--network-interface", "lo", "--name", name, "--set", f"runs_dir={folder}", *small]


def freeze_a_worker_and_check_the_job_goes_on(command: list[str], runs_dir: Path, env: dict | None = None) -> None:
    """Run an elastic job (`command`, with --worker-timeout 10), SIGSTOP its rank-1 worker in epoch 2 and check
    the launcher stopped it and the job went on without it. Frozen, the worker would block the others'
    collectives, then their rendezvous, for good."""
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Lines(job.stdout)
    output.start()
    frozen = kill_mid_epoch(job, output, runs_dir, rank=1, signal_number=signal.SIGSTOP)
    text = "\n".join(line for _, line in output.lines)
    stopped = output.first(" silent for ", timeout=0)
    assert stopped is not None and 7 <= stopped - frozen < 20, text  # its last heartbeat came before the stop
    assert re.search(r"^worker on \S+ silent for 1\d s: stopped it, the others go on$", text, re.M), text
    assert re.search(r"^worker on \S+ lost at epoch 2 batch \d+: continuing with 1 worker$", text, re.M), text


@pytest.mark.slow
def test_an_elastic_job_stops_a_frozen_worker_and_goes_on_without_it(tmp_path):
    freeze_a_worker_and_check_the_job_goes_on(
        [*PIPELINE, *elastic_train_args(tmp_path, "frozen", epochs=3), "--worker-timeout", "10"], tmp_path
    )
    assert (tmp_path / "frozen" / "summary.json").is_file()


@pytest.mark.slow
def test_an_elastic_job_over_ssh_stops_a_frozen_remote_worker_and_goes_on(tmp_path, ssh_hosts):
    # The launcher can end only the ssh connection: Horovod counts that worker lost (the frozen process stays).
    args = [*elastic_train_args(tmp_path, "frozen", ssh_hosts.addresses, epochs=3), "--worker-timeout", "10"]
    freeze_a_worker_and_check_the_job_goes_on([*PIPELINE, *args, *ssh_hosts.ssh_options()], tmp_path, ssh_hosts.env())
    assert (tmp_path / "frozen" / "summary.json").is_file()


@pytest.mark.slow
def test_an_elastic_job_that_loses_rank_0_mid_epoch_goes_on_and_takes_the_host_back(tmp_path):
    run_pipeline(*elastic_train_args(tmp_path, "whole"))
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())

    command = [*PIPELINE, *elastic_train_args(tmp_path, "elastic")]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Lines(job.stdout)
    output.start()
    killed = kill_mid_epoch(job, output, tmp_path, rank=0)  # the chief: rank 0 has to move to the survivor
    text = "\n".join(line for _, line in output.lines)
    # Which of the two names got rank 0 is Horovod's choice: either may be the one lost.
    lost = output.first(" lost at epoch ", timeout=0)
    assert lost is not None and lost - killed < 5, text
    assert re.search(
        r"^worker on (localhost|127\.0\.0\.1) lost at epoch \d batch \d+: continuing with 1 worker$", text, re.M
    )
    assert "Traceback" not in text
    run = tmp_path / "elastic"
    with open(run / "membership.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["event"] for row in rows][:3] == ["start", "start", "lost"], rows
    assert rows[2]["epoch"] in ("2", "3") and rows[2]["workers"] == "1"
    assert any(row["event"] == "joined" and row["workers"] == "2" for row in rows[3:]), rows
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 7))
    summary = json.loads((run / "summary.json").read_text())
    assert abs(summary["test_accuracy"] - whole["test_accuracy"]) <= 0.01, (summary, whole)


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    with two_hosts(tmp_path_factory.mktemp("sshd")) as hosts:
        yield hosts


@pytest.mark.slow
def test_an_elastic_job_over_ssh_loses_a_remote_worker_and_takes_its_host_back(tmp_path, ssh_hosts):
    args = elastic_train_args(tmp_path, "remote", ssh_hosts.addresses)
    command = [*PIPELINE, *args, *ssh_hosts.ssh_options()]
    job = subprocess.Popen(
        command, cwd=ROOT, env=ssh_hosts.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Lines(job.stdout)
    output.start()
    killed = kill_mid_epoch(job, output, tmp_path, rank=1)
    text = "\n".join(line for _, line in output.lines)
    lost = output.first(" lost at epoch ", timeout=0)
    assert lost is not None and lost - killed < 5, text
    run = tmp_path / "remote"
    with open(run / "membership.csv") as f:
        events = [(row["event"], row["host"]) for row in csv.DictReader(f)]
    # Horovod chooses which host holds rank 1: the one killed is lost, then joins again.
    assert events[2][0] == "lost" and events[2][1] in ssh_hosts.addresses, events
    assert ("joined", events[2][1]) in events[3:], events
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == list(range(1, 7))
