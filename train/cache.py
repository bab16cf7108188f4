"""The on-disk data cache: every source image decoded once, through serve's preprocessing, into fixed-size raw uint8
shards that training reads image by image with positioned reads, so no process ever holds a whole data set.

    <cache_dir>/<key>/
      manifest.json      format, source, input size, channels, class names, the source files (name, size, mtime,
                         label), per split counts, shard size, the data fingerprint; written last
      train-00000.u8     the images of up to SHARD_IMAGES source items, height*width*channels bytes each, back to back
      train-00000.json   its sidecar: image count, the .u8's sha256, labels, files skipped, source files' sha256,
                         and a checksum of all that
      test-00000.u8 ...  (Fashion-MNIST's test split)
    <cache_dir>/<key>.lock         share-locked by every process using the cache, for as long as it can read it
    <cache_dir>/<key>.write.lock   held while a process writes or verifies the cache

The key hashes the source's identity and listing (file names, sizes, mtimes), the input size, channels, the shard
size and CACHE_VERSION: a folder whose files change, or another input size, is another cache. A shard is used only
when its sidecar exists and matches its checksum, and the shard's size is right and its sha256 matches (checked
whenever the cache is opened, as is the manifest's checksum); anything else is decoded again. Shards are written in
order, each atomically and its sidecar after it, so an interrupted ingest continues at the first missing shard and
ends with the same bytes an uninterrupted one writes. A reader reads the shard files it opened to check them, and
holds the shared lock until it is garbage-collected, so `pipeline cache --remove` refuses a cache in use.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import operator
import os
import re
import shutil
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.errors import ImageError, PipelineError
from serve.files import atomic_path, read_regular_file, shown, write_atomic
from serve.preprocess import MAX_IMAGE_BYTES, in_order, to_pixels

FORMAT = "edge-pipeline data cache"
# Bump when serve's preprocessing or this layout changes what a cache holds, so that older caches are never read.
# 3: the manifest and each sidecar carry a checksum of their own (labels were covered by none).
CACHE_VERSION = 3
# Source items per shard. 4096 images are 600 MiB at 224x224x3, 3 MiB at 28x28: few files even for ImageNet (313,
# each kept open by the processes reading it), and an interrupted ingest loses at most one shard's work. Tests make
# it small with PIPELINE_CACHE_SHARD_IMAGES.
SHARD_IMAGES = int(os.environ.get("PIPELINE_CACHE_SHARD_IMAGES") or 4096)
CHUNK = 16  # images per task of a decoding thread: handing a task over costs ~20 us, a 64x64 JPEG's decode ~100 us
HASH_THREADS = 4  # hashlib releases the GIL on large buffers: shards are checked in parallel
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
SIDECAR_KEYS = {"items", "count", "sha256", "labels", "skipped", "files", "checksum"}
# A training split up to this size is read into memory once (in_memory_if_small): a shuffled batch then costs one
# numpy gather instead of one read per image. Larger splits stay on disk and are read batch by batch.
IN_MEMORY_BYTES = 256 * 2**20
KEY_NAME = re.compile(r"[0-9a-f]{24}")  # what cache_key gives: a cache directory holds other things too


class CacheError(PipelineError):
    """A data cache that cannot be written or read."""


class CacheInUse(CacheError):
    """A cache that a process holds, so it is not removed. `holders` names them: "PID 4242 (pipeline)"."""

    def __init__(self, folder: Path, holders: str) -> None:
        super().__init__(f"{shown(folder)}: in use by {holders}; not removed")
        self.holders = holders


@dataclass
class Split:
    """One split's items in order: image files, each one of the Source's files (read, hashed and decoded by the
    ingest), or uint8 arrays (Fashion-MNIST's rows) read from `files`, relative name -> sha256."""

    items: Sequence[Path] | np.ndarray
    labels: np.ndarray
    files: dict[str, str]


@dataclass
class Source:
    """A data source as the cache sees it. `read` gives its splits; it is called only when shards must be written."""

    identity: str  # what the source is on this machine: the resolved folder, or the idx files' resolved paths
    root: Path  # the files' names are relative to it
    files: list[Path]  # every source file, in the order of the listing
    labels: list[int | None]  # each file's label (None for a file of many images)
    class_names: list[str]
    read: Callable[[], dict[str, Split]]


@dataclass
class Cache:
    """An opened, checked cache: its splits as views of the shard files, with their labels."""

    folder: Path
    fingerprint: str  # sha256 over each source file's relative name and content sha256
    skipped: list[str]  # source files (relative names) that are not readable images
    splits: dict[str, tuple[ImageView, np.ndarray]]  # name -> (images, int64 labels)


def open_cache(source: Source, size: int, channels: int, cache_dir: Path) -> Cache:
    """The cache of `source` at this input size under `cache_dir`, built (or completed, or repaired) first if needed.

    Concurrent processes (Horovod workers on one host, or hosts sharing a filesystem) take a lock: one writes,
    the others wait, then read what it wrote. The cache's shared lock is held until the last view of it is
    garbage-collected (forked children that inherited it included), so no process removes it while it is read.
    """
    listing = _listing(source)
    key = cache_key(source, listing, size, channels)
    folder, shape = cache_dir / key, (size, size, channels)
    with _writing(folder):
        hold = _Hold(cache_dir / f"{key}.lock", folder)
        cache = _open_complete(folder, shape, hold)
        if cache is None:
            with _locked(cache_dir / f"{key}.write.lock", folder):
                cache = _open_complete(folder, shape, hold) or _build(folder, source, listing, shape, hold)
    return cache


def verify_cache(source: Source, size: int, channels: int, cache_dir: Path) -> None:
    """Check the cache whole, and the source against it: every shard's size and sha256, every sidecar's (labels
    included) and the manifest's checksum, and every source file hashed again and compared with the hash the cache
    recorded while ingesting it. Say what was checked; remove what is damaged, and the shards made from a file edited
    without a change of size or mtime (restored from a backup, say), with the manifest: the next open decodes them
    again."""
    listing = _listing(source)
    key = cache_key(source, listing, size, channels)
    folder, shape = cache_dir / key, (size, size, channels)
    with _writing(folder):
        hold = _Hold(cache_dir / f"{key}.lock", folder)  # no removal while it runs
        with contextlib.closing(hold), _locked(cache_dir / f"{key}.write.lock", folder):
            _verify(source, listing, folder, shape)


def _verify(source: Source, listing: list[list], folder: Path, shape: tuple) -> None:
    paths = sorted(folder.glob("[!.]*-*.json"))
    if not paths:
        return  # nothing cached yet: the ingest hashes each file as it reads it
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        sidecars = list(pool.map(lambda path: _intact_sidecar(path, shape), paths))
    damaged = [path for path, sidecar in zip(paths, sidecars) if sidecar is None]
    manifest_path = folder / "manifest.json"
    manifest = _read_json(manifest_path)
    if manifest is not None and manifest.get("checksum") != _checksum(manifest):
        damaged.append(manifest_path)
    recorded = {name: digest for sidecar in sidecars if sidecar for name, digest in sidecar["files"]}
    names = [entry[0] for entry in listing]
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        fresh = dict(zip(names, pool.map(_file_sha256, source.files)))
    changed = sorted(name for name, digest in recorded.items() if fresh.get(name) != digest)
    stale = [
        path for path, sidecar in zip(paths, sidecars) if sidecar and set(changed) & {n for n, _ in sidecar["files"]}
    ]
    root = shown(source.root)
    if damaged:
        print(
            f"warning: {shown(folder)}: {_listed([path.name for path in damaged])} damaged (size or checksum "
            "wrong); decoding again what they hold",
            file=sys.stderr,
        )
    if changed:
        print(
            f"warning: {root}: {len(changed)} of {len(names)} source files changed since the data cache was built, "
            f"with the same sizes and times ({_listed([shown(name) for name in changed])}); decoding them again",
            file=sys.stderr,
        )
    if damaged or changed:
        # The manifest first: a process that looks meanwhile sees an incomplete cache and waits for the write lock.
        for path in sorted({manifest_path, *damaged, *stale}, key=lambda path: path != manifest_path):
            path.unlink(missing_ok=True)
        return
    what = f"{len(paths)} shard{'s' if len(paths) > 1 else ''} (images and labels)"
    what += " and its manifest" if manifest is not None else ""
    print(f"{root}: {len(names)} source files verified against the data cache, and its {what}", file=sys.stderr)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclass
class CacheEntry:
    """One data cache under a cache directory, as `pipeline cache` lists it."""

    key: str
    path: Path  # its folder; a file for a cache of an older version of this program (KEY.npz)
    source: str  # the folder or files it was decoded from; "" when it has no manifest
    input_shape: tuple[int, int, int] | None  # (size, size, channels), from its manifest
    images: int
    size_bytes: int  # on disk
    last_used: float  # when a process last opened or wrote it (its lock file's time), as time.time() gives
    state: str  # "complete"; "incomplete" (an ingest stopped, or is running); "old version"


def list_caches(cache_dir: Path) -> list[CacheEntry]:
    """The data caches under `cache_dir`, the most recently used first; anything else there is left out."""
    entries = []
    for path in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        key = path.name.split(".", 1)[0]
        if KEY_NAME.fullmatch(key) and path.suffix != ".lock":
            entries.append(_entry(cache_dir, key, path))
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def remove_cache(entry: CacheEntry, cache_dir: Path) -> None:
    """Delete a cache that no process is using (CacheInUse, naming them, if one is). Its lock files stay: a process
    that opened one to wait for this removal must lock the same file as any that comes later."""
    lock = cache_dir / f"{entry.key}.lock"
    with _writing(entry.path):
        # Every process that uses a cache share-locks this file for as long as it uses it; a cache without one was
        # never used by this version.
        fd = os.open(lock, os.O_RDWR) if lock.exists() else None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise CacheInUse(entry.path, _holders(fd)) from None
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        finally:
            if fd is not None:
                os.close(fd)


def _holders(fd: int) -> str:
    """Who holds a lock on the open file `fd`, from /proc/locks, which names each lock's process and its file's device
    and inode. A lock dies with its process, so a reader killed with kill -9 is never named here, nor blocks a removal.
    Processes out of sight (on another host sharing the folder, in another PID namespace) are not named."""
    info = os.fstat(fd)
    where = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    pids = []
    for line in lines:
        # "1: FLOCK  ADVISORY  READ 4242 fe:00:2146386 0 EOF"; a waiter's line has "->" after the number.
        match = re.match(r"\d+: +\w+ +\w+ +\w+ +(\d+) +([0-9a-f]+):([0-9a-f]+):(\d+) ", line)
        if match and (int(match[2], 16), int(match[3], 16), int(match[4])) == where and int(match[1]) > 0:
            pids.append(int(match[1]))
    if not pids:
        return "a process this host cannot name (on another host sharing the folder?)"
    return ", ".join(f"PID {pid}{_command(pid)}" for pid in sorted(set(pids)))


def _command(pid: int) -> str:
    """The process's command name, in brackets; an exited process still named means a process it forked holds the
    lock."""
    try:
        return f" ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:
        return " (exited; a process it forked holds the cache)"


def _entry(cache_dir: Path, key: str, path: Path) -> CacheEntry:
    lock = cache_dir / f"{key}.lock"
    last_used = max(_stat(path).st_mtime, _stat(lock).st_mtime if lock.exists() else 0.0)
    if not path.is_dir():
        return CacheEntry(key, path, "", None, 0, _stat(path).st_size, last_used, "old version")
    size = sum(_stat(file).st_size for file in path.iterdir())
    manifest = _read_json(path / "manifest.json")
    if manifest is None:
        return CacheEntry(key, path, "", None, 0, size, last_used, "incomplete")
    if manifest.get("format") != FORMAT or manifest.get("version") != CACHE_VERSION:
        return CacheEntry(key, path, "", None, 0, size, last_used, "old version")
    shape = (manifest["input_size"], manifest["input_size"], manifest["channels"])
    images = sum(split["images"] for split in manifest["splits"].values())
    return CacheEntry(key, path, _source_name(manifest["source"]), shape, images, size, last_used, "complete")


def _stat(path: Path) -> os.stat_result:
    """The file's stat; zeros for one gone meanwhile (a temp file renamed by a running ingest)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return os.stat_result((0,) * 10)


def _source_name(identity: str) -> str:
    """A source's identity as a person reads it: a folder, or the folder of a data set's files."""
    return shown(os.path.commonpath(json.loads(identity)) if identity.startswith("[") else identity)


def cache_key(source: Source, listing: list[list], size: int, channels: int) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, CACHE_VERSION, source.identity, size, channels, SHARD_IMAGES]).encode())
    for entry in listing:
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()[:24]


class ImageView:
    """Cached images as a read-only uint8 (N, H, W, C) array-like: indexing reads them from the shard files.

    view[i] is one (H, W, C) image; view[a:b], view[indices] and view[mask] are (n, H, W, C) arrays in the order
    asked, as numpy would give them. A batch costs one read per run of consecutive images. Safe to read from
    several threads, and in forked processes (which read the files they inherited). While any view of a cache
    exists, its files stay open and its shared lock held.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, files: _ShardFiles, indices: np.ndarray) -> None:
        self._files, self._indices = files, indices
        self.shape: tuple[int, int, int, int] = (len(indices), *files.image_shape)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, key: int | slice | np.ndarray | list) -> np.ndarray:
        if isinstance(key, tuple):
            raise TypeError("ImageView takes one index: an integer, a slice, or an array of indices or booleans")
        if isinstance(key, (int, np.integer)):
            index = operator.index(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of bounds for {len(self)} images")
            return self._files.read(self._indices[[index]])[0]
        if isinstance(key, slice):
            return self._files.read(self._indices[key])
        picked = self._indices[_index_array(key)]  # numpy's own rules: negative indices, masks, bounds
        return self._files.read(picked.ravel()).reshape(*picked.shape, *self.shape[1:])

    def subset(self, indices: np.ndarray) -> ImageView:
        """A view of some of these images, in the order of `indices`; nothing is read."""
        return ImageView(self._files, self._indices[_index_array(indices)])

    def __array__(self, dtype=None, copy=None):
        # Without this numpy would build an array image by image through __getitem__: a whole data set in memory.
        raise TypeError(
            f"refusing to load all {len(self)} cached images into one array; index the view (view[a:b]) instead"
        )


def in_memory_if_small(images: ImageView, limit: int = IN_MEMORY_BYTES) -> ImageView | np.ndarray:
    """`images` as one array when they take at most `limit` bytes; else the view itself, read when indexed."""
    return images[:] if math.prod(images.shape) <= limit else images


def _index_array(key) -> np.ndarray:
    key = np.asarray(key)
    if key.size == 0 and key.dtype != bool:
        return key.astype(np.intp)  # [] is an empty list of indices
    if key.dtype.kind not in "iub":
        raise IndexError(f"ImageView indices must be integers or booleans, not {key.dtype}")
    return key


class _ShardFiles:
    """The shard files of one split, read with os.pread (no shared offset: threads and forked children read the same
    open files). They were opened to be checked, so what is read is what was checked, whatever happens to the paths
    later. The files and the cache's shared lock are closed when this is garbage-collected."""

    def __init__(
        self, paths: list[Path], fds: list[int], counts: list[int], image_shape: tuple[int, int, int], hold: _Hold
    ) -> None:
        self.paths, self.image_shape, self._fds, self._hold = paths, image_shape, fds, hold
        self.image_bytes = math.prod(image_shape)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        weakref.finalize(self, _close_all, list(fds))

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images at `indices` (into the split), in that order."""
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        if not len(indices):
            return out
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        shards = np.searchsorted(self.starts, wanted, side="right") - 1
        # A run of images read at once ends where the next one is not the following image of the same shard.
        ends = [*(np.flatnonzero((np.diff(wanted) != 1) | (np.diff(shards) != 0)) + 1), len(wanted)]
        begin = 0
        for end in ends:
            shard = int(shards[begin])
            offset = int(wanted[begin] - self.starts[shard]) * self.image_bytes
            data = self._pread(shard, (end - begin) * self.image_bytes, offset)
            out[order[begin:end]] = np.frombuffer(data, np.uint8).reshape(end - begin, *self.image_shape)
            begin = end
        return out

    def _pread(self, shard: int, length: int, offset: int) -> bytes:
        parts, done = [], 0
        while done < length:
            part = os.pread(self._fds[shard], length - done, offset + done)
            if not part:
                raise CacheError(f"{self.paths[shard]}: cache shard shorter than its record (changed while in use?)")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _listing(source: Source) -> list[list]:
    """[relative name, size, mtime_ns] of every source file: what finds the cache without reading contents."""
    listing = []
    for path in source.files:
        try:
            info = path.stat()
        except OSError as err:
            raise CacheError(f"{path}: cannot read ({err.strerror})") from None
        listing.append([str(path.relative_to(source.root)), info.st_size, info.st_mtime_ns])
    return listing


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """OS errors while using the cache as one line naming its folder; a full disk says what to do."""
    try:
        yield
    except OSError as err:
        if err.errno in DISK_FULL:
            raise CacheError(
                f"{folder}: disk full while writing the data cache ({err.strerror}); free space there or set "
                "cache_dir to another disk, then run again: it continues where it stopped"
            ) from None
        raise CacheError(f"{folder}: cannot use the data cache ({err.strerror}: {err.filename})") from None


class _Hold:
    """A shared lock on a cache's `<key>.lock`, kept until this is closed or garbage-collected. Every view of the
    cache refers to it, so `pipeline cache --remove`, which needs the lock exclusively, refuses the cache for as long
    as anything can read it. A forked child inherits the open file and with it the lock; flock's lock dies with the
    last process holding the file, kill -9 included."""

    def __init__(self, path: Path, folder: Path) -> None:
        fd = _lock(path, folder, fcntl.LOCK_SH)
        os.utime(fd)  # when the cache was last used: what `pipeline cache` shows
        self.close = weakref.finalize(self, os.close, fd)


@contextlib.contextmanager
def _locked(path: Path, folder: Path) -> Iterator[None]:
    """An exclusive lock on `path` meanwhile: the one process writing or verifying the cache."""
    fd = _lock(path, folder, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(path: Path, folder: Path, mode: int) -> int:
    """`path` opened (created if need be) and flock'ed in `mode`, waiting, and saying so, while another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{shown(folder)}: waiting for another process using the data cache", file=sys.stderr)
            fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _checksum(record: dict) -> str:
    """The sha256 of a manifest's or sidecar's fields other than "checksum", as the canonical JSON they were written
    in (names that are not UTF-8 are \\udcxx escapes there)."""
    body = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _shard_path(folder: Path, split: str, index: int, suffix: str) -> Path:
    return folder / f"{split}-{index:05d}{suffix}"


def _shard_ranges(items: int) -> list[tuple[int, int]]:
    return [(start, min(start + SHARD_IMAGES, items)) for start in range(0, items, SHARD_IMAGES)]


def _check_shard(
    folder: Path, split: str, index: int, items: int, shape: tuple, files: dict[str, str], warn: bool
) -> tuple[dict, int] | None:
    """The shard's sidecar and the shard opened, if the shard is complete and intact: sidecar present and matching its
    checksum, shard size right, sha256 matching, and made from these `files` (where known). Otherwise None, with a
    warning (if `warn`) when the shard or its sidecar was damaged."""
    path = _shard_path(folder, split, index, ".json")
    sidecar = _read_json(path)
    if sidecar is None or not SIDECAR_KEYS <= sidecar.keys():
        return None  # never finished: decoded again silently
    if sidecar["checksum"] != _checksum(sidecar):
        if warn:
            print(
                f"warning: {shown(path)}: damaged cache shard record (checksum wrong); decoding it again",
                file=sys.stderr,
            )
        return None
    if sidecar["items"] != items or len(sidecar["labels"]) != sidecar["count"]:
        return None
    if not set(files.items()) <= {tuple(entry) for entry in sidecar["files"]}:
        return None  # made from other contents of these files
    data = _shard_path(folder, split, index, ".u8")
    fd = _open_intact(data, sidecar, shape)
    if fd is None and warn:
        print(
            f"warning: {shown(data)}: damaged cache shard (size or checksum wrong); decoding it again", file=sys.stderr
        )
    return None if fd is None else (sidecar, fd)


def _open_intact(data: Path, sidecar: dict, shape: tuple) -> int | None:
    """The shard file opened if its size and sha256 are those its sidecar records, else None. The open file itself is
    hashed: it is what will be read."""
    try:
        fd = os.open(data, os.O_RDONLY)
    except OSError:
        return None
    try:
        with open(fd, "rb", closefd=False) as f:
            if os.fstat(fd).st_size == sidecar["count"] * math.prod(shape):
                if hashlib.file_digest(f, "sha256").hexdigest() == sidecar["sha256"]:
                    return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _intact_sidecar(path: Path, shape: tuple) -> dict | None:
    """A sidecar (found by name) if it and its shard are intact, else None."""
    sidecar = _read_json(path)
    if sidecar is None or not SIDECAR_KEYS <= sidecar.keys() or sidecar["checksum"] != _checksum(sidecar):
        return None
    fd = _open_intact(path.with_suffix(".u8"), sidecar, shape)
    if fd is None:
        return None
    os.close(fd)
    return sidecar


def _open_complete(folder: Path, shape: tuple, hold: _Hold) -> Cache | None:
    """The cache in `folder` if its manifest and every shard are intact, else None (nothing is written)."""
    manifest = _read_json(folder / "manifest.json")
    if manifest is None or manifest.get("format") != FORMAT or manifest.get("version") != CACHE_VERSION:
        return None  # none yet, or another version's
    if manifest.get("checksum") != _checksum(manifest):
        return None  # damaged: _build says so and writes it again
    plan = [
        (name, index, end - start)
        for name, counts in manifest["splits"].items()
        for index, (start, end) in enumerate(_shard_ranges(counts["items"]))
    ]
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        checked = list(pool.map(lambda p: _check_shard(folder, *p, shape, {}, warn=False), plan))
    if any(shard is None for shard in checked):
        _close_all([shard[1] for shard in checked if shard is not None])
        return None
    return _assemble(folder, manifest, plan, checked, shape, hold)


def _assemble(
    folder: Path, manifest: dict, plan: list[tuple], checked: list[tuple[dict, int]], shape: tuple, hold: _Hold
) -> Cache:
    splits, skipped = {}, []
    for name in manifest["splits"]:
        mine = [(index, *shard) for (split, index, _), shard in zip(plan, checked) if split == name]
        files = _ShardFiles(
            [_shard_path(folder, name, index, ".u8") for index, _, _ in mine],
            [fd for _, _, fd in mine],
            [sidecar["count"] for _, sidecar, _ in mine],
            shape,
            hold,
        )
        labels = np.array([label for _, s, _ in mine for label in s["labels"]], dtype=np.int64)
        splits[name] = (ImageView(files, np.arange(len(labels))), labels)
        skipped += [entry for _, s, _ in mine for entry in s["skipped"]]
    return Cache(folder, manifest["fingerprint"], skipped, splits)


def _build(folder: Path, source: Source, listing: list[list], shape: tuple, hold: _Hold) -> Cache:
    """Write what is missing or damaged in `folder`, then the manifest. Called holding the write lock."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*"):  # temp files of a write that was killed
        stale.unlink()
    old = _read_json(folder / "manifest.json")
    if old is not None and old.get("version") == CACHE_VERSION and old.get("checksum") != _checksum(old):
        print(
            f"warning: {shown(folder / 'manifest.json')}: damaged (checksum wrong); writing it again", file=sys.stderr
        )
    splits = source.read()
    plan = [
        (name, index, end - start)
        for name, split in splits.items()
        for index, (start, end) in enumerate(_shard_ranges(len(split.items)))
    ]
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        checked = list(pool.map(lambda p: _check_shard(folder, *p, shape, splits[p[0]].files, warn=True), plan))
    todo = [i for i, shard in enumerate(checked) if shard is None]
    names = {path: entry[0] for path, entry in zip(source.files, listing)}  # relative names, found once
    try:
        for i, sidecar in zip(todo, _ingest(folder, names, splits, [plan[i] for i in todo], len(plan), shape)):
            checked[i] = (sidecar, os.open(_shard_path(folder, *plan[i][:2], ".u8"), os.O_RDONLY))  # as just written
    except BaseException:
        _close_all([shard[1] for shard in checked if shard is not None])
        raise

    hashes = {name: digest for sidecar, _ in checked for name, digest in sidecar["files"]}
    images = collections.Counter()
    for (name, _, _), (sidecar, _) in zip(plan, checked):
        images[name] += sidecar["count"]
    manifest = {
        "format": FORMAT,
        "version": CACHE_VERSION,
        "source": source.identity,
        "input_size": shape[0],
        "channels": shape[2],
        "class_names": source.class_names,
        "files": [[*entry, label] for entry, label in zip(listing, source.labels)],
        "splits": {name: {"items": len(split.items), "images": images[name]} for name, split in splits.items()},
        "shard_images": SHARD_IMAGES,
        "fingerprint": fingerprint(names, hashes),
    }
    manifest["checksum"] = _checksum(manifest)
    write_atomic(folder / "manifest.json", json.dumps(manifest, sort_keys=True))
    return _assemble(folder, manifest, plan, checked, shape, hold)


def fingerprint(names: dict[Path, str], hashes: dict[str, str]) -> str:
    """sha256 over each source file's name (relative to the source's root, as the bytes the filesystem holds) and
    content sha256, in path order."""
    digest = hashlib.sha256()
    for path in sorted(names):
        name = names[path]
        digest.update(os.fsencode(name) + b"\0")
        digest.update(bytes.fromhex(hashes[name]))
    return digest.hexdigest()


def _ingest(
    folder: Path, names: dict[Path, str], splits: dict[str, Split], todo: list[tuple], shards: int, shape: tuple
) -> Iterator[dict]:
    """Decode and write the shards in `todo`, in order, yielding each one's sidecar once it is written.

    Threads decode, this thread writes: Pillow, hashlib and file reads release the GIL, so threads decode in
    parallel with no process to start, nothing to pickle back, and no fork of a process whose TensorFlow threads
    run (which can deadlock the child)."""
    size, channels = shape[0], shape[2]
    tasks = []
    for name, index, items in todo:
        first = index * SHARD_IMAGES
        for start in range(first, first + items, CHUNK):
            tasks.append((splits[name].items[start : min(start + CHUNK, first + items)], size, channels))
    threads = min(len(os.sched_getaffinity(0)), len(tasks))
    total = sum(items for _, _, items in todo)
    kept = f", {shards - len(todo)} of {shards} shards already written" if len(todo) < shards else ""
    plural = "s" if threads > 1 else ""
    print(f"data cache {folder}: decoding {total} images ({threads} thread{plural}{kept})", file=sys.stderr)
    progress = _Progress(total)
    with concurrent.futures.ThreadPoolExecutor(threads, "cache-decode") as pool:
        try:
            results = in_order(pool, _decode_chunk, tasks, ahead=4 * threads)
            for name, index, items in todo:
                yield _write_shard(folder, name, index, items, splits[name], names, results, progress)
        finally:
            pool.shutdown(cancel_futures=True)  # on an error, what is queued is not decoded for nothing


def _write_shard(
    folder: Path,
    name: str,
    index: int,
    items: int,
    split: Split,
    names: dict[Path, str],
    results: Iterator,
    progress: _Progress,
) -> dict:
    digest, labels, skipped, files = hashlib.sha256(), [], [], []
    first = index * SHARD_IMAGES
    with atomic_path(_shard_path(folder, name, index, ".u8")) as tmp, open(tmp, "wb") as out:
        for start in range(first, first + items, CHUNK):
            chunk = next(results)
            for i, (pixels, file_digest) in enumerate(chunk, start):
                item_name = None if file_digest is None else names[split.items[i]]
                if item_name is not None:
                    files.append([item_name, file_digest])
                if pixels is None:
                    skipped.append(item_name)
                    continue
                out.write(pixels)
                digest.update(pixels)
                labels.append(int(split.labels[i]))
            progress.advance(len(chunk))
    sidecar = {
        "items": items,
        "count": len(labels),
        "sha256": digest.hexdigest(),
        "labels": labels,
        "skipped": skipped,
        "files": files + [[file, file_digest] for file, file_digest in split.files.items()],
    }
    sidecar["checksum"] = _checksum(sidecar)
    write_atomic(_shard_path(folder, name, index, ".json"), json.dumps(sidecar, sort_keys=True))
    return sidecar


def _decode_chunk(task: tuple) -> list[tuple[np.ndarray | None, str | None]]:
    """(pixels or None if not a readable image, the file's sha256 or None for an array) per item. Runs in a
    decoding thread: a file is read once, for both its hash and its pixels."""
    items, size, channels = task
    return [_decode(item, size, channels) for item in items]


def _decode(item: Path | np.ndarray, size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    if isinstance(item, np.ndarray):
        return to_pixels(item, size, size, channels), None
    try:
        data = read_regular_file(str(item), MAX_IMAGE_BYTES, "an image", ImageError)
    except ImageError:  # too large or unreadable: skipped, hashed as far as it can be read
        return None, _file_sha256(item)
    try:
        pixels = to_pixels(data, size, size, channels)
    except ImageError:
        pixels = None
    return pixels, hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, read in blocks; that of nothing for a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return hashlib.sha256().hexdigest()


class _Progress:
    """count/total, images/s and ETA on stderr: rewritten in place on a terminal, a line every ~10% otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.terminal = sys.stderr.isatty()
        self.shown_at, self.step = 0.0, max(total / 10, 1)
        self.next_line = self.step

    def advance(self, count: int) -> None:
        self.done += count
        now, finished = time.monotonic(), self.done >= self.total
        if self.terminal and not finished and now - self.shown_at < 0.2:
            return
        if not self.terminal and not finished and self.done < self.next_line:
            return
        while self.next_line <= self.done:
            self.next_line += self.step
        self.shown_at = now
        rate = self.done / max(now - self.started, 1e-6)
        eta = (self.total - self.done) / rate
        line = f"decoded {self.done}/{self.total} images, {rate:.0f} images/s, ETA {eta:.0f} s"
        if self.terminal:
            print(f"\r{line}", end="\n" if finished else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
