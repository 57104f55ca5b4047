"""Decoding every supported format and depth, refusing bad files with one-line reasons, atomic writes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from busi_batch.errors import ImageDecodeError, OutputWriteError
from busi_batch.imageio import atomic_write_bytes, decode_image, load_image, load_truth_mask
from busi_batch.preprocess import model_input, to_gray_float

GREY = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 251).astype(np.uint8)


def encode(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_grey_formats_roundtrip(ext: str) -> None:
    decoded = decode_image(encode(ext, GREY))
    gray = to_gray_float(decoded)
    assert gray.shape == GREY.shape
    assert np.allclose(gray * 255, GREY, atol=0.5)


def test_jpeg_grey_and_colour() -> None:
    assert to_gray_float(decode_image(encode(".jpg", GREY))).shape == (48, 64)
    colour = np.dstack([GREY, GREY, GREY])
    assert to_gray_float(decode_image(encode(".jpeg", colour))).shape == (48, 64)


def test_sixteen_bit_png_and_tiff_scale_to_unit_range() -> None:
    deep = (GREY.astype(np.uint16) * 257)
    for ext in (".png", ".tif"):
        decoded = decode_image(encode(ext, deep))
        assert decoded.dtype == np.uint16
        assert np.allclose(to_gray_float(decoded), GREY / 255.0, atol=1e-4)


def test_rgb_and_rgba_become_grey() -> None:
    rgb = np.dstack([GREY, GREY, GREY])
    rgba = np.dstack([GREY, GREY, GREY, np.full_like(GREY, 255)])
    for array in (rgb, rgba):
        gray = to_gray_float(decode_image(encode(".png", array)))
        assert gray.shape == (48, 64) and np.allclose(gray * 255, GREY, atol=1)


def test_palette_png_via_pillow() -> None:
    buf = io.BytesIO()
    Image.fromarray(GREY).convert("P").save(buf, format="PNG")
    assert to_gray_float(decode_image(buf.getvalue())).shape == (48, 64)


def test_model_input_is_square_and_normalised() -> None:
    x = model_input(decode_image(encode(".png", GREY)), 32, 0.5, 0.25)
    assert x.shape == (32, 32) and x.dtype == np.float32
    assert -2.01 <= x.min() and x.max() <= 2.01


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"\x00\x01 definitely not an image" * 10, "not a readable image"),
        (encode(".png", GREY)[:60], "corrupt"),
    ],
)
def test_bad_bytes_raise_one_line_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(data)
    assert "\n" not in str(info.value)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_claiming(100_000, 100_000))


def test_folder_named_like_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.png").mkdir()
    with pytest.raises(ImageDecodeError, match="folder"):
        load_image(tmp_path / "x.png")


def test_truth_mask_union_and_size_check(tmp_path: Path) -> None:
    a = np.zeros((10, 12), np.uint8)
    b = np.zeros((10, 12), np.uint8)
    a[1:3, 1:3] = 255
    b[5:8, 5:9] = 255
    (tmp_path / "a.png").write_bytes(encode(".png", a))
    (tmp_path / "b.png").write_bytes(encode(".png", b))
    union = load_truth_mask((tmp_path / "a.png", tmp_path / "b.png"), (10, 12))
    assert union.sum() == 4 + 12
    with pytest.raises(ImageDecodeError, match="12x10"):
        load_truth_mask((tmp_path / "a.png",), (11, 12))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_write_failure_is_clear_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputWriteError, match="No space left"):
        atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_gives_ordinary_permissions(tmp_path: Path) -> None:
    import os
    import stat

    target = tmp_path / "shared.csv"
    atomic_write_bytes(target, b"x")
    old = os.umask(0)
    os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~old


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_header_is_read_without_decoding_the_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's getexif() on a PNG decodes the whole image; a PNG with no EXIF-bearing chunk must not pay it."""
    from PIL import PngImagePlugin

    from busi_batch.imageio import read_header

    loads = []
    original = PngImagePlugin.PngImageFile.load

    def counted(self):  # noqa: ANN001
        loads.append(1)
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counted)
    header = read_header(encode(".png", GREY))
    assert (header.format, header.width, header.height, header.orientation) == ("PNG", 64, 48, 1)
    assert not loads, "pixels decoded while reading the header"


def test_png_exif_after_the_pixels_still_turns_the_image() -> None:
    """An eXIf chunk written after IDAT (allowed by the PNG spec) is still found and applied."""
    from busi_batch.imageio import read_header

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    plain = encode(".png", GREY)
    iend = plain.rindex(b"IEND") - 4
    data = plain[:iend] + _png_chunk(b"eXIf", exif.tobytes()) + plain[iend:]
    assert read_header(data).orientation == 6
    assert decode_image(data).shape == (64, 48)


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 0), (np.uint8, 3), (np.uint16, 4), (np.float32, 0)])
def test_model_input_shortcut_matches_the_reference_chain(dtype: type, channels: int) -> None:
    """model_input scales integer pixels after resizing: the same numbers as scale -> clip -> resize, to 1e-5."""
    from busi_batch.preprocess import normalise, resize_square

    rng = np.random.default_rng(0)
    top = {np.uint8: 255, np.uint16: 65535, np.float32: 1.3}[dtype]
    shape = (300, 410, channels) if channels else (300, 410)
    image = (rng.random(shape) * top).astype(dtype)
    reference = normalise(resize_square(to_gray_float(image), 128), 0.33, 0.22)
    assert np.abs(model_input(image, 128, 0.33, 0.22) - reference).max() < 1e-5


def test_mask_png_roundtrip_is_exact() -> None:
    from busi_batch.imageio import encode_mask_png

    mask = np.random.default_rng(3).random((123, 77)) > 0.7
    decoded = cv2.imdecode(np.frombuffer(encode_mask_png(mask), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8 and set(np.unique(decoded)) == {0, 255}
    assert np.array_equal(decoded > 0, mask)
