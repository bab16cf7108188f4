"""The one preprocessing function shared by training and serving.

(serve/ avoids pathlib on purpose: importing it is a noticeable part of `pipeline label`'s cold start, which
benchmarks/label_bench.py holds within 1.1x of a bare LiteRT script.)

Decode -> first frame -> EXIF orientation -> colour mode -> resize to the model's input, as uint8.
Normalisation is not here: it is a layer inside every model, so every client feeds plain pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve.errors import ImageError
from serve.files import MiB, read_regular_file

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray
# Image files are read whole before decoding. 256 MiB holds Pillow's pixel limit (89.5 million) as raw RGB.
MAX_IMAGE_BYTES = 256 * MiB

# Transparent pixels are shown on white, as an image viewer would.
BACKGROUND = (255, 255, 255)
T = TypeVar("T")
R = TypeVar("R")
# catch_warnings swaps the process's warning filters: threads decoding at once take turns opening with it.
_OPEN_LOCK = threading.Lock()
# The pixels that threads decode at once, in all: Pillow's default limit for one image, so that decoding in threads
# takes no more memory than one image at that limit does (~0.4 GB for a 1-bit PNG, in its 8-bit copies).
DECODE_BUDGET_PIXELS = 89_478_485
# Pillow allocates a large image in blocks of 16 MiB, which glibc's malloc serves from a per-thread arena once one
# has been freed: each decoding thread then keeps its largest image's memory after use (four threads held 1.2 GB
# where one 9000x9000 PNG takes 0.4 GB). Blocks above glibc's 32 MiB mmap threshold go back to the system when freed.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * MiB)


class PixelBudget:
    """Decoded pixels shared by threads: a decode that would take more than what is left waits for others to end.
    An image larger than the whole budget (Pillow's limit raised) waits to decode alone."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self) -> Iterator[Callable[[int], None]]:
        """A function that takes pixels from the budget (waiting for them), all given back at the block's end."""
        taken = 0

        def take(pixels: int) -> None:
            nonlocal taken
            with self._changed:
                self._changed.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
                self.in_use += pixels
                taken += pixels

        try:
            yield take
        finally:
            if taken:
                with self._changed:
                    self.in_use -= taken
                    self._changed.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)


def _open(source: ImageSource, draft_side: int, take: Callable[[int], None]) -> tuple[Image.Image, str]:
    """Return a decoded PIL image and the name to use in error messages. `take(pixels)` is called before a file
    or bytes is decoded, with the pixels it will decode."""
    if isinstance(source, Image.Image):
        return source, "<image>"
    if isinstance(source, np.ndarray):
        return _from_array(source), "<array>"
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("<bytes>: empty image data")
        return _decode(bytes(source), "<bytes>", draft_side, take), "<bytes>"
    try:
        name = os.fsdecode(source)
    except TypeError:
        raise ImageError(
            f"<{type(source).__name__}>: not an image (give a path, bytes, a PIL image or a uint8 array)"
        ) from None
    try:
        data = read_regular_file(name, MAX_IMAGE_BYTES, "an image", ImageError)
    except ValueError as err:  # a NUL byte, or a surrogate no file name can hold
        raise ImageError(f"{name}: not a possible file name ({err})") from None
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(data, name, draft_side, take), name


def _png_damage(data: bytes) -> str | None:
    """What is wrong with the chunks of PNG `data` up to IEND (one missing, cut short, or a CRC that does not
    match), else None. Pillow's decoder skips the image data's CRCs, and its verify() costs a second parse."""
    position = 8  # past the signature
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            return None
        end = position + 8 + length
        if end + 4 > len(data):
            break
        if zlib.crc32(memoryview(data)[position + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return f"broken PNG file (bad checksum in {kind!r})"
        position = end + 4
    return "truncated PNG file"


# Pillow's plugin for the formats of IMAGE_EXTENSIONS, chosen from a file's first bytes: (first bytes, plugin module,
# format). BMP is left to Image.open: its signature, "BM", starts text files too. Image.open given bytes (serve reads
# files itself, see serve/files.py), with no file name to go by, imports Pillow's five common plugins before it looks,
# and all forty of them for a TIFF or a WebP. Choosing the plugin here reaches into Pillow's registry of openers
# (Image.OPEN, not a documented API; the one place serve does). Measured gain: a cold `pipeline label` of a PNG or a
# JPEG skips the four other common plugins (~10 ms); of a TIFF, all forty: through Image.open it took 1.2x as long
# (EfficientNet-Lite0 int8, benchmarks/label_bench.py's 512x600 photo, 15 interleaved pairs, 2 busy cores).
_OWN_PLUGINS = (
    (b"\x89PNG\r\n\x1a\n", "PIL.PngImagePlugin", "PNG"),
    (b"\xff\xd8\xff", "PIL.JpegImagePlugin", "JPEG"),
    ((b"II", b"MM"), "PIL.TiffImagePlugin", "TIFF"),
    (b"GIF8", "PIL.GifImagePlugin", "GIF"),
    (b"RIFF", "PIL.WebPImagePlugin", "WEBP"),
)


def _own_plugin(data: bytes) -> Callable | None:
    """The opener of the plugin for `data`'s format, when _OWN_PLUGINS names it and the plugin's own check of the
    first bytes (Image.open's) takes it; else None."""
    for first_bytes, plugin, format_name in _OWN_PLUGINS:
        if data.startswith(first_bytes):
            __import__(plugin)  # registers the plugin's opener
            opener, accept = Image.OPEN[format_name]
            return opener if accept is None or accept(data[:16]) is True else None
    return None


def _open_image(data: bytes, name: str) -> Image.Image:
    """`Image.open` of `data` (headers only), refusing more pixels than Pillow's limit."""
    opener = _own_plugin(data)
    if opener is not None:
        image = opener(io.BytesIO(data), "")
        pixels = max(image.width, 1) * max(image.height, 1)
        if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
            raise ImageError(
                f"{name}: image too large to decode safely ({pixels} pixels, Pillow's limit is "
                f"{Image.MAX_IMAGE_PIXELS})"
            )
        return image
    with _OPEN_LOCK, warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit (when it opens the file); refuse those too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _decode(data: bytes, name: str, draft_side: int, take: Callable[[int], None]) -> Image.Image:
    try:
        image = _open_image(data, name)
        if image.format == "PNG" and (damage := _png_damage(data)):
            raise SyntaxError(damage)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the photo is much larger than the input.
            # Square, because EXIF rotation may still swap width and height.
            image.draft(image.mode, (draft_side, draft_side))
        take(image.width * image.height)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: image too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format (jpg, png, webp, bmp, gif, tiff)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"<array>: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"<array>: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {array.shape}")
    return Image.fromarray(array)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to L, RGB or RGBA, scaling deep images rather than clipping them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if pixels.max(initial=0) <= 65535 else 16843009.0
        return Image.fromarray(np.clip(pixels / scale, 0, 255).round().astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8))
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        return image.convert("RGBA")
    if image.mode in ("L", "RGB", "RGBA"):
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1


def _take_nothing(pixels: int) -> None:
    """`decode`'s `take` when no budget is kept."""


def decode(
    source: ImageSource, draft_side: int, take: Callable[[int], None] = _take_nothing
) -> tuple[Image.Image, str]:
    """The picture upright and in 8 bits (L, RGB or RGBA), before colour conversion and resizing, with the
    name to use in error messages. JPEGs may be decoded at a reduced scale no smaller than `draft_side`.
    `take(pixels)` is called before a file or bytes is decoded (a PixelBudget's, say); by default nothing waits."""
    image, name = _open(source, draft_side, take)
    if not image.width or not image.height:
        raise ImageError(f"{name}: empty image ({image.width}x{image.height} pixels)")
    if "exif" in image.info or image.format == "TIFF":  # checked first: reading EXIF costs imports
        from PIL import ImageOps

        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # malformed EXIF only loses the rotation, not the image
            pass
    return _to_8bit(image), name


def to_pixels(source: ImageSource, height: int, width: int, channels: int) -> np.ndarray:
    """Decode `source` and return a (height, width, channels) uint8 array ready for the model.

    `source` is a path, encoded bytes, a PIL image or a uint8 array. Raises ImageError with a
    one-line message naming the file when it cannot be used. Threads decode files and bytes within
    DECODE_BUDGET: one that would exceed it waits until others are done.
    """
    with DECODE_BUDGET.held() as take:
        # In a function of its own: the large decoded images are gone when it returns, before the budget is.
        return _model_input(source, height, width, channels, take)


def _model_input(
    source: ImageSource, height: int, width: int, channels: int, take: Callable[[int], None]
) -> np.ndarray:
    image, name = decode(source, max(height, width), take)
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        image = canvas
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        pixels = pixels[:, :, None]
    if pixels.shape != (height, width, channels):
        raise ImageError(f"{name}: could not convert to {height}x{width}x{channels}")
    return pixels


def pixels_in_chunks(
    sources: Sequence[ImageSource], height: int, width: int, channels: int, *, jobs: int = 1, chunk_size: int = 64
) -> Iterator[list[np.ndarray | ImageError]]:
    """`to_pixels` of every source, in order, `chunk_size` at a time: each item is the pixels, or the ImageError
    that says why that source cannot be used. With `jobs` > 1 that many threads decode chunks ahead of the one
    the caller is working on (Pillow decodes and resizes without the GIL, and so does the interpreter)."""
    starts = range(0, len(sources), chunk_size)

    def decode_chunk(start: int) -> list[np.ndarray | ImageError]:
        chunk: list[np.ndarray | ImageError] = []
        for source in sources[start : start + chunk_size]:
            try:
                chunk.append(to_pixels(source, height, width, channels))
            except ImageError as err:
                # Kept without its frames or the error behind it, which would keep the decoded image alive.
                err.__context__ = None
                chunk.append(err.with_traceback(None))
        return chunk

    if jobs <= 1 or len(starts) <= 1:
        yield from map(decode_chunk, starts)
        return
    from concurrent.futures import ThreadPoolExecutor  # costs start-up time: only here

    pool = ThreadPoolExecutor(jobs, thread_name_prefix="decode")
    try:
        yield from in_order(pool, decode_chunk, starts, ahead=2 * jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def in_order(pool, work: Callable[[T], R], tasks: Iterable[T], ahead: int) -> Iterator[R]:
    """`work(task)` for each task, run by `pool` (an Executor) and yielded in the tasks' order, with at most
    `ahead` tasks in flight: results wait in memory only that far ahead of their reader."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(work, task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
