"""Hostile and odd input files: each is processed correctly or becomes ``status=error`` with a one-line reason.

Nothing may crash the run, hang it (a FIFO named ``x.png``), exhaust memory (a header claiming 100000x100000
pixels) or garble the CSV and the messages (names with quotes, newlines, non-ASCII or bytes that are not UTF-8).
The decoder is also fed arbitrary and mutated bytes by hypothesis.

Unreadable file: the tests may run as root, for whom ``chmod 000`` does not stop reading. Then the in-process
test makes ``os.open`` raise EACCES for that one path (the error the OS gives a normal user), and the
subprocess test leaves that file out; as a normal user both use a real ``chmod 000`` file.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from typer.testing import CliRunner

from busi_batch import imageio
from busi_batch.cli import app
from busi_batch.discover import ImageItem
from busi_batch.errors import ImageDecodeError
from busi_batch.imageio import apply_orientation, decode_image, read_bytes
from busi_batch.runfolder import NAME_MAX, mask_relpaths
from busi_batch.preprocess import to_gray_float
from busi_batch.records import (
    ImageResult, as_written, journal_lines, printable, read_journal, read_results_csv, write_results_csv,
)
from conftest import tree_digest

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
RNG = np.random.default_rng(7)
SPECKLE = cv2.GaussianBlur(RNG.integers(0, 256, (30, 80)).astype(np.uint8), (5, 5), 1.5)


def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(image, fmt, exif=exif.tobytes())


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + _chunk(b"IEND", b""))


def fs(name: bytes) -> str:
    """A file name given as bytes, as Python sees it (invalid UTF-8 bytes become lone surrogates)."""
    return os.fsdecode(name)


BAD_UTF8 = fs(b"bad \xff\xfe name.png")
BAD_UTF8_BROKEN = fs(b"broken \xff.png")
LONG = "L" * 240 + ".png"
QUOTES = "with space 'single' \"double\", comma.png"
NON_ASCII = "ünïcødé 超声 صورة.png"
NEWLINE_OK = "new\nline.png"
NEWLINE_BAD = "bad\nline.png"


def build_hostile_study(root: Path, unreadable: bool = True) -> dict[str, tuple[str, str]]:
    """Write the study; returns rel -> (expected status, expected reason fragment or displayed 'WxH')."""
    root.mkdir(parents=True)
    grey = Image.fromarray(SPECKLE)
    jpeg = pil_bytes(grey, "JPEG", quality=90)
    files: dict[str, bytes] = {
        "random.png": np.random.default_rng(1).integers(0, 256, 3000).astype(np.uint8).tobytes(),
        "truncated.png": png(SPECKLE)[: len(png(SPECKLE)) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated-eoi.jpg": jpeg[:-2],
        "empty.png": b"",
        "bomb.png": png_claiming(100_000, 100_000),
        "one pixel.png": png(np.full((1, 1), 200, np.uint8)),
        "wide.png": png(np.tile(SPECKLE[:20, :50], (1, 200))),
        "deep16.png": png(SPECKLE.astype(np.uint16) * 257),
        "palette.png": pil_bytes(grey.convert("P"), "PNG"),
        "cmyk.jpg": pil_bytes(grey.convert("CMYK"), "JPEG", quality=95),
        "exif6.jpg": with_orientation(grey, "JPEG", 6),
        "exif6.png": with_orientation(grey, "PNG", 6),
        "exif6.tif": with_orientation(grey, "TIFF", 6),
        "grey-alpha.png": pil_bytes(grey.convert("LA"), "PNG"),
        "rotated-plain.png": png(np.rot90(SPECKLE, k=-1)),
        "gif.png": pil_bytes(grey, "GIF"),
        "text.jpg": b"just some text, not an image\n" * 20,
        QUOTES: png(SPECKLE),
        NON_ASCII: png(SPECKLE),
        BAD_UTF8: png(SPECKLE),
        BAD_UTF8_BROKEN: b"\x00junk" * 50,
        NEWLINE_OK: png(SPECKLE),
        NEWLINE_BAD: b"",
        LONG: png(SPECKLE),
        "x.png/inside.png": png(SPECKLE),  # a folder named like an image: walked into, not read
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("loop.png", root / "loop.png")
    os.symlink("absent.png", root / "dangling.png")
    os.symlink(".", root / "linkdir")  # a folder link loop: passed over, never followed
    os.mkfifo(root / "fifo.png")
    expected = {
        "random.png": ("error", "not a readable image"),
        "truncated.png": ("error", "corrupt or truncated"),
        "truncated.jpg": ("error", "truncated"),
        "truncated-eoi.jpg": ("error", "truncated"),
        "empty.png": ("error", "empty file"),
        "bomb.png": ("error", "too large"),
        "one pixel.png": ("ok", "1x1"),
        "wide.png": ("ok", "10000x20"),
        "deep16.png": ("ok", "80x30"),
        "palette.png": ("ok", "80x30"),
        "cmyk.jpg": ("ok", "80x30"),
        "exif6.jpg": ("ok", "30x80"),
        "exif6.png": ("ok", "30x80"),
        "exif6.tif": ("ok", "30x80"),
        "grey-alpha.png": ("ok", "80x30"),
        "rotated-plain.png": ("ok", "30x80"),
        "gif.png": ("error", "unsupported image format GIF"),
        "text.jpg": ("error", "not a readable image"),
        QUOTES: ("ok", "80x30"),
        NON_ASCII: ("ok", "80x30"),
        BAD_UTF8: ("ok", "80x30"),
        BAD_UTF8_BROKEN: ("error", "not a readable image"),
        NEWLINE_OK: ("ok", "80x30"),
        NEWLINE_BAD: ("error", "empty file"),
        LONG: ("ok", "80x30"),
        "x.png/inside.png": ("ok", "80x30"),
        "loop.png": ("error", "Too many levels of symbolic links"),
        "dangling.png": ("error", "No such file"),
        "fifo.png": ("error", "not a regular file"),
    }
    if unreadable:
        (root / "unreadable.png").write_bytes(png(SPECKLE))
        if not IS_ROOT:
            os.chmod(root / "unreadable.png", 0)
        expected["unreadable.png"] = ("error", "Permission denied")
    return expected


def deny_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """As root, make opening ``path`` fail exactly as ``chmod 000`` does for a normal user."""
    if not IS_ROOT:
        return
    real_open, target = os.open, os.fsencode(path)

    def guarded(p, flags, *args, **kwargs):
        if os.fsencode(p) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def check_rows(out: Path, expected: dict[str, tuple[str, str]]) -> dict[str, ImageResult]:
    rows = {r.image: r for r in read_results_csv(out / "predictions.csv")}
    assert set(rows) == set(expected), set(rows) ^ set(expected)
    for rel, (status, detail) in expected.items():
        row = rows[rel]
        assert row.status == status, (rel, row.error)
        if status == "error":
            assert detail in row.error and "\n" not in row.error, (rel, row.error)
            continue
        assert f"{row.width}x{row.height}" == detail, rel
        mask = cv2.imdecode(np.fromfile(out / row.mask, np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (row.height, row.width), rel
        assert set(np.unique(mask)) <= {0, 255} and int((mask > 0).sum()) == row.lesion_area_px
    return rows


# --------------------------------------------------------------------------------------- the whole study


def test_hostile_study_in_process(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = tmp_path / "study"
    expected = build_hostile_study(study)
    deny_reading(monkeypatch, study / "unreadable.png")
    before = tree_digest(study)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(study), "--out", str(out), "--weights", str(tiny_weights),
                                 "-j", "0", "-b", "4"])
    assert result.exit_code == 3, result.output
    rows = check_rows(out, expected)
    assert tree_digest(study) == before
    # EXIF orientation: the EXIF-rotated PNG gives exactly what the same pixels stored upright give
    plain = rows["rotated-plain.png"]
    for oriented in ("exif6.png", "exif6.tif"):
        a = rows[oriented]
        assert (a.p_normal, a.p_benign, a.p_malignant, a.lesion_area_px) == (
            plain.p_normal, plain.p_benign, plain.p_malignant, plain.lesion_area_px), oriented
        assert (out / a.mask).read_bytes() == (out / plain.mask).read_bytes(), oriented
    # the long name's mask name was shortened to fit the file system, and is unique
    assert len(os.path.basename(rows[LONG].mask).encode()) <= NAME_MAX
    # the folder link was passed over, not followed
    assert "linkdir: skipped: symbolic link to a folder" in result.output


@pytest.mark.slow
def test_hostile_study_through_the_console(tiny_weights: Path, tmp_path: Path) -> None:
    """The real process with decoding workers: exit 3, one stderr line per bad file, the CSV keeps the bytes."""
    study = tmp_path / "study"
    expected = build_hostile_study(study, unreadable=not IS_ROOT)
    out = tmp_path / "out"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "busi_batch", "run", str(study), "--out", str(out), "--weights", str(tiny_weights),
         "-j", "2", "-b", "4", "--quiet"],
        cwd=REPO, env=env, capture_output=True, timeout=300,
    )
    stderr = proc.stderr.decode("utf-8")  # must be valid UTF-8: undecodable names are escaped
    assert proc.returncode == 3, stderr
    assert proc.stdout == b""
    rows = check_rows(out, expected)
    errors = sorted(rel for rel, (status, _) in expected.items() if status == "error")
    lines = stderr.splitlines()
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == len(errors)
    for rel in errors:
        assert f"error: {printable(rel)}: {rows[rel].error}" in error_lines, rel
    assert all(line.startswith("error: ") or ": skipped: " in line for line in lines), lines
    assert "Traceback" not in stderr and "libpng" not in stderr and "[ERROR" not in stderr
    raw = (out / "predictions.csv").read_bytes()
    assert b"bad \xff\xfe name.png" in raw  # the original bytes, so the row still opens the file
    assert (study / rows[BAD_UTF8].image).is_file()


# --------------------------------------------------------------------------------------- single files


def test_decompression_bomb_is_refused_before_any_allocation() -> None:
    data = png_claiming(100_000, 100_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="too large: header claims 10,000,000,000 pixels"):
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # a decode would need 10 GB


def test_fifo_named_like_an_image_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ImageDecodeError, read_bytes, fifo).value),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_bytes blocked on a FIFO"
    assert "not a regular file" in str(outcome[0])


def test_file_larger_than_the_limit_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png(SPECKLE))
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 100)
    with pytest.raises(ImageDecodeError, match="file too large"):
        read_bytes(path)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("channels", [1, 3])
def test_orientation_matches_pillow_exif_transpose(orientation: int, channels: int) -> None:
    stored = SPECKLE if channels == 1 else np.dstack([SPECKLE, SPECKLE // 2, 255 - SPECKLE])
    image = Image.fromarray(stored)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(with_orientation(image, "PNG", orientation)))))
    ours = apply_orientation(stored, orientation)
    assert ours.flags["C_CONTIGUOUS"] and np.array_equal(ours, shown)
    decoded = decode_image(with_orientation(image, "PNG", orientation))  # OpenCV path: BGR
    assert np.array_equal(decoded if channels == 1 else decoded[:, :, ::-1], shown)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_tiff_is_turned_exactly_once(orientation: int) -> None:
    """Pillow and OpenCV both turn TIFFs themselves; the result must still be the displayed image, once."""
    decoded = decode_image(with_orientation(Image.fromarray(SPECKLE), "TIFF", orientation))
    assert np.array_equal(decoded, apply_orientation(SPECKLE, orientation))


def test_jpeg_exif_rotation_swaps_width_and_height() -> None:
    decoded = decode_image(with_orientation(Image.fromarray(SPECKLE), "JPEG", 6))
    assert decoded.shape[:2] == (80, 30)


def test_truncated_jpeg_is_an_error_and_trailing_bytes_are_not() -> None:
    jpeg = pil_bytes(Image.fromarray(SPECKLE), "JPEG", quality=90)
    for cut in (2, 50, len(jpeg) // 2):
        with pytest.raises(ImageDecodeError, match="truncated"):
            decode_image(jpeg[:-cut])
    padded = decode_image(jpeg + b"\x00" * 16 + b"vendor trailer")  # data after the end marker is harmless
    assert padded.shape == (30, 80)


def test_png_with_a_bad_crc_is_an_error() -> None:
    data = bytearray(png(SPECKLE))
    data[60] ^= 0xFF  # inside IDAT
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(bytes(data))


def test_cmyk_jpeg_becomes_the_same_grey_as_pillow() -> None:
    data = pil_bytes(Image.fromarray(SPECKLE).convert("CMYK"), "JPEG", quality=95)
    ours = to_gray_float(decode_image(data)) * 255
    theirs = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    assert np.abs(ours - theirs).mean() < 2.0


def test_long_names_get_short_unique_mask_names() -> None:
    items = [ImageItem(path=Path("/x"), rel=f"sub/{'é' * 130}{i}.png") for i in range(2)]
    names = mask_relpaths(items)
    leaves = [os.path.basename(n) for n in names.values()]
    assert len(set(leaves)) == 2 and all(len(leaf.encode()) <= NAME_MAX for leaf in leaves)
    assert all(n.startswith("masks/sub/") and n.endswith("_mask.png") for n in names.values())
    assert mask_relpaths(items) == names  # deterministic


def test_printable_keeps_messages_on_one_line() -> None:
    assert printable(BAD_UTF8) == "bad \\xff\\xfe name.png"
    assert printable("a\nb\tc.png") == "a\\nb\\tc.png"
    assert printable(NON_ASCII) == NON_ASCII and printable(QUOTES) == QUOTES


# --------------------------------------------------------------------------------------- properties

SEEDS = [
    png(SPECKLE),
    png(SPECKLE.astype(np.uint16) * 257),
    pil_bytes(Image.fromarray(SPECKLE).convert("P"), "PNG"),
    pil_bytes(Image.fromarray(SPECKLE), "JPEG", quality=80),
    pil_bytes(Image.fromarray(SPECKLE), "JPEG", quality=80, progressive=True),
    with_orientation(Image.fromarray(SPECKLE), "JPEG", 8),
    cv2.imencode(".bmp", SPECKLE)[1].tobytes(),
    cv2.imencode(".tif", SPECKLE)[1].tobytes(),
]


def decodes_or_refuses(data: bytes) -> None:
    """The decoder's contract: a usable array, or ImageDecodeError with a one-line reason; nothing else."""
    try:
        image = decode_image(data)
    except ImageDecodeError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(image, np.ndarray) and image.size > 0 and image.ndim in (2, 3)
    assert image.dtype in (np.uint8, np.uint16)
    assert to_gray_float(image).shape == image.shape[:2]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 1 << 20),
)
def test_damaged_images_never_crash_the_decoder(seed: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    decodes_or_refuses(bytes(data))


names = st.one_of(st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40).map(
    lambda b: b.decode("utf-8", errors="surrogateescape")))


@settings(max_examples=100, deadline=None)
@given(name=names, p=st.floats(0, 1))
def test_any_file_name_round_trips_through_csv_and_journal(name: str, p: float, tmp_path_factory) -> None:
    row = ImageResult(image=name, status="ok", p_normal=p, mask=f"masks/{name}_mask.png", width=3, height=4)
    folder = tmp_path_factory.mktemp("rt")
    write_results_csv(folder / "p.csv", [row])
    assert read_results_csv(folder / "p.csv") == [as_written(row)]
    (folder / "j").write_bytes(journal_lines([row]) + b'{"image": "torn')
    assert read_journal(folder / "j") == [row]
    assert "\n" not in printable(name)
