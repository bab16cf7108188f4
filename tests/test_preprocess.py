"""serve's preprocessing on real files: every valid oddity decodes, every bad input fails clearly."""

from __future__ import annotations

import io
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from serve import ImageError, to_pixels
from serve.preprocess import PixelBudget
from tests.conftest import ODDITIES

BAD = {
    "missing.jpg": "no such file",
    "a_directory.jpg": "is a directory",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
    "bad_crc.png": "corrupt",
    "bomb.png": "too large",
    "drawing.svg": "not an image",
}


@pytest.mark.parametrize("name", ODDITIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_valid_oddities_decode_to_the_model_input(image_zoo, name, channels):
    good, _ = image_zoo
    pixels = to_pixels(good[name], 24, 32, channels)
    assert pixels.shape == (24, 32, channels)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_one_line_naming_the_file(image_zoo, name):
    _, bad = image_zoo
    with pytest.raises(ImageError) as caught:
        to_pixels(bad[name], 28, 28, 3)
    message = str(caught.value)
    assert message.startswith(str(bad[name]) + ": ")
    assert BAD[name] in message
    assert "\n" not in message


def test_exif_orientation_is_applied_first(image_zoo):
    # Stored red-over-blue landscape, EXIF says rotate 90 degrees clockwise: upright it is blue | red.
    pixels = to_pixels(image_zoo[0]["exif_rotated.jpg"], 20, 20, 3).astype(int)
    left, right = pixels[:, :6].mean(axis=(0, 1)), pixels[:, -6:].mean(axis=(0, 1))
    assert left[2] > 200 and left[0] < 60
    assert right[0] > 200 and right[2] < 60


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(path)
    assert to_pixels(path, 1, 3, 1)[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_shown_on_white(image_zoo):
    pixels = to_pixels(image_zoo[0]["palette_transparent.png"], 4, 4, 3)
    assert (pixels == 255).all()


def test_animated_gif_uses_the_first_frame(image_zoo):
    assert (to_pixels(image_zoo[0]["animated.gif"], 8, 8, 1) == 255).all()


def test_cmyk_jpeg_matches_its_rgb_original(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 40, 40))
    rgb.convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert np.abs(to_pixels(tmp_path / "c.jpg", 16, 16, 3).astype(int) - [200, 40, 40]).max() < 12


def test_path_bytes_pil_and_array_give_the_same_pixels(image_zoo):
    path = image_zoo[0]["rgba.png"]
    expected = to_pixels(path, 28, 28, 3)
    image = Image.open(path)
    assert np.array_equal(to_pixels(path.read_bytes(), 28, 28, 3), expected)
    assert np.array_equal(to_pixels(image, 28, 28, 3), expected)
    assert np.array_equal(to_pixels(np.asarray(image), 28, 28, 3), expected)


def test_array_of_the_model_size_passes_through_unchanged():
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.array_equal(to_pixels(pixels, 28, 28, 1)[:, :, 0], pixels)


def test_bad_bytes_and_arrays_are_image_errors():
    with pytest.raises(ImageError, match="<bytes>: empty"):
        to_pixels(b"", 8, 8, 3)
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        to_pixels(b"GIF-ish nonsense", 8, 8, 3)
    with pytest.raises(ImageError, match="uint8"):
        to_pixels(np.zeros((8, 8), dtype=np.float32), 8, 8, 3)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert to_pixels(buffer.getvalue(), 8, 8, 3).shape == (8, 8, 3)


def test_special_and_oversized_image_files_are_refused_unread(tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # opening it would wait for a writer
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate((256 << 20) + 1)  # sparse: reading it would take 256 MiB of memory
    special = {pipe: "is a named pipe, not an image", "/dev/zero": "is a character device, not an image"}
    for path, problem in special.items():
        with pytest.raises(ImageError, match=f"^{re.escape(str(path))}: {problem}$"):
            to_pixels(path, 8, 8, 3)
    with pytest.raises(ImageError, match="larger than 256 MiB, too large for an image"):
        to_pixels(huge, 8, 8, 3)


def test_a_decode_waits_while_other_threads_hold_the_pixel_budget():
    budget = PixelBudget(100)
    order = []

    def second() -> None:
        with budget.held() as take:
            take(50)
            order.append("second decodes")

    with budget.held() as take:
        take(80)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and budget.in_use == 80  # 80 + 50 is over the budget: it waits
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second decodes"] and budget.in_use == 0
    with budget.held() as take:
        take(500)  # more than the whole budget (Pillow's limit raised): it decodes alone
        assert budget.in_use == 500
    assert budget.in_use == 0
