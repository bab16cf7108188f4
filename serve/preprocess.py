"""The one preprocessing function shared by training and serving.

(serve/ avoids pathlib on purpose: importing it costs ~10 ms, a tenth of `pipeline label`'s cold start.)

Decode -> first frame -> EXIF orientation -> colour mode -> resize to the model's input, as uint8.
Normalisation is not here: it is a layer inside every model, so every client feeds plain pixels.
"""

from __future__ import annotations

import io
import os
import warnings

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


def _open(source: ImageSource, draft_side: int) -> tuple[Image.Image, str]:
    """Return a decoded PIL image and the name to use in error messages."""
    if isinstance(source, Image.Image):
        return source, "<image>"
    if isinstance(source, np.ndarray):
        return _from_array(source), "<array>"
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("<bytes>: empty image data")
        return _decode(io.BytesIO(source), "<bytes>", draft_side), "<bytes>"
    name = os.fspath(source)
    data = read_regular_file(name, MAX_IMAGE_BYTES, "an image", ImageError)
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, draft_side), name


def _decode(fp: io.BytesIO, name: str, draft_side: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            if image.format == "PNG":
                # verify() checks every chunk's CRC, which decoding alone does not.
                image.verify()
                fp.seek(0)
                image = Image.open(fp)
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the photo is much larger than the input.
                # Square, because EXIF rotation may still swap width and height.
                image.draft(image.mode, (draft_side, draft_side))
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


def decode(source: ImageSource, draft_side: int) -> tuple[Image.Image, str]:
    """The picture upright and in 8 bits (L, RGB or RGBA), before colour conversion and resizing, with the
    name to use in error messages. JPEGs may be decoded at a reduced scale no smaller than `draft_side`."""
    image, name = _open(source, draft_side)
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
    one-line message naming the file when it cannot be used.
    """
    image, name = decode(source, draft_side=max(height, width))
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        image = canvas
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        pixels = pixels[:, :, None]
    if pixels.shape != (height, width, channels):
        raise ImageError(f"{name}: could not convert to {height}x{width}x{channels}")
    return pixels
