"""Atomic file writes: write beside the target, then rename, so a crash never leaves half a file.
And a lock per run directory, so two processes never write one run at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serve.errors import RunLockedError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def run_lock(run: str | Path, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on run directory `run` for the duration (fcntl.flock on a hidden file beside it,
    `<runs_dir>/.<name>.lock`, so deleting and re-creating the run keeps the lock). Raises RunLockedError
    when another process holds it: "<run>: in use by PID 1234 (training); wait for it to finish or use another --name".

    The lock file stays (deleted, a process that had opened it could lock a file no one else sees); the kernel
    drops the lock when its holder exits, even by kill -9, so a lock is never stale.
    """
    run = Path(run)
    run.parent.mkdir(parents=True, exist_ok=True)  # runs_dir, for the lock file: the run is about to be written
    fd = os.open(run.parent / f".{run.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, what = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
            holder = f"PID {pid} ({what})" if pid.isdigit() else "another process"  # it may not have written yet
            raise RunLockedError(f"{run}: in use by {holder}; wait for it to finish or use another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # before unlocking: no later refusal may name this process
    finally:
        os.close(fd)
