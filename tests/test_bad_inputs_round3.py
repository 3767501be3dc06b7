"""Bad inputs, round 3 (issue 29 items 5, 6, 11, 14): image files Pillow reads wrong, photo-sized
memory, paste-back into another photo, a change of audio between segments."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from sonic_core import pipeline


# ----------------------------------------------------------------------------------------------
# Image files (item 11)
# ----------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _short_png(width: int, height: int, rows: int) -> bytes:
    """A grey PNG whose header says width x height but whose (complete) zlib stream holds ``rows`` rows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    data = zlib.compress(b"".join(b"\x00" + bytes([100]) * width for _ in range(rows)))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def _tiff(width: int, height: int, samples: int, photometric: int, extra: tuple[int, ...]) -> bytes:
    """An uncompressed little-endian one-strip TIFF of 8-bit samples (written by hand: Pillow
    cannot write CMYK with alpha)."""
    data = bytes((i * 7) % 256 for i in range(width * height * samples))
    tags = [(256, 3, [width]), (257, 3, [height]), (258, 3, [8] * samples), (259, 3, [1]),
            (262, 3, [photometric]), (273, 4, [0]), (277, 3, [samples]), (278, 3, [height]),
            (279, 4, [len(data)]), (284, 3, [1])] + ([(338, 3, list(extra))] if extra else [])
    ifd_size = 2 + 12 * len(tags) + 4
    blob, entries = b"", []
    for tag, kind, values in tags:
        payload = b"".join(struct.pack("<H" if kind == 3 else "<I", v) for v in values)
        entries.append((tag, kind, values, payload))
        if len(payload) > 4:
            blob += payload
    data_at = 8 + ifd_size + len(blob)
    out, at = b"", 8 + ifd_size
    for tag, kind, values, payload in entries:
        if tag == 273:
            payload = struct.pack("<I", data_at)
        if len(payload) > 4:
            out += struct.pack("<HHII", tag, kind, len(values), at)
            at += len(payload)
        else:
            out += struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0")
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + out + b"\0" * 4 + blob + data


def test_png_with_fewer_rows_than_its_header_is_refused(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(_short_png(900, 700, 1))
    assert len(path.read_bytes()) < 200
    with Image.open(path) as im:  # Pillow itself accepts it: the rest is black
        im.load()
    with pytest.raises(ValueError, match=r"short.png is truncated.*900x700.*699 of the 700 rows"):
        pipeline.read_image(path)


def test_truncated_png_is_refused_even_when_another_pack_allows_truncated_images(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(good, "PNG")
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # the file cut in the middle of IDAT
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match=r"cut.png (is truncated|cannot be decoded)"):
        pipeline.read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the other pack


def test_short_interlaced_png_and_bottom_up_bmp_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(1, 255, (120, 96, 3), dtype=np.uint8)
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, "BMP")  # rows stored bottom-up: the top rows are lost
    (tmp_path / "cut.bmp").write_bytes(bmp.getvalue()[: len(bmp.getvalue()) - 96 * 3 * 30])
    with pytest.raises(ValueError, match=r"cut.bmp (is truncated|cannot be decoded)"):
        pipeline.read_image(tmp_path / "cut.bmp")
    # Adam7 (interlaced PNG): a stream that ends before the 7th pass leaves the odd rows unwritten
    header = struct.pack(">IIBBBBB", 96, 120, 8, 2, 0, 0, 1)  # 8-bit RGB, interlaced
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2)]  # y0, x0, dy, dx
    body = b"".join(b"\x00" + bytes(pixels[y, x0::dx].reshape(-1))
                    for y0, x0, dy, dx in passes for y in range(y0, 120, dy))
    data = zlib.compress(body)
    (tmp_path / "adam7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                         + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"adam7.png is truncated.*60 of the 120 rows"):
        pipeline.read_image(tmp_path / "adam7.png")


def test_complete_image_with_black_border_rows_is_read(tmp_path):
    pixels = np.full((100, 80, 3), 200, np.uint8)
    pixels[:3] = 0
    pixels[-3:] = 0  # black border rows: the second decode runs and finds every row written
    Image.fromarray(pixels).save(tmp_path / "black_border.png")
    image, mask = pipeline.read_image(tmp_path / "black_border.png")
    assert image.shape == (1, 100, 80, 3) and mask is None
    assert float(image[0, 0].max()) == 0.0 and abs(float(image[0, 50, 40, 0]) - 200 / 255) < 1e-6


def test_cmyk_tiff_with_alpha_is_named_not_called_damaged(tmp_path):
    path = tmp_path / "cmyka.tif"
    path.write_bytes(_tiff(80, 80, 5, 5, (2,)))
    with pytest.raises(ValueError, match=r"cmyka.tif is a TIFF of CMYK with an alpha channel.*Pillow.*cannot "
                                         r"read.*Convert it to RGB or RGBA") as err:
        pipeline.read_image(path)
    assert "damaged" not in str(err.value)
    plain = tmp_path / "cmyk.tif"  # the same writer without alpha: Pillow reads it, so the file is sound
    plain.write_bytes(_tiff(80, 80, 4, 5, ()))
    assert pipeline.read_image(plain)[0].shape == (1, 80, 80, 3)


def test_tiff_whose_header_does_not_parse_is_still_called_damaged(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\0" + struct.pack("<I", 10_000) + b"\0" * 40)  # first IFD past the end
    with pytest.raises(ValueError, match=r"bad.tif cannot be read: it starts like a TIFF file but its header is "
                                         r"damaged"):
        pipeline.read_image(path)
