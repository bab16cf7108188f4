"""Safe file I/O for serve and every stage: capped reads of regular files, and atomic writes.

Reads take regular files only, of a bounded size, so /dev/zero, a named pipe or a huge file is a one-line
error instead of a hang or a process that runs out of memory. Writes go to a temporary file beside the target,
then a rename, so a crash never leaves half a file. (No pathlib or tempfile: `pipeline label` imports this.)
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from serve.errors import PipelineError

MiB = 1 << 20
# A file name's bytes that are not UTF-8 reach Python as the surrogates U+DC80..U+DCFF (surrogateescape, whatever the
# locale), which no output encoding, nor JSON, can hold: each is shown as the byte it stands for, \xff.
UNDECODABLE_BYTES = {0xDC00 + byte: f"\\x{byte:02x}" for byte in range(0x80, 0x100)}

_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_regular_file(path: str, limit: int, kind: str, error: type[PipelineError]) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; else `error("<path>: <problem>")`.

    `kind` says what the file should be, e.g. "an image". Special files are refused from their stat, before
    they are opened: opening a named pipe would wait for a writer, and opening some devices has effects.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    _check(path, info, limit, kind, error)
    try:
        # O_NONBLOCK: should a named pipe replace the file after the stat, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        _check(path, info, limit, kind, error)
        # os.read of the stated size and a byte more: one system call for the whole file (a file object costs two
        # more, and read(limit) would allocate the whole limit). Reads on past a short read or a file that grew
        # meanwhile, which is still cut off at the limit.
        parts = [os.read(fd, min(info.st_size, limit) + 1)]
        size = len(parts[0])
        while size != info.st_size and size <= limit:
            parts.append(os.read(fd, min(limit + 1 - size, MiB)))
            if not parts[-1]:
                break
            size += len(parts[-1])
        data = b"".join(parts)
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path}: larger than {limit // MiB} MiB, too large for {kind}")
    return data


def _check(path: str, info: os.stat_result, limit: int, kind: str, error: type[PipelineError]) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: is {_FILE_TYPES.get(stat.S_IFMT(info.st_mode), 'a special file')}, not {kind}")
    if info.st_size > limit:
        raise error(f"{path}: larger than {limit // MiB} MiB, too large for {kind}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same suffix, hidden); on success rename it over `path`."""
    directory, name = os.path.split(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    stem, suffix = os.path.splitext(name)
    tmp = os.path.join(directory, f".{stem}.{os.urandom(6).hex()}.tmp{suffix}")
    # Created by the kernel with mode 0o666 less the process's umask at this moment: the permissions the
    # target would get from a plain open(). O_EXCL: never someone else's file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def shown(name: str | os.PathLike) -> str:
    """A file name as text any output (and UTF-8, so JSON) can hold: its bytes that are not UTF-8 written \\xff."""
    return os.fspath(name).translate(UNDECODABLE_BYTES)
