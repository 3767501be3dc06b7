"""Checks on images from other nodes: pixel values (NaN, 0..255, uint8) and the working size.

ComfyUI's IMAGE is float in 0..1. Other packs sometimes hand over uint8 tensors or floats in
0..255, which would otherwise come out white; those are converted with a warning. NaN/inf pixels
are an error. The working size (face.working_size) is bounded before anything is allocated.
"""

from __future__ import annotations

import logging

import torch

from .config import MAX_WORKING_PIXELS, MAX_WORKING_SIDE, SIZE_MULTIPLE, U8_MAX, U8_RANGE_PEAK

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
