"""How this process takes part in a training job, decided in one place (run_job), and the supervisor of the worker
processes that `pipeline train --workers N [--hosts ...]` and `--min-workers` (elastic) start through horovodrun
(Gloo): it relays their lines, watches their heartbeats, passes stop signals on, and turns a failed job into one
line naming the worker. Imports no TensorFlow.

What a worker runs is the caller's (LaunchOptions.worker_command): nothing here knows the command line above it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.errors import PipelineError, StoppedError
from train.launchers import DEFAULT_WORKER_TIMEOUT, horovod_timeouts, in_slurm_step

WORKER_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
HOST_SLOTS = re.compile(r"^[\w.-]+:[0-9]+$")  # one item of -H, as horovodrun checks it
# What ssh itself says when it cannot connect or log in, as opposed to what a worker printed.
SSH_MESSAGE = re.compile(
    r"^(ssh: |Permission denied|Host key verification failed|kex_exchange_identification|Connection (closed|reset))"
)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Under the supervisor each worker prints "<HEARTBEAT> on <its host>" to stderr every second; the supervisor keeps it
# to itself. With the number horovodrun puts in front of the line (the worker's rank when it started) it names the
# worker: in an elastic job two live workers can have started with the same rank, on different hosts.
HEARTBEAT_VARIABLE = "PIPELINE_HEARTBEAT"
HEARTBEAT = "pipeline: worker alive"
HEARTBEAT_LINE = re.compile(rf"^{re.escape(HEARTBEAT)} on (\S+)$")
# Seconds a host whose worker failed stays out of an elastic job before the discovery script may return it
# (without a range, Horovod keeps it out for good).
BLACKLIST_COOLDOWN = (2, 300)


def elastic_conflict(config: dict) -> str | None:
    """Why `config` cannot train in an elastic job, or None. The launcher asks before it starts any worker; each
    worker asks again, for an elastic job started by horovodrun itself."""
    if config["ema_decay"]:
        return (
            f"ema_decay={config['ema_decay']:g}: weight EMA is not supported in an elastic job (its rollbacks "
            "restore the weights, not their average); set ema_decay=0 or train with a fixed number of workers"
        )
    return None


class LaunchOptionsError(PipelineError):
    """Launch options that contradict each other: a usage error (exit code 2), as the command line's own."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """How a training job runs, as `pipeline train`'s options say: alone, or however a launcher started this process
    (neither `workers` nor `min_workers`); `workers` processes (fixed size); or `min_workers` to `max_workers`
    (Horovod Elastic). LaunchOptionsError, naming the options, for a combination that makes no sense."""

    workers: int | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    hosts: str | None = None  # horovodrun's -H: host1:4,host2:4 (default localhost:workers)
    host_discovery_script: str | None = None  # elastic: prints the available hosts, one host:slots a line
    # Seconds a stalled worker may hold up the others; a Slurm task's longest wait at the rendezvous.
    worker_timeout: int = DEFAULT_WORKER_TIMEOUT
    ssh_port: int | None = None
    ssh_identity_file: str | None = None
    network_interface: str | None = None
    worker_command: tuple[str, ...] = ()  # what each worker runs: the caller's, needed to start workers

    def __post_init__(self) -> None:
        if self.hosts and not self.starts_workers:
            raise LaunchOptionsError("--hosts needs --workers or --min-workers")
        ssh_and_network = {
            "--ssh-port": self.ssh_port,
            "--ssh-identity-file": self.ssh_identity_file,
            "--network-interface": self.network_interface,
        }
        for option, value in ssh_and_network.items():
            if value is not None and not self.starts_workers:
                raise LaunchOptionsError(f"{option} needs --workers or --min-workers")
        if self.min_workers and self.workers:
            raise LaunchOptionsError("--min-workers and --workers exclude each other: elastic or fixed")
        if (self.max_workers or self.host_discovery_script) and not self.min_workers:
            raise LaunchOptionsError("--max-workers and --host-discovery-script need --min-workers")
        if self.min_workers and not (self.hosts or self.host_discovery_script):
            raise LaunchOptionsError("--min-workers needs --host-discovery-script or --hosts (two hosts or more)")
        if self.max_workers and self.max_workers < self.min_workers:
            raise LaunchOptionsError(f"--max-workers {self.max_workers} is less than --min-workers {self.min_workers}")

    @property
    def starts_workers(self) -> bool:
        """Whether this process launches the job's workers (and supervises them) rather than being one."""
        return bool(self.workers or self.min_workers)

    @property
    def elastic(self) -> bool:
        """Whether workers may come and go (Horovod Elastic)."""
        return bool(self.min_workers)


def run_job(options: LaunchOptions, train: Callable[[], None]) -> None:
    """This process's part in the job, by who started it:

    - asked to start workers (`options.workers` or `min_workers`): their launcher, which runs no training itself;
      the workers, started by horovodrun, run `options.worker_command`, and `supervise` watches them;
    - one task of a Slurm job step: srun is the launcher and Slurm watches the tasks (srun ends the step when one
      fails, and names it), so there is nothing to supervise: it joins the step's Horovod job through the
      rendezvous (train/slurm.py), then `train()`, a task lost meanwhile named in one line;
    - one of horovodrun's workers: watched so that it ends with its launcher, then `train()`;
    - otherwise (alone, or one of mpirun's workers): `train()`."""
    slurm_task = in_slurm_step()
    if options.starts_workers:
        if slurm_task:
            raise LaunchOptionsError("inside srun every task is a worker already: drop --workers and --min-workers")
        supervise(options)
    elif slurm_task:
        from train.slurm import join_slurm_step, lost_workers_named

        join_slurm_step(options.worker_timeout)
        with lost_workers_named():
            train()
    else:
        if "HOROVOD_RANK" in os.environ:  # it must not outlive its launcher
            watch_over_worker()
        train()


def supervise(options: LaunchOptions) -> None:
    """Run the workers through horovodrun and watch them to the job's end. Rank 0's lines print as if it ran alone,
    the others' on stderr with their rank in front. In an elastic job, where ranks change as workers come and go,
    stdout prints as it comes (only the current rank 0 prints there) and stderr with the rank each worker started
    with ("[worker N]").

    Every worker says it is alive every second. In a fixed-size job, a worker that dies makes horovodrun stop the
    others at once, and one silent for `worker_timeout` seconds makes this supervisor stop the job: either way
    PipelineError naming the rank and its host; StoppedError when the workers stopped on a signal, with their
    checkpoint. In an elastic job a silent worker is killed and the others go on; the job fails when fewer than
    `min_workers` remain for Horovod's elastic timeout."""
    if "HOROVOD_RANK" in os.environ:
        raise PipelineError(
            "--min-workers inside a Horovod job: drop it when launching with horovodrun"
            if options.elastic
            else "--workers inside a Horovod job: drop --workers when launching with horovodrun"
        )
    placement = [] if options.elastic else rank_hosts(options.hosts or f"localhost:{options.workers}", options.workers)
    command = horovodrun_command(options)
    env = dict(os.environ, **horovod_timeouts(options.worker_timeout), PYTHONUNBUFFERED="1")
    env[HEARTBEAT_VARIABLE] = "1"  # each worker says it is alive every second: see on_silent
    process = start_horovodrun(command, env)
    heard: dict[tuple[int, str], float] = {}  # (first rank, host) -> time.monotonic() of its last heartbeat
    stalled: dict[int, float] = {}  # rank -> seconds it had been silent when the job was stopped

    def on_silent(worker: tuple[int, str], seconds: float) -> bool:
        if options.elastic:
            # Frozen, or its host hung or cut off: killed, Horovod counts it lost and the others go on without it.
            # Left alone, it would block their collectives, and after Gloo's timeout their new rendezvous, which
            # waits for every worker it knows of.
            for host in _kill_worker(process.pid, *worker):
                print(
                    f"worker on {host} silent for {seconds:.0f} s: stopped it, the others go on",
                    file=sys.stderr,
                    flush=True,
                )
            return True
        # Stopped, frozen or cut off: Horovod cannot tell, and a frozen worker blocks its coordination too, until Gloo
        # times out and the job fails naming no rank. horovodrun, on SIGTERM, stops every worker.
        stalled[worker[0]] = seconds
        process.terminate()
        return False

    threading.Thread(
        target=_watch_silence, args=(process, heard, options.worker_timeout, on_silent), daemon=True
    ).start()
    ssh_errors: dict[int, str] = {}  # rank -> what ssh said when it could not start that worker

    def show(worker: int, stream: str, text: str) -> None:
        if options.elastic:  # only the current rank 0 prints to stdout, whichever worker that is
            if stream == "stdout":
                print(text, flush=True)
            else:
                print(f"[worker {worker}] {text}", file=sys.stderr, flush=True)
        elif stream == "stderr" and SSH_MESSAGE.match(text):
            ssh_errors.setdefault(worker, text)
        elif worker == 0:
            print(text, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
        else:
            print(f"[rank {worker}] {text}", file=sys.stderr, flush=True)

    if not options.elastic:
        _forward_stop_signals(process, options.worker_command)
    launcher_lines, worker_errors = _relay(process, show, heard)
    code = process.wait()
    if options.elastic:
        if code != 0:
            raise PipelineError(_elastic_failure(launcher_lines, worker_errors, code))
        return
    # The first worker to end stopped on a signal (the supervisor's, passed on, or one sent to the workers
    # themselves): they all did, with the checkpoint written.
    if re.search(rf"^Exit code: {StoppedError.exit_code}\s*$", "\n".join(launcher_lines), re.M):
        raise StoppedError("")  # rank 0's line says where, relayed above
    if stalled:
        rank, seconds = next(iter(stalled.items()))
        raise PipelineError(f"worker rank {rank} on {placement[rank]} stalled for {seconds:.0f} s; the job was stopped")
    if code != 0:
        raise PipelineError(_failure(launcher_lines, {**ssh_errors, **worker_errors}, code, placement))


def rank_hosts(hosts: str, workers: int) -> list[str]:
    """The host of each rank: horovodrun fills the slots of -H host by host, in order. It starts a worker in
    every slot, whatever -np says, so the slots must add up to the workers."""
    names: list[str] = []
    for item in hosts.split(","):
        if not HOST_SLOTS.match(item.strip()):
            raise PipelineError(f"--hosts {hosts}: {item.strip()!r} is not HOST:SLOTS (e.g. gpu1:4,gpu2:4)")
        name, slots = item.strip().split(":")
        names += [name] * int(slots)
    if len(names) != workers:
        raise PipelineError(
            f"--hosts {hosts} has {len(names)} slots for {workers} workers: give one slot per worker "
            "(horovodrun starts a worker in every slot)"
        )
    return names


def horovodrun_command(options: LaunchOptions) -> list[str]:
    """horovodrun -np N -H hosts --gloo [ssh and network options] <worker command>; elastic: -np min_workers,
    --min-np/--max-np and the blacklist's cooldown, and the discovery script instead of -H when there is one."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if not os.path.exists(horovodrun):
        raise PipelineError(f"{horovodrun}: not found; run `make setup`, which builds horovod")
    arguments = ["-np", str(options.workers or options.min_workers)]
    if options.elastic:
        arguments += ["--min-np", str(options.min_workers)]
        arguments += ["--max-np", str(options.max_workers)] if options.max_workers else []
        arguments += ["--blacklist-cooldown-range", *map(str, BLACKLIST_COOLDOWN)]
    if options.host_discovery_script:  # the script names the hosts, each time Horovod asks
        arguments += ["--host-discovery-script", options.host_discovery_script]
    else:
        arguments += ["-H", options.hosts or f"localhost:{options.workers}"]
    arguments.append("--gloo")
    if options.ssh_port is not None:
        arguments += ["--ssh-port", str(options.ssh_port)]
    if options.ssh_identity_file is not None:
        arguments += ["--ssh-identity-file", options.ssh_identity_file]
    if options.network_interface is not None:
        arguments += ["--network-interface", options.network_interface]
    return [horovodrun, *arguments, *options.worker_command]


def _forward_stop_signals(process: subprocess.Popen, worker_command: tuple[str, ...]) -> None:
    """From now on, SIGTERM and SIGUSR1 to this supervisor go to the workers on this machine (horovodrun would give
    them 5 s, then SIGKILL): any worker's signal stops every worker at one batch with a checkpoint (train/run.py
    Agreement), then each exits with code 75. With no worker here (all on other hosts) the job is stopped as a
    whole."""

    def forward(number: int, frame) -> None:
        workers = [pid for pid in _descendants(process.pid) if _runs(pid, worker_command)]
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, number)
        if not workers:
            process.terminate()

    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, forward)


def _runs(pid: int, command: tuple[str, ...]) -> bool:
    """Whether process `pid` runs `command` itself (a worker, not the shell or ssh that starts one: their command
    lines hold it as one string)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            argv = file.read().split(b"\0")
    except OSError:
        return False
    return argv[: len(command)] == [os.fsencode(part) for part in command]


def _relay(
    process: subprocess.Popen, show: Callable[[int, str, str], None], heard: dict[tuple[int, str], float]
) -> tuple[list[str], dict[int, str]]:
    """Read horovodrun's output to its end: each worker line ("[N]<stream>:text") goes to show(N, stream, text),
    except a heartbeat, which sets heard[(N, its host)] to its time for the stall watch, and a worker's
    "Error: ..." line, kept to explain a failure (raised once, by the launcher, rather than once per worker).
    Returns (horovodrun's own lines, the first error of each worker)."""
    launcher_lines, worker_errors = [], {}
    for line in process.stdout:
        line = line.rstrip("\n")
        match = WORKER_LINE.match(line)
        if not match:
            launcher_lines.append(line)
            continue
        worker, stream, text = int(match[1]), match[2], match[3]
        beat = HEARTBEAT_LINE.match(text)
        if beat:
            heard[(worker, beat[1])] = time.monotonic()
        elif text.startswith("Error: "):
            worker_errors.setdefault(worker, text[len("Error: ") :])
        else:
            show(worker, stream, text)
    return launcher_lines, worker_errors


def _watch_silence(
    process: subprocess.Popen,
    heard: dict[tuple[int, str], float],
    timeout: int,
    on_silent: Callable[[tuple[int, str], float], bool],
) -> None:
    """While the job runs, once a second: on_silent((N, host), seconds) for each worker whose last heartbeat
    (`heard`) is `timeout` seconds old or more, its entry dropped (a next heartbeat starts its watch again); the
    watch ends when on_silent returns False."""
    while process.poll() is None:
        time.sleep(1)
        now = time.monotonic()
        for worker, last in list(heard.items()):
            if now - last >= timeout:
                del heard[worker]
                if not on_silent(worker, now - last):
                    return


def start_horovodrun(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """horovodrun with its output piped to us, and told to stop when we do, even by kill -9 (Linux's parent-death
    signal sends it SIGTERM, on which it stops its workers): no worker trains on with nobody to report to."""
    launcher = os.getpid()

    def die_with_launcher() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=die_with_launcher if sys.platform == "linux" else None,
    )


def watch_over_worker() -> None:
    """In a worker horovodrun started: a thread that ends the worker as soon as nobody reads its output, and,
    under `pipeline train --workers`, says it is alive on stderr every second.

    horovodrun stops its workers when it stops, but on another host all it can end is the ssh connection: the
    worker there would train on, orphaned; its output pipe losing its reader (POLLERR; POLLHUP for a socket) is
    the sign. The heartbeat lets the launcher tell a stalled worker from a quiet one."""
    heartbeat = os.environ.get(HEARTBEAT_VARIABLE) == "1"
    beat = f"{HEARTBEAT} on {os.environ.get('HOROVOD_HOSTNAME', 'localhost')}\n".encode()

    def watch() -> None:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # no events asked for: poll returns on error or hang-up alone
        with contextlib.suppress(OSError):
            while not poller.poll(1000):
                if heartbeat:
                    os.write(sys.stderr.fileno(), beat)  # one write: never inside another line
        os._exit(1)

    threading.Thread(target=watch, name="watch-over-worker", daemon=True).start()


def _failure(
    launcher_lines: list[str], worker_errors: dict[int, str], code: int, hosts: list[str] | None = None
) -> str:
    """The one line that explains a failed job: the first worker to fail, where, and how."""
    text = "\n".join(launcher_lines)
    # horovodrun checks ssh to every host before it starts a worker, and prints what ssh said for each failure.
    unreachable = re.findall(r"^ssh not successful for host (\S+):\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    if unreachable:
        return "; ".join(f"cannot reach {host} by ssh: {_last_line(said)}" for host, said in unreachable)
    first = re.search(r"^Process name: (\d+)\s*$", text, re.M)  # horovodrun names the first process to fail
    exit_code = re.search(r"Exit code: (-?\d+)", text)
    if first:
        rank = int(first[1])
        where = f"worker rank {rank}" + (f" on {hosts[rank]}" if hosts else "")
        if rank in worker_errors:  # it said why itself, or ssh did
            error = worker_errors[rank]
            return f"{where}: {error}" if SSH_MESSAGE.match(error) else error
        status = int(exit_code[1]) if exit_code else code
        if status == 255:  # ssh's code when the connection ends without the remote command's status
            return f"{where} lost (its ssh connection ended with 255: the worker or its host died)"
        how = f"exit code {status}"
        if status > 128 and status - 128 in signal.valid_signals():
            how += f", killed by {signal.Signals(status - 128).name}"
        return f"{where} died ({how}); Horovod stopped the job"
    if worker_errors:
        return worker_errors[min(worker_errors)]
    return f"horovodrun failed (exit code {code}): {_last_line(text)}"


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")


def _kill_worker(horovodrun: int, worker: int, host: str) -> list[str]:
    """SIGKILL, among horovodrun's descendants, the shell that started worker `worker` (its first rank, the
    number in front of its lines) on `host`, and what it runs: the worker itself, or the ssh that reaches it.
    Returns the hosts of the workers killed. Linux (/proc) only; elsewhere kills nothing."""
    children = _children()
    hosts, killed = [], set()
    for pid in _descendants(horovodrun, children):
        if pid in killed:  # under a shell already killed: its ssh names the worker's rank too
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace")
            if re.search(rf"(^|\s)HOROVOD_RANK={worker}(\s|$)", command) and re.search(
                rf"(^|\s)HOROVOD_HOSTNAME={re.escape(host)}(\s|$)", command
            ):
                for doomed in [pid, *_descendants(pid, children)]:
                    killed.add(doomed)
                    with contextlib.suppress(OSError):
                        os.kill(doomed, signal.SIGKILL)
                hosts.append(host)
    return hosts


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (Linux only; elsewhere none)."""
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc: not Linux
        return {}
    children: dict[int, list[int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as file:
                stat = file.read()
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # the field after the state, after the name
            children.setdefault(parent, []).append(int(pid))
    return children


def _descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """The processes below `pid`, parents before their children."""
    children = _children() if children is None else children
    return [below for child in children.get(pid, []) for below in [child, *_descendants(child, children)]]


def _elastic_failure(launcher_lines: list[str], worker_errors: dict[int, str], code: int) -> str:
    """The one line that explains a failed elastic job: the first error a worker gave, or the worker Horovod
    names, by host and slot ("Process name: 127.0.0.3[0]"): ranks change as workers come and go."""
    if worker_errors:
        return next(iter(worker_errors.values()))
    first = re.search(r"Process name: (\S+)\[(\d+)\]\nExit code: (-?\d+)", "\n".join(launcher_lines))
    if first:
        return f"worker on {first[1]} (slot {first[2]}) failed (exit code {first[3]}); the elastic job stopped"
    return _failure(launcher_lines, {}, code)
