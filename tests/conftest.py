"""Shared fixtures: real image files, a small real Fashion-MNIST run and its bundles, built once per session."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tensorflow_env import prepare

prepare()  # the tests are an entry point: Keras 2 and quiet logs before any test imports TensorFlow

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "pipeline"]
# A slice of Fashion-MNIST big enough to learn something in two epochs, small enough to train in seconds.
SMALL_FMNIST = ["--set", "max_images_per_class=150", "--epochs", "2", "--batch-size", "64"]
# The instruction sets that decide which int8 kernels XNNPACK runs (x86 and Arm names, as /proc/cpuinfo spells them).
INT8_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avxvnni", "avx512_bf16", "amx_tile", "amx_int8", "asimddp")


def cpu_features() -> str:
    """This CPU's model and which of INT8_CPU_FEATURES it has: tests whose int8 results depend on the CPU name it in
    their messages, and pytest's header prints it."""
    fields: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "CPU features unknown (no /proc/cpuinfo)"
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("CPU part") or "unknown CPU"
    has = " ".join(f for f in INT8_CPU_FEATURES if f in flags) or "none"
    return f"{model}: {has}; not {' '.join(f for f in INT8_CPU_FEATURES if f not in flags) or 'missing any'}"


def pytest_report_header() -> str:
    return f"cpu: {cpu_features()}"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Keep the tests' decoded-data cache out of the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PIPELINE_CACHE"] = str(cache)
    return cache


def run_pipeline(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a real process."""
    result = subprocess.run([*PIPELINE, *args], cwd=cwd or ROOT, capture_output=True, text=True, env=os.environ)
    if check and result.returncode != 0:
        raise AssertionError(
            f"pipeline {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def worker_pid(rank: int, marker: str, timeout: float) -> int | None:
    """The pid of the Horovod worker with this rank, found by its environment, and by `marker` in its command line
    (a job of this test's, not another's running beside it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"HOROVOD_RANK={rank}".encode() in environ and marker.encode() in cmdline:
                return int(pid)
        time.sleep(0.1)
    return None


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def fmnist_run(runs_dir) -> Path:
    """A small CNN trained for two epochs on a Fashion-MNIST slice."""
    run_pipeline("train", "--name", "fmnist", "--set", f"runs_dir={runs_dir}", *SMALL_FMNIST)
    return runs_dir / "fmnist"


@pytest.fixture(scope="session")
def bundles(fmnist_run) -> dict[str, Path]:
    """int8, float16 and float32 bundles of `fmnist_run`."""
    run_pipeline("quantize", str(fmnist_run), "-q", "int8", "-q", "float16", "--calibration-images", "200")
    return {mode: fmnist_run / "export" / f"fmnist_{mode}.tflite" for mode in ("int8", "float16", "float32")}


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> tuple[Path, str]:
    """`pipeline pretrained efficientnet-lite0 --name lite0 --runs-dir DIR`, run once (its int8 conversion takes
    minutes): (the run directory, what the command printed)."""
    folder = tmp_path_factory.mktemp("pretrained")
    result = run_pipeline("pretrained", "efficientnet-lite0", "--name", "lite0", "--runs-dir", str(folder / "exports"))
    return folder / "exports" / "lite0", result.stdout


@pytest.fixture(scope="session")
def pretrained_bundles(pretrained_run) -> dict[str, Path]:
    """int8, float16 and float32 bundles of the pretrained EfficientNet-Lite0 (pipeline pretrained)."""
    run, _ = pretrained_run
    return {mode: run / "export" / f"lite0_{mode}.tflite" for mode in ("int8", "float16", "float32")}


@pytest.fixture(scope="session")
def fmnist_images(tmp_path_factory) -> list[Path]:
    """Ten Fashion-MNIST test images as PNG files, one per class."""
    folder = tmp_path_factory.mktemp("samples")
    run_pipeline("samples", "--count", "10", "--out", str(folder))
    return sorted(folder.glob("*.png"))


# The valid oddities write_image_zoo makes, by file name: each must classify.
ODDITIES = [
    "cmyk.jpg",
    "grey16.png",
    "rgba.png",
    "palette_transparent.png",
    "animated.gif",
    "exif_rotated.jpg",
    "photo.webp",
    "photo.tiff",
    "tiny.png",
    "wide.png",
    "png_named.jpg",
    "grey.bmp",
]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_image_zoo(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(valid oddities that must classify, bad inputs that must fail with a clear error), as real files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    good: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        good[name] = folder / name
        image.save(good[name], **kwargs)

    save("cmyk.jpg", photo.convert("CMYK"))
    save("grey16.png", Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)))
    save("rgba.png", photo.convert("RGBA"))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    save("palette_transparent.png", palette, transparency=0)
    frames = [Image.new("RGB", (20, 20), (255, 255, 255)), Image.new("RGB", (20, 20), (0, 0, 0))]
    good["animated.gif"] = folder / "animated.gif"
    frames[0].save(good["animated.gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    # Stored landscape, red on top and blue below, with EXIF "rotate 90 degrees clockwise to view".
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", rotated, exif=exif.tobytes(), quality=95)
    save("photo.webp", photo)
    save("photo.tiff", photo)
    save("tiny.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    save("wide.png", photo.resize((3000, 20)))
    save("png_named.jpg", photo, format="PNG")
    save("grey.bmp", photo.convert("L"))

    bad: dict[str, Path] = {}
    bad["missing.jpg"] = folder / "missing.jpg"
    bad["a_directory.jpg"] = folder / "a_directory.jpg"
    bad["a_directory.jpg"].mkdir(exist_ok=True)
    bad["empty.jpg"] = folder / "empty.jpg"
    bad["empty.jpg"].write_bytes(b"")
    bad["text.jpg"] = folder / "text.jpg"
    bad["text.jpg"].write_text("this is not a picture\n")
    jpeg = folder / "whole.jpg"
    photo.resize((256, 256)).save(jpeg, quality=90)
    bad["truncated.jpg"] = folder / "truncated.jpg"
    bad["truncated.jpg"].write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    png = bytearray((folder / "rgba.png").read_bytes())
    png[-20] ^= 0xFF  # a byte inside the last IDAT chunk: its CRC no longer matches
    bad["bad_crc.png"] = folder / "bad_crc.png"
    bad["bad_crc.png"].write_bytes(bytes(png))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    bad["bomb.png"] = folder / "bomb.png"
    bad["bomb.png"].write_bytes(bomb + png_chunk(b"IEND", b""))
    bad["drawing.svg"] = folder / "drawing.svg"
    bad["drawing.svg"].write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n')
    return good, bad


@pytest.fixture(scope="session")
def image_zoo(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


def make_image_folder(root: Path, per_class: int = 30, size: int = 40, seed: int = 0) -> Path:
    """Three visually distinct classes (red squares, green discs, blue stripes) in mixed formats and sizes."""
    rng = np.random.default_rng(seed)
    formats = [("png", "RGB"), ("jpg", "RGB"), ("webp", "RGB"), ("bmp", "L"), ("gif", "P"), ("tiff", "RGBA")]
    for name in ("blue_stripes", "green_discs", "red_squares"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(size - 8, size + 24))
            yy, xx = np.mgrid[:side, :side]
            pixels = rng.integers(0, 60, (side, side, 3)).astype(np.uint8)
            if name == "red_squares":
                a, b = sorted(rng.integers(0, side, 2))
                pixels[a : b + 4, a : b + 4, 0] = 230
            elif name == "green_discs":
                cy, cx, r = rng.integers(side // 4, 3 * side // 4, 3)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2 + 4) ** 2, 1] = 230
            else:
                pixels[:, (xx[0] // 4) % 2 == 0, 2] = 230
            ext, mode = formats[i % len(formats)]
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i:03d}.{ext}")
    return root
