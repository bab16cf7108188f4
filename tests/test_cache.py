"""The on-disk data cache: found without reading the sources, rebuilt when they change, resumed after a kill,
repaired when damaged, one clear line on a full disk, and views that index like numpy arrays."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from serve.errors import ImageError
from serve.preprocess import to_pixels
from tests.conftest import PIPELINE, ROOT, make_image_folder, run_pipeline
from train import cache
from train.data import (
    cap_per_class,
    data_source,
    find_fashion_mnist,
    load_dataset,
    read_idx,
    scan_image_folder,
    verify_data,
)

# Loads a folder's data set in a process of its own (what `pipeline train` does first, without TensorFlow).
LOAD = [
    sys.executable,
    "-c",
    "import sys; from pipeline.config import load_config; from train.data import load_dataset; "
    "load_dataset(load_config(None, {'data': sys.argv[1], 'input_size': 24, 'channels': 3, 'cache_dir': sys.argv[2]}))",
]


def folder_config(root: Path, cache_dir: Path, **changes) -> dict:
    return load_config(
        None, {"data": str(root), "input_size": 24, "channels": 3, "cache_dir": str(cache_dir), **changes}
    )


def decoded(stderr: str) -> list[int]:
    """The image counts each ingest reported decoding."""
    return [int(n) for n in re.findall(r"decoding (\d+) images", stderr)]


def cache_folder(cache_dir: Path) -> Path:
    """The one cache in `cache_dir`."""
    (folder,) = [path for path in cache_dir.iterdir() if path.is_dir()]
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def content_fingerprint(root: Path) -> str:
    """sha256 over each source file's relative name and content hash, in path order, computed independently."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def edit_keeping_size_and_time(path: Path) -> None:
    """New pixels in a BMP (fixed size for its dimensions), with its old mtime put back: only the content changes."""
    before = path.stat()
    image = Image.open(path)
    Image.fromarray(255 - np.asarray(image)).save(path, format="BMP")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_second_run_finds_the_cache_without_reading_the_sources(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes", per_class=6)
    config = folder_config(root, tmp_path / "cache")
    first = load_dataset(config)
    assert decoded(capsys.readouterr().err) == [18]
    assert first.fingerprint == content_fingerprint(root)  # hashed while decoding, as before the cache

    edited = root / "blue_stripes" / "003.bmp"
    edit_keeping_size_and_time(edited)
    second = load_dataset(config)
    assert decoded(capsys.readouterr().err) == []
    # The old pixels and the old fingerprint: the edited file's contents were neither decoded nor hashed.
    assert second.fingerprint == first.fingerprint != content_fingerprint(root)
    for split in ("train", "val"):
        assert np.array_equal(getattr(second, f"{split}_x")[:], getattr(first, f"{split}_x")[:])


def test_verify_data_catches_a_silent_edit_and_rebuilds_the_cache(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes", per_class=6)
    cache_dir = tmp_path / "cache"
    load_dataset(folder_config(root, cache_dir))
    edit_keeping_size_and_time(root / "blue_stripes" / "003.bmp")

    result = run_pipeline(
        "train",
        "--data",
        str(root),
        "--name",
        "verified",
        "--verify-data",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        *("--set", "input_size=24", "--set", "channels=3", "--set", f"cache_dir={cache_dir}"),
        *("--set", f"runs_dir={tmp_path / 'runs'}"),
    )
    assert "1 of 18 source files changed since the data cache was built" in result.stderr
    assert "blue_stripes/003.bmp" in result.stderr and decoded(result.stderr) == [18]
    data_json = json.loads((tmp_path / "runs" / "verified" / "data.json").read_text())
    assert data_json["fingerprint"] == content_fingerprint(root)

    verify_data(folder_config(root, cache_dir))
    assert "18 source files verified against the data cache" in capsys.readouterr().err


def test_changed_folder_input_size_or_version_is_another_cache(tmp_path, capsys, monkeypatch):
    root = make_image_folder(tmp_path / "shapes", per_class=5)
    cache_dir = tmp_path / "cache"
    load_dataset(folder_config(root, cache_dir))
    assert decoded(capsys.readouterr().err) == [15]

    changes = {
        "file added": lambda: Image.new("RGB", (30, 30), (0, 0, 230)).save(root / "blue_stripes" / "new.png"),
        "file removed": lambda: (root / "green_discs" / "001.jpg").unlink(),
        "file edited": lambda: Image.new("RGB", (33, 33), (9, 9, 9)).save(root / "red_squares" / "000.png"),
    }
    for change, apply in changes.items():
        apply()
        data = load_dataset(folder_config(root, cache_dir))
        files = sum(len(paths) for paths in scan_image_folder(root)[1])
        assert decoded(capsys.readouterr().err) == [files], change
        assert len(data.train_y) + len(data.val_y) == files and data.fingerprint == content_fingerprint(root)
    # The edited image is the one now in the cache.
    reference = to_pixels(root / "red_squares" / "000.png", 24, 24, 3)
    assert any(np.array_equal(image, reference) for image in np.concatenate([data.train_x[:], data.val_x[:]]))
    assert len(list(cache_dir.glob("*/manifest.json"))) == 4

    for other in ({"input_size": 20}, {"channels": 1}):
        data = load_dataset(folder_config(root, cache_dir, **other))
        assert decoded(capsys.readouterr().err) == [files]
        assert data.train_x.shape[1:] == (other.get("input_size", 24),) * 2 + (other.get("channels", 3),)
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    load_dataset(folder_config(root, cache_dir))
    assert decoded(capsys.readouterr().err) == [files]
    assert len(list(cache_dir.glob("*/manifest.json"))) == 7


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory) -> Path:
    """900 images large enough that decoding them takes a while (about a second on two cores)."""
    return make_image_folder(tmp_path_factory.mktemp("large") / "shapes", per_class=300, size=160)


def test_killed_ingest_resumes_and_ends_byte_identical(tmp_path, large_folder):
    root = large_folder
    env = {**os.environ, "PIPELINE_CACHE_SHARD_IMAGES": "40"}  # 23 shards
    subprocess.run([*LOAD, str(root), str(tmp_path / "straight")], env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    worker = subprocess.Popen(
        [*LOAD, str(root), str(killed)], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while not list(killed.glob("*/train-00000.json")) and worker.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(worker.pid, signal.SIGKILL)  # the loader and its decoding processes, as a kill -9 of the job
    worker.wait()
    assert worker.returncode == -signal.SIGKILL, "the ingest ended before it could be interrupted"
    folder = cache_folder(killed)
    assert not (folder / "manifest.json").exists()

    result = subprocess.run([*LOAD, str(root), str(killed)], env=env, check=True, capture_output=True, text=True)
    (count,) = decoded(result.stderr)
    assert 0 < count < 900 and "shards already written" in result.stderr
    straight = cache_folder(tmp_path / "straight")
    assert straight.name == folder.name
    assert files_of(folder) == files_of(straight)  # no temp file left over, every shard and sidecar the same


def test_damaged_shard_is_detected_and_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_IMAGES", 8)
    root = make_image_folder(tmp_path / "shapes", per_class=8)
    config = folder_config(root, tmp_path / "cache")
    first = load_dataset(config)
    first_train, first_val = first.train_x[:], first.val_x[:]
    folder = cache_folder(tmp_path / "cache")
    intact = files_of(folder)
    shard = folder / "train-00001.u8"
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 0x01
    shard.write_bytes(bytes(damaged))
    capsys.readouterr()

    again = load_dataset(config)
    err = capsys.readouterr().err
    assert f"{shard}: damaged cache shard" in err and decoded(err) == [8]
    assert np.array_equal(again.train_x[:], first_train) and np.array_equal(again.val_x[:], first_val)
    assert files_of(folder) == intact


def test_disk_full_during_ingest_is_one_line_and_the_next_run_continues(tmp_path, capsys, monkeypatch):
    # 44 files in shards of 16: blue_stripes' 10 images and 6 of its 14 unreadable files, 8 unreadable files and 8
    # images, 12 images. At 24x24x3 the third shard (20,736 bytes) is the one larger than the limit below.
    root = make_image_folder(tmp_path / "shapes", per_class=10)
    for i in range(14):
        (root / "blue_stripes" / f"broken{i:02d}.jpg").write_bytes(b"not a picture")
    cache_dir = tmp_path / "cache"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run(
        [*PIPELINE, "train", "--data", str(root), "--set", "input_size=24", "--set", "channels=3"]
        + ["--set", f"cache_dir={cache_dir}", "--set", f"runs_dir={tmp_path / 'runs'}"],
        cwd=ROOT,
        env={**os.environ, "PIPELINE_CACHE_SHARD_IMAGES": "16"},
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
    )
    folder = cache_folder(cache_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {folder}: disk full while writing the data cache"), result.stderr
    # Nothing half-written: two shards complete with their sidecars, no temp file, no manifest.
    assert sorted(files_of(folder)) == ["train-00000.json", "train-00000.u8", "train-00001.json", "train-00001.u8"]

    monkeypatch.setattr(cache, "SHARD_IMAGES", 16)
    data = load_dataset(folder_config(root, cache_dir))
    err = capsys.readouterr().err
    assert decoded(err) == [12] and "2 of 3 shards already written" in err
    assert len(data.train_y) + len(data.val_y) == 30 and len(data.skipped) == 14


def test_two_processes_ingest_once(tmp_path, large_folder):
    workers = [
        subprocess.Popen([*LOAD, str(large_folder), str(tmp_path)], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    errs = sorted((worker.communicate()[1] for worker in workers), key=lambda err: decoded(err) == [])
    assert [worker.returncode for worker in workers] == [0, 0], errs
    # One decoded (having waited at most for the other's first look); the other waited for its lock, then read
    # its cache without decoding anything. Which one is the kernel's choice.
    assert decoded(errs[0]) == [900], errs
    assert decoded(errs[1]) == [] and "waiting for another process using the data cache" in errs[1], errs


def test_script_without_main_guard_ingests_in_threads_beside_running_tensorflow(tmp_path, large_folder):
    # No `if __name__ == "__main__":` in the script, and TensorFlow's thread pools running: the ingest starts no
    # process (a spawned one would import the script again; a forked one could deadlock on TensorFlow's locks).
    script = tmp_path / "ingest.py"
    script.write_text(
        "import sys\n"
        "from pipeline.tensorflow_env import prepare\n"
        "prepare()\n"
        "import tensorflow as tf\n"
        "from pipeline.config import load_config\n"
        "from train.data import load_dataset\n"
        "tf.reduce_sum(tf.matmul(tf.ones((64, 64)), tf.ones((64, 64)))).numpy()\n"
        "config = {'data': sys.argv[1], 'input_size': 24, 'channels': 3, 'cache_dir': sys.argv[2]}\n"
        "data = load_dataset(load_config(None, config))\n"
        "print(len(data.train_y) + len(data.val_y))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), str(large_folder), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["900"] and decoded(result.stderr) == [900]
    assert re.search(r"decoding 900 images \(\d+ threads?\)", result.stderr), result.stderr
    reference = load_dataset(folder_config(large_folder, tmp_path / "reference"))
    script_cache = cache_folder(tmp_path / "cache")
    assert files_of(script_cache) == files_of(cache_folder(tmp_path / "reference"))
    assert len(reference.train_y) + len(reference.val_y) == 900


def test_decoding_threads_refuse_what_serve_refuses_and_leave_warning_filters_as_found(tmp_path, monkeypatch):
    # Pillow warns between 1x and 2x its pixel limit and refuses above; serve refuses both, turning the warning into
    # an error with warnings.catch_warnings, which swaps process-wide state. Threads decoding at once must neither
    # let a warned image through nor leave the process's warning filters changed.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    monkeypatch.setattr(cache, "CHUNK", 1)  # a task per image: the threads interleave as much as they can
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(15):
            side = (300, 400, 500)[i % 3]  # 90,000 pixels: fine; 160,000: warned; 250,000: refused
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.jpg")
    refused = set()
    for path in sorted(root.rglob("*.jpg")):
        try:
            to_pixels(path, 24, 24, 3)
        except ImageError as err:
            assert "too large to decode safely" in str(err)
            refused.add(str(path))
    assert len(refused) == 20  # the warned sizes as well as the refused ones

    filters = list(warnings.filters)
    data = load_dataset(folder_config(root, tmp_path / "cache", val_fraction=0.2))
    assert list(warnings.filters) == filters
    assert set(data.skipped) == refused
    assert len(data.train_y) + len(data.val_y) == 10


def test_fashion_mnist_goes_through_the_cache_at_any_input_size(tmp_path):
    root = find_fashion_mnist(None)
    config = load_config(
        None, {"input_size": 32, "channels": 3, "cache_dir": str(tmp_path), "max_images_per_class": 20}
    )
    data = load_dataset(config)
    assert {path.name.split("-")[0] for path in cache_folder(tmp_path).glob("*.u8")} == {"train", "test"}
    images = read_idx(next(root.glob("t10k-images-idx3-ubyte*")))
    labels = read_idx(next(root.glob("t10k-labels-idx1-ubyte*"))).astype(np.int64)
    keep = cap_per_class(labels, 20, config["seed"])
    assert np.array_equal(data.test_y, labels[keep])
    assert np.array_equal(data.test_x[:], np.stack([to_pixels(images[i], 32, 32, 3) for i in keep]))
    # The fingerprint is what it was before the cache: over the four idx files' names and contents.
    digest = hashlib.sha256()
    for path in sorted(root.glob("*-ubyte*")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    assert data.fingerprint == digest.hexdigest()


def test_pipeline_cache_lists_the_caches_and_removes_one_not_in_use(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes", per_class=4)
    cache_dir = tmp_path / "cache"
    load_dataset(folder_config(root, cache_dir))
    load_dataset(folder_config(root, cache_dir, input_size=32))
    (cache_dir / "android").mkdir()  # the cache directory may hold other things: not listed, never removed
    listed = run_pipeline("cache", "--cache-dir", str(cache_dir)).stdout
    keys = sorted(path.name for path in cache_dir.iterdir() if cache.KEY_NAME.fullmatch(path.name))
    rows = {line.split()[0]: line for line in listed.splitlines() if line.split()[0] in keys}
    assert len(rows) == 2 and "android" not in listed and "2 cache(s)" in listed
    assert sorted(row.split()[1] for row in rows.values()) == ["24x24x3", "32x32x3"]
    images = str(sum(1 for path in root.rglob("*") if path.is_file()))
    assert all(str(root.resolve()) in row and images in row.split() for row in rows.values())
    small = next(key for key, row in rows.items() if "24x24x3" in row)

    # A cache a process is using (a training run holds its lock) is refused, and stays whole.
    fd = os.open(cache_dir / f"{small}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    refused = run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", small, check=False)
    os.close(fd)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"Error: {cache_dir / small}: in use by PID {os.getpid()} (")
    missing = run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", "0" * 24, check=False)
    assert missing.returncode == 1 and "no such data cache" in missing.stderr

    removed = run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", small).stdout
    assert removed.startswith(f"removed {cache_dir / small} (")
    assert not (cache_dir / small).exists() and (cache_dir / "android").is_dir()
    capsys.readouterr()
    load_dataset(folder_config(root, cache_dir, input_size=32))  # the other one is intact: nothing decoded again
    assert decoded(capsys.readouterr().err) == []
    run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", "all")
    assert "no data caches in" in run_pipeline("cache", "--cache-dir", str(cache_dir)).stdout


def test_pipeline_cache_older_than_removes_the_caches_unused_that_long_and_keeps_one_in_use(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=4)
    cache_dir = tmp_path / "cache"
    for size in (24, 32, 40):
        load_dataset(folder_config(root, cache_dir, input_size=size))
    keys = {entry.input_shape[0]: entry.key for entry in cache.list_caches(cache_dir)}
    long_ago = time.time() - 40 * 24 * 3600
    for size in (24, 32):  # unused for 40 days: the cache and its lock file (dated at each use)
        for path in (cache_dir / keys[size], cache_dir / f"{keys[size]}.lock"):
            os.utime(path, (long_ago, long_ago))
    fd = os.open(cache_dir / f"{keys[32]}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a training run that started long ago still holds it
    try:
        result = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "30")
    finally:
        os.close(fd)
    assert result.stdout.startswith(f"removed {cache_dir / keys[24]} (") and result.stdout.count("\n") == 1
    assert re.fullmatch(
        rf"kept {re.escape(str(cache_dir / keys[32]))}: in use by PID {os.getpid()} \(.+\)\n", result.stderr
    )
    assert not (cache_dir / keys[24]).exists() and (cache_dir / keys[32]).is_dir() and (cache_dir / keys[40]).is_dir()
    again = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "50").stdout
    assert again == f"no data caches in {cache_dir} unused for 50 days\n"
    both = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "1", "--remove", "all", check=False)
    assert both.returncode == 2 and "--remove and --older-than: give one of them" in both.stderr
    for bad, why in (("nan", "nan is not a finite number"), ("inf", "inf is not a finite number"), ("-1", "range")):
        refused = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", bad, check=False)
        (error,) = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
        assert refused.returncode == 2 and "'--older-than'" in error and why in error, refused.stderr
    assert (cache_dir / keys[32]).is_dir() and (cache_dir / keys[40]).is_dir()
    run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "-0")  # 0: every cache not in use
    none_left = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "-0").stdout
    assert none_left == f"no data caches in {cache_dir} unused for 0 days\n"


def test_cache_dir_setting_must_be_a_folder_name():
    assert load_config(None, {"cache_dir": "/tmp/c"})["cache_dir"] == "/tmp/c"
    for bad in (5, "", ["a"]):
        with pytest.raises(ConfigError, match="cache_dir"):
            load_config(None, {"cache_dir": bad})


@pytest.fixture(scope="module")
def view_and_reference(tmp_path_factory) -> tuple[cache.ImageView, np.ndarray]:
    """A folder's cached images, in shards of 7 so that reads cross shards, and the same files decoded directly."""
    tmp = tmp_path_factory.mktemp("view")
    root = make_image_folder(tmp / "shapes", per_class=11)
    saved, cache.SHARD_IMAGES = cache.SHARD_IMAGES, 7
    try:
        images, _ = cache.open_cache(data_source(folder_config(root, tmp)), 24, 3, tmp / "cache").splits["train"]
    finally:
        cache.SHARD_IMAGES = saved
    files = [path for paths in scan_image_folder(root)[1] for path in paths]
    return images, np.stack([to_pixels(path, 24, 24, 3) for path in files])


def test_image_view_indexes_like_numpy(view_and_reference):
    view, ref = view_and_reference
    assert view.shape == ref.shape and view.dtype == np.uint8 and len(view) == len(ref)
    keys = [
        0,
        -1,
        np.int64(5),
        slice(None),
        slice(2, 13, 3),
        slice(None, None, -2),
        slice(40, 50),
        [4, 0, 4, -3],
        np.array([[1, 2], [15, 3]]),
        np.arange(len(ref)) % 2 == 0,
        [],
    ]
    for key in keys:
        got = view[key]
        assert got.dtype == np.uint8 and np.array_equal(got, ref[key]), key
    order = np.array([7, 1, 12, 0])
    assert np.array_equal(view.subset(order)[:], ref[order])
    assert np.array_equal(view.subset(order).subset([3, 0])[:], ref[order][[3, 0]])
    for key in (len(ref), -len(ref) - 1, [0, len(ref)]):
        with pytest.raises(IndexError):
            view[key]
        with pytest.raises(IndexError):
            ref[key]
    with pytest.raises(TypeError, match="refusing to load all"):
        np.asarray(view)


def test_only_a_split_within_the_memory_limit_is_read_into_memory(view_and_reference):
    view, ref = view_and_reference
    order = np.array([9, 2, 30, 0])
    held = cache.in_memory_if_small(view.subset(order), limit=4 * 24 * 24 * 3)
    assert isinstance(held, np.ndarray) and np.array_equal(held, ref[order])
    assert isinstance(cache.in_memory_if_small(view, limit=4 * 24 * 24 * 3), cache.ImageView)


def test_a_job_that_does_not_train_leaves_even_a_small_training_split_on_disk(tmp_path):
    config = folder_config(make_image_folder(tmp_path / "shapes", per_class=4), tmp_path / "cache")
    held, left = load_dataset(config), load_dataset(config, train_in_memory=False)
    assert isinstance(held.train_x, np.ndarray) and isinstance(left.train_x, cache.ImageView)
    assert np.array_equal(held.train_x, left.train_x[:])


def test_image_view_reads_from_threads_and_forked_children_agree(view_and_reference):
    view, ref = view_and_reference
    failures = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            key = rng.integers(0, len(ref), 5)
            if not np.array_equal(view[key], ref[key]):
                failures.append(key)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    view[0]  # the parent's files are open; a forked child opens its own
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, view[[3, 9]].tobytes())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert child == ref[[3, 9]].tobytes()


# Opens a folder's cache as training and quantize do, leaves its training split on disk (quantize's path: no image is
# read yet), says so, and reads every image of every split when told to, printing their sum.
READER = [
    sys.executable,
    "-c",
    "import sys; from pipeline.config import load_config; from train.data import load_dataset\n"
    "config = {'data': sys.argv[1], 'input_size': 24, 'channels': 3, 'cache_dir': sys.argv[2]}\n"
    "data = load_dataset(load_config(None, config), train_in_memory=False)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "print(int(data.train_x[:].sum(dtype=int)) + int(data.val_x[:].sum(dtype=int)), flush=True)\n",
]


def test_a_cache_a_process_reads_is_never_removed_and_its_reader_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_IMAGES", 4)  # 5 shards: a reader opens more than one
    env = {**os.environ, "PIPELINE_CACHE_SHARD_IMAGES": "4"}
    root, cache_dir = make_image_folder(tmp_path / "shapes", per_class=6), tmp_path / "cache"
    reference = load_dataset(folder_config(root, cache_dir), train_in_memory=False)
    total = int(reference.train_x[:].sum(dtype=int)) + int(reference.val_x[:].sum(dtype=int))
    del reference  # the lock dies with the last view of the cache
    folder = cache_folder(cache_dir)

    def start_reader() -> subprocess.Popen:
        reader = subprocess.Popen(
            [*READER, str(root), str(cache_dir)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert reader.stdout.readline() == "ready\n"
        return reader

    reader = start_reader()
    held_by = rf"in use by PID {reader.pid} \(python[\d.]*\)"
    refused = run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", folder.name, check=False)
    assert refused.returncode == 1
    assert re.fullmatch(rf"Error: {re.escape(str(folder))}: {held_by}; not removed\n", refused.stderr), refused.stderr
    kept = run_pipeline("cache", "--cache-dir", str(cache_dir), "--older-than", "0")
    assert kept.stdout == "" and re.fullmatch(rf"kept {re.escape(str(folder))}: {held_by}\n", kept.stderr)
    shards = [f"train-{i:05d}{suffix}" for i in range(5) for suffix in (".json", ".u8")]
    assert sorted(files_of(folder)) == sorted([*shards, "manifest.json"])
    out, _ = reader.communicate("read\n", timeout=60)
    assert reader.returncode == 0 and int(out) == total  # every shard read, after both attempts

    # A reader killed with kill -9 takes its lock with it: nothing is left to block the removal.
    reader = start_reader()
    reader.kill()
    reader.communicate()
    removed = run_pipeline("cache", "--cache-dir", str(cache_dir), "--remove", folder.name)
    assert removed.stdout.startswith(f"removed {folder} (") and not folder.exists()


def test_edited_labels_or_manifest_are_caught_when_opened_and_by_verify_data(tmp_path, capsys):
    root, cache_dir = make_image_folder(tmp_path / "shapes", per_class=6), tmp_path / "cache"
    config = folder_config(root, cache_dir)
    first = load_dataset(config)
    labels = np.concatenate([first.train_y, first.val_y])
    folder = cache_folder(cache_dir)
    intact = files_of(folder)
    sidecar, manifest = folder / "train-00000.json", folder / "manifest.json"
    capsys.readouterr()

    def edit(path: Path, old: bytes, new: bytes) -> None:
        """One edit that leaves valid JSON: what a wrong label or fingerprint looks like."""
        data = path.read_bytes()
        assert data.count(old) == 1
        path.write_bytes(data.replace(old, new))

    edit(sidecar, b'"labels": [0, ', b'"labels": [1, ')
    again = load_dataset(config)
    err = capsys.readouterr().err
    assert f"warning: {sidecar}: damaged cache shard record (checksum wrong)" in err and decoded(err) == [18]
    assert np.array_equal(np.concatenate([again.train_y, again.val_y]), labels)
    assert files_of(folder) == intact

    fingerprint = json.loads(manifest.read_bytes())["fingerprint"].encode()
    edit(manifest, fingerprint, fingerprint[::-1])
    again = load_dataset(config)
    err = capsys.readouterr().err
    assert f"warning: {manifest}: damaged (checksum wrong); writing it again" in err and decoded(err) == []
    assert again.fingerprint == first.fingerprint == content_fingerprint(root) and files_of(folder) == intact

    del first, again  # no reader left: verify_data rewrites
    verify_data(config)
    assert "18 source files verified against the data cache, and its 1 shard (images and labels) and its manifest" in (
        capsys.readouterr().err
    )
    edit(sidecar, b'"labels": [0, ', b'"labels": [2, ')
    edit(manifest, fingerprint, fingerprint[::-1])
    verify_data(config)
    err = capsys.readouterr().err
    assert f"warning: {folder}: train-00000.json, manifest.json damaged (size or checksum wrong)" in err
    again = load_dataset(config)
    assert decoded(capsys.readouterr().err) == [18] and files_of(folder) == intact
    assert np.array_equal(np.concatenate([again.train_y, again.val_y]), labels)
