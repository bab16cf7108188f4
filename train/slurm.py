"""`srun pipeline train ...` inside a Slurm allocation: every task of the job step is one Horovod worker (Gloo), with
no horovodrun and no ssh between nodes; srun is the launcher, and Slurm watches the tasks. train/launch.py run_job
decides that a process is such a task (train/launchers.py in_slurm_step) and joins it here. Imports no TensorFlow.

Slurm tells each task its rank (SLURM_PROCID), the step's size (SLURM_STEP_NUM_TASKS), its node (SLURMD_NODENAME)
and the step's nodes (SLURM_STEP_NODELIST, expanded by `scontrol show hostnames`). Horovod's Gloo workers need what
horovodrun's gloo_run gives them: a rendezvous server (Horovod's own RendezvousHTTPServer) and, per worker, its
rank, local rank and cross rank among the others. Here rank 0 runs the server, on the first node of the step (where
srun's block and cyclic distributions place task 0), at a port every task derives from the job and step ids; each
task PUTs its node name there; rank 0 waits for all of them, builds the plan from where the tasks really run (any
distribution), and PUTs it; each task reads its slot and sets the variables gloo_run sets.

Why the address comes from Slurm rather than from a file in the run directory: every task has Slurm's variables at
once, while a file written on one node reaches another through the shared file system's attribute cache (NFS: up to
a minute late), and a file left by an earlier (requeued) step would have to be told apart from this step's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from serve.errors import PipelineError
from train.launchers import horovod_timeouts

# The rendezvous port: PIPELINE_RENDEZVOUS_PORT, else this base plus a number from the job and step ids, below Linux's
# ephemeral ports (32768 and up), which outgoing connections take.
PORT_VARIABLE = "PIPELINE_RENDEZVOUS_PORT"
PORT_BASE, PORT_RANGE = 10_000, 20_000
SCOPE = "pipeline"  # the rendezvous store's scope for this module's keys (Gloo's are global, local_*, cross_*)


class SlurmError(PipelineError):
    """A Slurm job step whose tasks cannot become one Horovod job."""


def join_slurm_step(timeout: int) -> None:
    """Make this task a worker of the step's Horovod job: rendezvous with the others (at most `timeout` seconds,
    else SlurmError naming the ranks missing) and set the HOROVOD_* variables `hvd.init()` reads."""
    rank, size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    nodes = _hostnames(os.environ["SLURM_STEP_NODELIST"])
    address, port = _node_address(nodes[0]), rendezvous_port()
    deadline = time.monotonic() + timeout
    if rank == 0:
        if node != nodes[0]:
            raise SlurmError(
                f"task 0 runs on {node}, not on the step's first node {nodes[0]}: use srun's default --distribution "
                "(block or cyclic)"
            )
        server = _start_server(port, node)
    _put(address, port, f"node_{rank}", node, deadline, rank)
    if rank == 0:
        plan = _plan(_wait_for_tasks(server, size, deadline, address, port))
        server.init([_slot(slot) for slot in plan])  # clears the store: the plan goes in after
        with server.cache_lock:
            server.cache.setdefault(SCOPE, {})["plan"] = json.dumps(plan).encode()
        slot = plan[0]
    else:
        slot = json.loads(_get_plan(address, port, deadline, rank))[rank]
    os.environ.update(_worker_env(slot, address, port, timeout))


@contextlib.contextmanager
def lost_workers_named():
    """Training in a step's task: an error of Horovod's collectives -- another task died, its node was lost -- becomes
    one line naming this rank and node and what Gloo saw, instead of TensorFlow's "Graph execution error". (srun's own
    line names the task that ended: "srun: error: n2: task 1: Killed".)"""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        text = str(err)
        if "Horovod" not in text:
            raise
        gloo = re.search(r"gloo/\S+\] ([^\n]+)", text)
        seen = f" (Gloo: {gloo[1].strip()})" if gloo else ""
        rank, node = os.environ.get("HOROVOD_RANK", "?"), os.environ.get("HOROVOD_HOSTNAME", "?")
        raise SlurmError(
            f"rank {rank} on {node}: lost touch with another task of the job{seen}; srun's lines name the task "
            "that ended, and --resume continues from the last checkpoint"
        ) from None


def rendezvous_port() -> int:
    """PIPELINE_RENDEZVOUS_PORT, else a port from the job and step ids: the same in every task of the step, and
    different for two steps of one job running at once."""
    if os.environ.get(PORT_VARIABLE):
        value = os.environ[PORT_VARIABLE]
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise SlurmError(f"{PORT_VARIABLE}={value}: not a port number (1 to 65535)")
        return int(value)
    job, step = int(os.environ["SLURM_JOB_ID"]), int(os.environ.get("SLURM_STEP_ID", "0"))
    return PORT_BASE + (job * 16 + step) % PORT_RANGE


def _hostnames(nodelist: str) -> list[str]:
    """The node names of a Slurm node list (`n[1-2],gpu07`), expanded by scontrol itself."""
    return _scontrol("show", "hostnames", nodelist).split()


def _node_address(node: str) -> str:
    """The address to reach `node` at: its NodeAddr in Slurm (a node name need not resolve by DNS)."""
    for field in _scontrol("show", "node", node).split():
        if field.startswith("NodeAddr="):
            return field.partition("=")[2]
    return node


def _scontrol(*args: str) -> str:
    try:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmError(f"scontrol {' '.join(args)}: {err}; is Slurm's client installed on this node?") from None
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlurmError(f"scontrol {' '.join(args)} failed: {said}")
    return result.stdout


def _start_server(port: int, node: str):
    """Horovod's rendezvous server, serving in a thread of this process for as long as it lives."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    try:
        server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    except OSError as err:
        raise SlurmError(
            f"rank 0 on {node}: cannot listen on the rendezvous port {port} ({err.strerror}); "
            f"set {PORT_VARIABLE} to a free port for every task (srun --export=ALL,{PORT_VARIABLE}=N)"
        ) from None
    threading.Thread(target=server.serve_forever, name="rendezvous", daemon=True).start()
    return server


def _put(address: str, port: int, key: str, value: str, deadline: float, rank: int) -> None:
    """PUT key=value in the rendezvous store, retrying until rank 0's server answers."""
    request = urllib.request.Request(f"http://{address}:{port}/{SCOPE}/{key}", data=value.encode(), method="PUT")
    _retry(lambda: urllib.request.urlopen(request, timeout=10).read(), deadline, rank, address, port)


def _get_plan(address: str, port: int, deadline: float, rank: int) -> bytes:
    """The plan rank 0 PUT once every task had come, polled until the deadline."""
    url = f"http://{address}:{port}/{SCOPE}/plan"
    while True:
        try:
            return urllib.request.urlopen(url, timeout=10).read()
        except urllib.error.HTTPError as err:
            if err.code != 404:  # 404: not there yet
                raise SlurmError(f"rank {rank}: the rendezvous at {address}:{port} answered {err.code}") from None
        except OSError:
            pass  # rank 0 gone: said below when the deadline passes
        if time.monotonic() > deadline:
            raise SlurmError(
                f"rank {rank}: rank 0 at {address}:{port} did not complete the rendezvous in time: other tasks did not "
                "start, or rank 0 failed (see its line)"
            )
        time.sleep(0.2)


def _retry(call, deadline: float, rank: int, address: str, port: int):
    while True:
        try:
            return call()
        except OSError as err:
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"rank {rank}: cannot reach rank 0's rendezvous at {address}:{port} ({err}): its task did not "
                    "start, failed, or the port is blocked between nodes"
                ) from None
            time.sleep(0.2)


def _wait_for_tasks(server, size: int, deadline: float, address: str, port: int) -> list[str]:
    """Every rank's node, once all have PUT theirs; SlurmError naming the ranks missing at the deadline."""
    while True:
        with server.cache_lock:
            arrived = {key: value.decode() for key, value in server.cache.get(SCOPE, {}).items()}
        nodes = [arrived.get(f"node_{rank}") for rank in range(size)]
        if all(nodes):
            return nodes
        if time.monotonic() > deadline:
            missing = [rank for rank, node in enumerate(nodes) if not node]
            listed = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise SlurmError(
                f"rendezvous at {address}:{port} incomplete after the timeout: {len(missing)} of {size} ranks never "
                f"came (ranks {listed}); their tasks did not start or cannot reach this node"
            )
        time.sleep(0.1)


def _plan(nodes: list[str]) -> list[dict]:
    """Each rank's slot, as Horovod numbers them: its local rank among the ranks on its node, and its cross rank
    among the ranks with the same local rank (one per node), in rank order."""
    plan = []
    for rank, node in enumerate(nodes):
        local_rank = nodes[:rank].count(node)
        peers = [other for other_rank, other in enumerate(nodes) if nodes[:other_rank].count(other) == local_rank]
        plan.append(
            {
                "hostname": node,
                "rank": rank,
                "size": len(nodes),
                "local_rank": local_rank,
                "local_size": nodes.count(node),
                "cross_rank": peers.index(node),
                "cross_size": len(peers),
            }
        )
    return plan


def _slot(slot: dict):
    from horovod.runner.common.util.hosts import SlotInfo

    return SlotInfo(**slot)


def _worker_env(slot: dict, address: str, port: int, timeout: int) -> dict[str, str]:
    """What horovodrun's gloo_run puts in a worker's environment, for this slot; Horovod's stall check and Gloo's
    timeout as the supervisor of `pipeline train --workers` sets them."""
    env = {
        "HOROVOD_HOSTNAME": slot["hostname"],
        "HOROVOD_RANK": str(slot["rank"]),
        "HOROVOD_SIZE": str(slot["size"]),
        "HOROVOD_LOCAL_RANK": str(slot["local_rank"]),
        "HOROVOD_LOCAL_SIZE": str(slot["local_size"]),
        "HOROVOD_CROSS_RANK": str(slot["cross_rank"]),
        "HOROVOD_CROSS_SIZE": str(slot["cross_size"]),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        **horovod_timeouts(timeout),
    }
    interface = os.environ.get("HOROVOD_GLOO_IFACE") or _interface_towards(address, port)
    if interface:
        env["HOROVOD_GLOO_IFACE"] = interface
    return env


def _interface_towards(address: str, port: int) -> str:
    """The network interface this node reaches `address` through (where the kernel routes to it), for Gloo; ""
    when none holds the address the route starts from."""
    import psutil  # a dependency of Horovod

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, port))  # UDP: no packet is sent, the route is chosen
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address == local for entry in addresses):
            return name
    print(f"no interface holds {local}, the address towards rank 0: Gloo picks one", file=sys.stderr)
    return ""
