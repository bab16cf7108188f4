"""`pipeline train --workers N [--hosts ...]`: start the same command as N Horovod workers through
horovodrun (Gloo), and turn a failed job into one clear line. Imports no TensorFlow."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from serve.errors import PipelineError

WORKER_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")


def horovodrun_command(workers: int, hosts: str | None, pipeline_args: list[str]) -> list[str]:
    """horovodrun -np N -H hosts --gloo <this python> -m pipeline <args>."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if not os.path.exists(horovodrun):
        raise PipelineError(f"{horovodrun}: not found; run `make setup`, which builds horovod")
    return [
        horovodrun,
        "-np",
        str(workers),
        "-H",
        hosts or f"localhost:{workers}",
        "--gloo",
        sys.executable,
        "-m",
        "pipeline",
        *pipeline_args,
    ]


def run_workers(workers: int, hosts: str | None, pipeline_args: list[str], timeout: int) -> None:
    """Run the job; rank 0's lines print as if it ran alone, the others' with their rank in front.

    A worker that dies makes horovodrun stop the others at once; a worker that hangs makes the rest stop
    after `timeout` seconds (Horovod's stall shutdown). Either way: PipelineError naming the rank.
    """
    if "HOROVOD_RANK" in os.environ:
        raise PipelineError("--workers inside a Horovod job: drop --workers when launching with horovodrun")
    env = dict(
        os.environ,
        HOROVOD_STALL_CHECK_TIME_SECONDS=str(min(timeout, 60)),
        HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=str(timeout),
        HOROVOD_GLOO_TIMEOUT_SECONDS=str(timeout),
        PYTHONUNBUFFERED="1",
    )
    command = horovodrun_command(workers, hosts, pipeline_args)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    launcher_lines, worker_errors = [], {}
    for line in process.stdout:
        line = line.rstrip("\n")
        match = WORKER_LINE.match(line)
        if not match:
            launcher_lines.append(line)
            continue
        rank, stream, text = int(match[1]), match[2], match[3]
        if text.startswith("Error: "):  # raised once, below, rather than once per worker
            worker_errors.setdefault(rank, text[len("Error: ") :])
        elif rank == 0:
            print(text, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
        else:
            print(f"[rank {rank}] {text}", file=sys.stderr, flush=True)
    code = process.wait()
    if code != 0:
        raise PipelineError(_failure(launcher_lines, worker_errors, code))


def _failure(launcher_lines: list[str], worker_errors: dict[int, str], code: int) -> str:
    """The one line that explains a failed job: the first worker to fail, and how."""
    text = "\n".join(launcher_lines)
    first = re.search(r"Process name: (\d+)", text)  # horovodrun names the first process to fail
    exit_code = re.search(r"Exit code: (-?\d+)", text)
    if first and int(first[1]) in worker_errors:
        return worker_errors[int(first[1])]  # it said why itself
    if first:
        status = int(exit_code[1]) if exit_code else code
        how = f"exit code {status}"
        if status > 128 and status - 128 in signal.valid_signals():
            how += f", killed by {signal.Signals(status - 128).name}"
        return f"worker rank {first[1]} died ({how}); Horovod stopped the job"
    if worker_errors:
        return worker_errors[min(worker_errors)]
    last = next((line for line in reversed(launcher_lines) if line.strip()), "no output")
    return f"horovodrun failed (exit code {code}): {last.strip()}"
