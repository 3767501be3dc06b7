"""Every image transform of the pack: checks, RGB conversion, working size, Lanczos resize, the
sampler's reference image, CLIP pixels, and paste-back compositing.

ComfyUI's IMAGE is float in 0..1, ``[B, H, W, C]``. Other packs sometimes hand over uint8 tensors
or floats in 0..255, which would otherwise come out white; those are converted with a warning. NaN/inf
pixels are an error. The working size is bounded before anything is allocated. Images are ``[H, W, C]``
float tensors in ``[0, 1]`` unless a name says ``u8``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from . import config
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


# ----------------------------------------------------------------------------------------------
# Pixel values and RGB
# ----------------------------------------------------------------------------------------------
def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """One ComfyUI image ``[B, H, W, C]`` / ``[H, W, C]`` / ``[H, W]`` -> RGB ``[H, W, 3]`` float.

    A batch uses its first image (with a warning); RGBA drops alpha; grayscale is repeated to
    three channels. Images with a side under ``MIN_IMAGE_SIDE`` are refused; uint8 and 0..255
    images are converted, NaN pixels refused (``unit_range``).
    """
    if image.ndim == 4:
        if image.shape[0] == 0:
            raise ValueError("the image batch is empty: connect an image")
        if image.shape[0] > 1:
            log.warning("image batch of %d: only the first image is used", image.shape[0])
        image = image[0]
    if image.ndim == 2:
        image = image[:, :, None]  # [H, W, 1]
    if image.ndim != 3:
        raise ValueError(f"expected an image [B, H, W, C], got shape {tuple(image.shape)}")
    c = image.shape[2]
    if c == 4:
        image = image[:, :, :3]  # RGBA -> RGB, alpha dropped
    elif c == 1:
        image = image.expand(-1, -1, 3)  # [H, W, 3] grayscale repeated
    elif c != 3:
        raise ValueError(f"image has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    h, w = image.shape[:2]
    if min(h, w) < config.MIN_IMAGE_SIDE:
        raise ValueError(
            f"image is {w}x{h} px; both sides must be at least {config.MIN_IMAGE_SIDE} px: "
            "use a larger portrait"
        )
    return unit_range(image, f"the {w}x{h} image").to(torch.float32)


def to_u8(image: torch.Tensor) -> torch.Tensor:
    """Float ``[..]`` in ``[0, 1]`` -> uint8 by ``round(x * 255)`` (exact for ``u8 / 255`` input)."""
    return (image.to(torch.float32) * config.U8_MAX).round().clamp(0, config.U8_MAX).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Working-size limits
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Working size, resize, reference image for the sampler (SPEC §2.3, §2.4)
# ----------------------------------------------------------------------------------------------
def working_size(width: int, height: int, min_resolution: int, check: bool = True) -> tuple[int, int]:
    """Model size ``(w, h)``: short side scaled to ``min_resolution``, sides rounded to x64.

    Python ``round`` (half-to-even) of ``side * scale / 64``, as the official code. With ``check``
    a size over ``MAX_WORKING_SIDE`` / ``MAX_WORKING_PIXELS`` is an error (before any allocation).
    """
    scale = min_resolution / min(width, height)
    m = config.SIZE_MULTIPLE
    new_w, new_h = round(width * scale / m) * m, round(height * scale / m) * m
    if new_w <= 0 or new_h <= 0:
        raise ValueError(f"min_resolution={min_resolution} gives an empty {new_w}x{new_h} image for a "
                         f"{width}x{height} input: use at least {m}")
    if check:
        check_working_size((new_w, new_h), (width, height), min_resolution, working_size)
    return new_w, new_h


def resize_lanczos(image_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL LANCZOS resize of a uint8 ``[H, W, C]`` array to ``size = (w, h)`` (no-op if equal)."""
    h, w = image_u8.shape[:2]
    if (w, h) == tuple(size):
        return image_u8
    return np.array(Image.fromarray(image_u8).resize(tuple(size), Image.LANCZOS))  # writable copy


def prepare_reference(image: torch.Tensor, mask: torch.Tensor,
                      min_resolution: int) -> tuple[np.ndarray, torch.Tensor]:
    """Reference image and face mask at the working size (SPEC §2.3-2.4).

    image ``[H0, W0, 3]`` float in [0, 1]; mask ``[H0, W0]`` float in [0, 1]. Returns the resized
    RGB uint8 ``[H, W, 3]`` and the resized mask ``[H, W]`` float32 (``u8 / 255`` of channel 0 of
    the LANCZOS-resized 3-channel uint8 mask image, as the official pipeline sees it).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"reference image must be [H, W, 3], got {tuple(image.shape)}")
    if tuple(mask.shape) != tuple(image.shape[:2]):
        raise ValueError(f"face mask {tuple(mask.shape)} does not match the image {tuple(image.shape[:2])}")
    h0, w0 = image.shape[:2]
    size = working_size(w0, h0, min_resolution)
    img_u8 = to_u8(image.cpu()).numpy()  # [H0, W0, 3]
    mask_u8 = to_u8(mask.cpu())[:, :, None].expand(-1, -1, 3).contiguous().numpy()  # [H0, W0, 3]
    img_r = resize_lanczos(img_u8, size)  # [H, W, 3]
    mask_r = resize_lanczos(mask_u8, size)  # [H, W, 3]
    mask_t = torch.from_numpy(np.ascontiguousarray(mask_r[:, :, 0])).to(torch.float32) / config.U8_MAX
    return np.ascontiguousarray(img_r), mask_t


def clip_pixels(image_u8: np.ndarray) -> torch.Tensor:
    """CLIP input ``[3, 224, 224]`` float32: LANCZOS to 224x224, then ``(u8/255 - mean) / std``.

    Arithmetic as the default ``CLIPImageProcessor``: rescale in float64 then cast to float32,
    normalise in float32 (its bicubic resize and centre crop are no-ops at 224x224).
    """
    size = (config.CLIP_SIZE, config.CLIP_SIZE)
    small = resize_lanczos(np.ascontiguousarray(image_u8), size)  # [224, 224, 3]
    x = (small.astype(np.float64) * (1.0 / config.U8_MAX)).astype(np.float32)
    mean = np.asarray(config.CLIP_MEAN, dtype=np.float32)
    std = np.asarray(config.CLIP_STD, dtype=np.float32)
    x = (x - mean) / std  # [224, 224, 3]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, 224, 224]
