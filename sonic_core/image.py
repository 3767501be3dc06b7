"""Checks on images from other nodes: pixel values (NaN, 0..255, uint8) and the working size.

ComfyUI's IMAGE is float in 0..1. Other packs sometimes hand over uint8 tensors or floats in
0..255, which would otherwise come out white; those are converted with a warning. NaN/inf pixels
are an error. The working size (face.working_size) is bounded before anything is allocated.
"""

from __future__ import annotations

import logging

import torch

import numpy as np

from .config import (
    CUTOUT_BACKGROUND,
    MAX_WORKING_PIXELS,
    MAX_WORKING_SIDE,
    MIN_IMAGE_SIDE,
    SIZE_MULTIPLE,
    U8_MAX,
    U8_RANGE_PEAK,
    U16_MAX,
)

log = logging.getLogger(__name__)


def unit_range(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """``image`` as float in 0..1: uint8 / integer and 0..255 float images are divided by 255 (with
    a warning); NaN or infinite pixels, bool images and values beyond 255 are errors."""
    if image.dtype == torch.bool:
        raise ValueError(f"{what} is a bool tensor; IMAGE must be float in 0..1 (ComfyUI's Load Image)")
    if not image.is_floating_point():
        log.warning("%s is %s, not ComfyUI's float 0..1: divided by %d", what,
                    str(image.dtype).removeprefix("torch."), U8_MAX)
        return image.to(torch.float32) / U8_MAX
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{what} has {bad} NaN or infinite pixel values (of {image.numel()}): check the "
                         "node that produced it (Load Image gives valid pixels)")
    peak = float(image.amax()) if image.numel() else 0.0
    if peak > U8_RANGE_PEAK:
        if peak > U8_MAX + 0.5:
            raise ValueError(f"{what} has values up to {peak:g}; IMAGE must be 0..1 (or 0..255): check the "
                             "node that produced it")
        log.warning("%s holds values up to %g, i.e. 0..255 rather than ComfyUI's 0..1: divided by %d",
                    what, peak, U8_MAX)
        return image / U8_MAX
    return image


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse an image with a side under ``MIN_IMAGE_SIDE`` (before any decode or model load)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{what} is {width}x{height} px; both sides must be at least {MIN_IMAGE_SIDE} px "
                         "(the smallest working size): use a larger portrait")


ALPHA_MODES = {"RGBA": "RGBA", "LA": "LA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}  # PIL mode -> readable


def pil_pixels(im) -> tuple[np.ndarray, np.ndarray | None]:
    """A PIL image (already EXIF-rotated) as ComfyUI's Load Image reads it: RGB float32 ``[H,W,3]`` in
    0..1 and the transparency ``[H,W]`` (1 - alpha, 1 where transparent) or None without alpha.

    16-bit greyscale (modes I;16*, I) is scaled by 1/65535 (converting it to RGB directly clips it
    white); float (F) is taken as 0..1, 0..255 or 0..65535 by its peak; palette or greyscale images
    with a tRNS colour become RGBA; CMYK, YCbCr, LAB, HSV and bilevel images are converted to RGB.
    """
    mode = im.mode
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        im, mode = im.convert("RGBA"), "RGBA"  # a palette / colour-key transparency becomes alpha
    transparency = None
    if mode in ALPHA_MODES:
        im = im.convert(ALPHA_MODES[mode])
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / U8_MAX  # [H,W]
        transparency = 1.0 - alpha
        im = im.convert("RGB")
    if mode.startswith("I") and mode != "I;8":  # I;16, I;16B, I;16L, I;16N, I (32-bit int)
        grey = np.asarray(im).astype(np.float32)  # [H,W] integer levels
        peak = float(grey.max()) if grey.size else 0.0
        if grey.size and (float(grey.min()) < 0 or peak > U16_MAX):
            log.warning("the %s image has levels %g..%g, beyond 16 bits: clipped to 0..%d", mode,
                        float(grey.min()), peak, U16_MAX)
        rgb = np.repeat(np.clip(grey / U16_MAX, 0.0, 1.0)[:, :, None], 3, axis=2)  # [H,W,3]
    elif mode == "F":
        grey = np.asarray(im, dtype=np.float32)  # [H,W]
        if not np.isfinite(grey).all():
            bad = int((~np.isfinite(grey)).sum())
            raise ValueError(f"the float (mode F) image has {bad} NaN or infinite pixels: re-export it")
        peak = float(grey.max()) if grey.size else 0.0
        scale = next(s for s in (1.0, float(U8_MAX), float(U16_MAX), max(peak, 1.0)) if peak <= s)
        if scale != 1.0:
            log.info("the float (mode F) image peaks at %g: read as 0..%g", peak, scale)
        rgb = np.repeat(np.clip(grey / scale, 0.0, 1.0)[:, :, None], 3, axis=2)  # [H,W,3]
    else:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / U8_MAX  # [H,W,3]
    return np.ascontiguousarray(rgb), transparency


def flatten_cutout(image: torch.Tensor, transparency: torch.Tensor,
                   background: float = CUTOUT_BACKGROUND) -> torch.Tensor:
    """A cut-out ``[H,W,3]`` composited onto a plain ``background`` grey through its transparency
    ``[H,W]`` (1 = transparent): what the detector and the model see instead of hidden pixels."""
    t = transparency.to(image.dtype).clamp(0, 1)[:, :, None]  # [H,W,1]
    return image * (1 - t) + background * t


def fits_working_limits(width: int, height: int) -> bool:
    return max(width, height) <= MAX_WORKING_SIDE and width * height <= MAX_WORKING_PIXELS


def check_working_size(size: tuple[int, int], image_size: tuple[int, int], min_resolution: int,
                       sizer) -> None:
    """Raise before any allocation if the working ``size = (w, h)`` is over the limits.

    ``sizer(width, height, min_resolution) -> (w, h)`` is the working-size rule; it finds the
    largest ``min_resolution`` that would fit, for the message.
    """
    w, h = size
    if fits_working_limits(w, h):
        return
    w0, h0 = image_size
    fits = next((m for m in range(min_resolution - SIZE_MULTIPLE, 0, -SIZE_MULTIPLE)
                 if fits_working_limits(*sizer(w0, h0, m, check=False))), None)
    lower = f", or lower min_resolution to {fits} or less" if fits else ""
    raise ValueError(
        f"the {w0}x{h0} image gives a {w}x{h} px working size ({w * h / 1e6:.1f} MP) at min_resolution "
        f"{min_resolution}, over the limit of {MAX_WORKING_SIDE} px per side and "
        f"{MAX_WORKING_PIXELS / 1e6:.1f} MP: crop the image to the face (crop in Face Mask Detect, --crop "
        f"on the command line){lower}")
