"""open_image: good images load fully; every bad input is one InputError line naming the file."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from clipforge._util.imageio import IMAGE_EXTENSIONS, is_image_path, open_image
from clipforge.errors import InputError

ASTRONAUT = data.astronaut()[::4, ::4].copy()  # 128x128 RGB


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries a single empty data chunk."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _assert_one_line_error(source, expected_name: str, fragment: str, **kwargs) -> None:
    with pytest.raises(InputError) as error:
        open_image(source, **kwargs)
    message = str(error.value)
    assert expected_name in message, message
    assert fragment in message, message
    assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize(
    ("fmt", "suffix", "lossless"),
    [("PNG", ".png", True), ("BMP", ".bmp", True), ("TIFF", ".tif", True), ("WEBP", ".webp", True),
     ("JPEG", ".jpg", False)],
)
def test_good_images_load_fully(tmp_path, fmt, suffix, lossless):
    options = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"astronaut{suffix}"
    path.write_bytes(_encode(Image.fromarray(ASTRONAUT), fmt, **options))
    for source in (path, str(path), path.read_bytes()):
        image = open_image(source)
        assert image.size == (128, 128) and image.mode == "RGB"
        assert not getattr(image, "tile", [])  # ImageFile.load() empties .tile once pixels are decoded
        with Image.open(path) as reference:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
        if lossless:
            np.testing.assert_array_equal(np.asarray(image), ASTRONAUT)


def test_modes_are_kept_for_the_transform_to_convert(tmp_path):
    """open_clip converts to RGB after resizing, so loading must not convert."""
    cases = {
        "gray.png": Image.fromarray(data.camera()[::8, ::8].copy()),
        "logo.png": Image.fromarray(data.logo()[::8, ::8].copy()),
        "palette.gif": Image.fromarray(ASTRONAUT).convert("P"),
    }
    for file_name, original in cases.items():
        path = tmp_path / file_name
        original.save(path)
        image = open_image(path)
        assert image.mode == original.mode
        np.testing.assert_array_equal(np.asarray(image.convert("RGBA")), np.asarray(original.convert("RGBA")))


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nowhere" / "cat.jpg", "cat.jpg", "no such file")


def test_directory(tmp_path):
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    _assert_one_line_error(folder, "photos.jpg", "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_one_line_error(path, "empty.png", "empty")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a caption, not a picture\n" * 20)
    _assert_one_line_error(path, "notes.jpg", "not a readable image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_image(tmp_path, fmt):
    encoded = _encode(Image.fromarray(ASTRONAUT), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(encoded[: len(encoded) * 2 // 3])
    _assert_one_line_error(path, path.name, "truncated or corrupt")


def test_corrupt_bytes(tmp_path):
    encoded = bytearray(_encode(Image.fromarray(ASTRONAUT), "PNG"))
    data_start = encoded.index(b"IDAT") + 8
    encoded[data_start : data_start + 64] = bytes(range(64))  # damages the compressed stream (and its CRC)
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(encoded))
    _assert_one_line_error(path, "damaged.png", "truncated or corrupt")


def test_bytes_are_named_by_name_argument():
    _assert_one_line_error(b"GIF89a garbage", "shard-0003/000123.jpg", "not a readable image",
                           name="shard-0003/000123.jpg")
    _assert_one_line_error(b"\x00" * 10, "<image bytes>", "not a readable image")


def test_decompression_bomb_beyond_pil_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))  # 400 Mpx claimed in a 60-byte file
    _assert_one_line_error(path, "bomb.png", "decompression bomb")


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(ASTRONAUT).save(path)
    _assert_one_line_error(path, "big.png", "128x128 = 16384 pixels is more than max_pixels=10000", max_pixels=10_000)
    assert open_image(path, max_pixels=16_384).size == (128, 128)


def test_pil_bomb_warning_and_error_never_escape(tmp_path, monkeypatch):
    """PIL warns above MAX_IMAGE_PIXELS and raises above twice that; neither may leak out."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned, refused = tmp_path / "warned.png", tmp_path / "refused.png"
    Image.new("RGB", (40, 40), (9, 8, 7)).save(warned)  # 1600 px: PIL warns
    Image.new("RGB", (50, 50)).save(refused)  # 2500 px: PIL raises DecompressionBombError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(warned).getpixel((0, 0)) == (9, 8, 7)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    _assert_one_line_error(refused, "refused.png", "decompression bomb")


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 7))
    _assert_one_line_error(path, "zero.png", "zero width or height")


def test_zero_size_from_a_decoder_plugin(tmp_path, monkeypatch):
    """A third-party decoder that yields an empty image is caught after decoding."""
    path = tmp_path / "plugin.heic"
    path.write_bytes(b"anything")
    monkeypatch.setattr(Image, "open", lambda fp: Image.new("RGB", (0, 5)))
    _assert_one_line_error(path, "plugin.heic", "zero size (0x5)")


def _exif_rotated_png(tmp_path: Path) -> tuple[Path, np.ndarray]:
    stored = ASTRONAUT[:, :96]  # 96 wide, 128 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    return path, stored


def test_exif_orientation_is_ignored_by_default_like_open_clip(tmp_path):
    path, stored = _exif_rotated_png(tmp_path)
    np.testing.assert_array_equal(np.asarray(open_image(path)), stored)


def test_exif_orientation_applied_on_request(tmp_path):
    path, stored = _exif_rotated_png(tmp_path)
    upright = open_image(path, exif_transpose=True)
    assert upright.size == (128, 96)
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(stored, k=-1))


def test_image_extensions():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    for good in ("a.jpg", "b.JPEG", Path("dir/c.png"), "d.WebP", "e.bmp", "f.gif", "g.tif", "h.TIFF"):
        assert is_image_path(good), good
    for bad in ("a.txt", "b.jpg.json", "c", Path("dir.png/readme"), "d.svg", ".png"):
        assert not is_image_path(bad), bad
