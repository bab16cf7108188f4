"""Two ssh "hosts" on this machine for tests: a real sshd on 127.0.0.2 and another on 127.0.0.3, each with its own
config, host key, authorized-keys file, pid file and log, all in a temporary folder, and a client key for
`--ssh-identity-file`. The machine's own ssh config, ~/.ssh, known_hosts and /etc/hosts are never touched: the
test's processes find an `ssh` wrapper first on PATH that keeps the host keys horovodrun's
`ssh -o StrictHostKeyChecking=no` accepts in the folder too.

In a test module:

    @pytest.fixture(scope="session")
    def ssh_hosts(tmp_path_factory):
        with two_hosts(tmp_path_factory.mktemp("sshd")) as hosts:
            yield hosts
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ADDRESSES = ("127.0.0.2", "127.0.0.3")
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be started by its absolute path
SSH = "/usr/bin/ssh"


@dataclass(frozen=True)
class SshHosts:
    addresses: tuple[str, ...]
    port: int
    identity_file: Path
    bin: Path  # holds the `ssh` wrapper
    logs: tuple[Path, ...]

    def hosts(self, slots: int = 1) -> str:
        """The --hosts value: every address with this many slots."""
        return ",".join(f"{address}:{slots}" for address in self.addresses)

    def ssh_options(self) -> list[str]:
        return ["--ssh-port", str(self.port), "--ssh-identity-file", str(self.identity_file)]

    def env(self) -> dict[str, str]:
        """The current environment, with the `ssh` wrapper first on PATH."""
        return dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")


@contextlib.contextmanager
def two_hosts(folder: Path) -> Iterator[SshHosts]:
    """sshd listening on 127.0.0.2 and 127.0.0.3 (one free port, the same on both) until the block ends;
    pytest.skip with the reason where sshd cannot start."""
    _install_sshd()
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    folder.mkdir(parents=True, exist_ok=True)
    identity_file = folder / "id_ed25519"
    _keygen(identity_file)
    (folder / "authorized_keys").write_text(identity_file.with_suffix(".pub").read_text())
    port = _free_port()
    processes: list[subprocess.Popen] = []
    try:
        for address in ADDRESSES:
            processes.append(_start_sshd(folder, address, port))
        yield SshHosts(
            addresses=ADDRESSES,
            port=port,
            identity_file=identity_file,
            bin=_ssh_wrapper(folder),
            logs=tuple(folder / f"sshd_{address}.log" for address in ADDRESSES),
        )
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def _install_sshd() -> None:
    if os.path.exists(SSHD):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{SSHD} is missing and cannot be installed here (needs root and apt-get)")
    result = subprocess.run(["apt-get", "install", "-y", "openssh-server"], capture_output=True, text=True)
    if result.returncode != 0 or not os.path.exists(SSHD):
        pytest.skip(f"apt-get install openssh-server failed: {result.stderr.strip()[-300:]}")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_sshd(folder: Path, address: str, port: int) -> subprocess.Popen:
    """sshd in the foreground (-D), so that the fixture owns its process; waits until it accepts connections."""
    host_key = folder / f"host_key_{address}"
    _keygen(host_key)
    config = folder / f"sshd_{address}.conf"
    config.write_text(
        f"ListenAddress {address}:{port}\n"
        f"HostKey {host_key}\n"
        f"PidFile {folder / f'sshd_{address}.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "UsePAM no\n"
        # The temporary folder's parents are not root's alone: strict mode would refuse the key.
        "StrictModes no\n"
    )
    log = folder / f"sshd_{address}.log"
    process = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)])
    deadline = time.time() + 15
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.skip(f"sshd on {address} exited ({process.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return process
        time.sleep(0.1)
    process.terminate()
    pytest.skip(f"sshd on {address}:{port} did not accept connections within 15 s: {_tail(log)}")


def _ssh_wrapper(folder: Path) -> Path:
    """A folder holding `ssh`, which runs the real one with the known hosts and config in `folder`."""
    config = folder / "ssh_config"
    # BatchMode: never prompt; LogLevel ERROR: no "Permanently added ... to the list of known hosts" lines.
    config.write_text("BatchMode yes\nLogLevel ERROR\n")
    bin_folder = folder / "bin"
    bin_folder.mkdir(exist_ok=True)
    wrapper = bin_folder / "ssh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {SSH} -F {config} -o UserKnownHostsFile={folder / 'known_hosts'} "
        '-o GlobalKnownHostsFile=/dev/null "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_folder


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(lines[-3:]) or "no log"
