"""Keeping off stderr the lines C++ libraries print there that tell a user nothing -- LiteRT's "INFO: Created
TensorFlow Lite XNNPACK delegate for CPU.", TensorFlow's CUDA plugin registrations on a machine without CUDA --
while everything else they print there still gets through."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

# LiteRT prints this on stderr the first time a process creates an interpreter; it is not news to anyone.
LITERT_INFO_LINE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
# What a C++ library built on absl prints before its first log line when nobody set absl's logging up.
ABSL_UNINITIALIZED_LINE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_STDERR_LOCK = threading.RLock()  # nested: the inner block's lines pass through the outer's filter too


@contextlib.contextmanager
def stderr_without(noise: Callable[[bytes], bool]) -> Iterator[None]:
    """Run the block with file descriptor 2 going into a pipe, then pass on every line written there for which
    `noise(line)` (the line without its end) is false. (A pipe and a thread that drains it, rather than a
    temporary file: importing tempfile would add to `pipeline label`'s cold start.)"""
    with _STDERR_LOCK:
        if sys.stderr is not None:
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to filter
            saved = None
        if saved is None:
            yield
            return
        read_end, write_end = os.pipe()
        chunks: list[bytes] = []
        drain = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 1 << 16), b"")))
        drain.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last write end closes: the drain reads to its end
            os.close(saved)
            drain.join()
            os.close(read_end)
            lines = b"".join(chunks).splitlines(keepends=True)
            rest = b"".join(line for line in lines if not noise(line.rstrip(b"\r\n")))
            while rest:
                rest = rest[os.write(2, rest) :]
