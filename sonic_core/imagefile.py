"""Image files Pillow opens without complaint but cannot read right (issue 29 item 11).

* A layout Pillow does not support (a TIFF of CMYK with an alpha channel, ...) fails as "cannot
  identify image file", which reads like a damaged file: ``tiff_layout`` says what the TIFF holds.
* Pixel data shorter than the header says: Pillow stops quietly when a PNG's compressed stream
  ends early and leaves the rest of the image at zero (a 103-byte PNG claiming 8000x7500 decodes
  as 60 MP of black). ``missing_rows`` finds the rows no decoder wrote, for any format: when a
  border row is all zero it decodes again into a buffer pre-filled with a non-zero value; rows
  that differ between the two decodes were never written. Decoding is deterministic, so a written
  row is equal in both, and an image without an all-zero border row costs nothing more.
* ``strict_pillow`` turns ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while we decode (another node
  pack in the same ComfyUI process may have turned it on), so truncated JPEGs raise too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import warnings

log = logging.getLogger(__name__)

TIFF_PHOTOMETRIC = {0: "grey (white is zero)", 1: "grey", 2: "RGB", 3: "palette", 4: "transparency mask",
                    5: "CMYK", 6: "YCbCr", 8: "CIELab", 9: "ICC Lab", 10: "ITU Lab", 32844: "LogL",
                    32845: "LogLuv", 34892: "linear raw"}  # TIFF tag 262 -> words
TIFF_EXTRA_SAMPLES = {0: "an extra channel", 1: "a premultiplied alpha channel", 2: "an alpha channel"}  # tag 338
TIFF_SAMPLE_FORMAT = {1: "", 2: " signed", 3: " float", 4: " untyped"}  # tag 339
TIFF_PHOTOMETRIC_TAG, TIFF_BITS_TAG, TIFF_SAMPLES_TAG, TIFF_EXTRA_TAG, TIFF_FORMAT_TAG = 262, 258, 277, 338, 339
TIFF_HEADER_BYTES = 8  # byte order, 42, first IFD offset
BORDER_ROWS = 2  # rows checked at the top and at the bottom (bottom-up BMP, Adam7's last passes)
COMPARE_ROWS = 256  # rows compared at a time between the two decodes
FILL_LEVEL = 255  # the non-zero level of the second decode's buffer


class TruncatedImage(ValueError):
    """An image file whose pixel data ends before the rows its header declares."""


@contextlib.contextmanager
def strict_pillow():
    """``ImageFile.LOAD_TRUNCATED_IMAGES`` off inside the block, restored after it."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def tiff_layout(path: str | os.PathLike) -> str | None:
    """What a TIFF's first image declares, in words ("CMYK with an alpha channel, 5 samples of 8
    bits"), or None when its header does not parse (a damaged file)."""
    from PIL import TiffImagePlugin

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": the None below says it
            ifd = TiffImagePlugin.ImageFileDirectory_v2(f.read(TIFF_HEADER_BYTES))
            ifd.load(f)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, KeyError):
        return None
    photometric = ifd.get(TIFF_PHOTOMETRIC_TAG)
    if photometric is None:
        return None
    bits = ifd.get(TIFF_BITS_TAG, (1,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = ifd.get(TIFF_SAMPLES_TAG, len(bits))
    extra = ifd.get(TIFF_EXTRA_TAG, ())
    extra = extra if isinstance(extra, tuple) else (extra,)
    fmt = ifd.get(TIFF_FORMAT_TAG, (1,))
    fmt = fmt[0] if isinstance(fmt, tuple) and fmt else fmt
    colour = TIFF_PHOTOMETRIC.get(photometric, f"photometric {photometric}")
    extras = " and ".join(TIFF_EXTRA_SAMPLES.get(e, f"extra sample kind {e}") for e in extra)
    depth = "/".join(str(b) for b in sorted(set(bits)))
    return (f"{colour}{' with ' + extras if extras else ''}, {samples} sample(s) per pixel of {depth}"
            f"{TIFF_SAMPLE_FORMAT.get(fmt, '')} bits")


def _row_bytes(im, y0: int, y1: int) -> bytes:
    return im.crop((0, y0, im.size[0], y1)).tobytes()


def _all_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


def missing_rows(im, path: str | os.PathLike) -> int:
    """Rows of the loaded Pillow image ``im`` (opened from ``path``) its decoder never wrote: 0 for a
    complete image. Decodes ``path`` a second time only when a border row of ``im`` is all zero."""
    from PIL import Image

    w, h = im.size
    border = sorted({*range(min(BORDER_ROWS, h)), *range(max(h - BORDER_ROWS, 0), h)})
    if not any(_all_zero(_row_bytes(im, y, y + 1)) for y in border):
        return 0
    bands = len(im.getbands())
    try:
        with strict_pillow(), Image.open(path) as again:
            if again.size != im.size or again.mode != im.mode:
                return 0
            # a pre-filled buffer: Pillow's load keeps an image buffer of the right mode and size
            again.im = Image.new(im.mode, im.size, FILL_LEVEL if bands == 1 else (FILL_LEVEL,) * bands).im
            again.load()
            missing = 0
            for y0 in range(0, h, COMPARE_ROWS):
                y1 = min(y0 + COMPARE_ROWS, h)
                if _row_bytes(im, y0, y1) != _row_bytes(again, y0, y1):
                    missing += sum(_row_bytes(im, y, y + 1) != _row_bytes(again, y, y + 1) for y in range(y0, y1))
    except Exception as e:  # noqa: BLE001 - the first decode succeeded; this is only a second look
        log.debug("image %s: second decode for the truncation check failed (%s)", path, e)
        return 0
    return missing


def check_complete(im, path: str | os.PathLike) -> None:
    """Refuse a loaded image whose pixel data ends before the rows its header declares."""
    missing = missing_rows(im, path)
    if missing:
        w, h = im.size
        raise TruncatedImage(f"image {path} is truncated: its header says {w}x{h} px, but its pixel data ends early "
                         f"({missing} of the {h} rows were never decoded and would be black). An interrupted "
                         "download or copy? Download or copy it again, or re-save it in an image editor")
