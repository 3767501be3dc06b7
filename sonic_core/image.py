"""Every image transform of the pack: checks, RGB conversion, working size, Lanczos resize, the
sampler's reference image, CLIP pixels, and paste-back compositing.

ComfyUI's IMAGE is float in 0..1, ``[B, H, W, C]``. Other packs sometimes hand over uint8 tensors
or floats in 0..255, which would otherwise come out white; those are converted with a warning. NaN/inf
pixels are an error. The working size is bounded before anything is allocated. Images are ``[H, W, C]``
float tensors in ``[0, 1]`` unless a name says ``u8``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

from . import config
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
    x = image.to(torch.float32) * config.U8_MAX  # one float copy (a photo's is 12 bytes a pixel), then in place
    return x.round_().clamp_(0, config.U8_MAX).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Working-size limits
# ----------------------------------------------------------------------------------------------


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
        im = im.convert(ALPHA_MODES[mode]) if mode != ALPHA_MODES[mode] else im  # convert() would copy it
        transparency = np.asarray(im.getchannel("A"), dtype=np.float32)  # [H,W] alpha levels
        transparency /= U8_MAX  # in place: photo-sized buffers stay few (issue 29)
        np.subtract(1.0, transparency, out=transparency)  # 1 - alpha
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
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # [H,W,3] levels, one float32 copy
        rgb /= U8_MAX  # in place
    return np.ascontiguousarray(rgb), transparency


def flatten_cutout(image: torch.Tensor, transparency: torch.Tensor,
                   background: float = CUTOUT_BACKGROUND) -> torch.Tensor:
    """A cut-out ``[H,W,3]`` composited onto a plain ``background`` grey through its transparency
    ``[H,W]`` (1 = transparent): what the detector and the model see instead of hidden pixels."""
    t = transparency.to(image.dtype).clamp(0, 1)[:, :, None]  # [H,W,1]
    out = image * (1 - t)  # the one image-sized result; the same sum as image * (1 - t) + background * t
    return out.add_(background * t)


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
    min_resolution = config.check_inputs({"min_resolution": min_resolution})["min_resolution"]  # as the node
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


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Paste-back: generated crop frames blended into the whole photo at its own resolution (issue 23).
# Several faces (issue 30): one base frame per frame, every other face's head left out, colour match.
# ----------------------------------------------------------------------------------------------
def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3 - 2 * t)  # 0 -> 0 and 1 -> 1 exactly, no kink at either end


def _ramp(n: int, band: float, soft_start: bool, soft_end: bool) -> torch.Tensor:
    """Blend weights ``[n]`` along one side of a region: 1 inside, rising smoothly (smoothstep) from
    0 over ``band`` px at each soft end; a hard end (on the photo's border) stays 1."""
    w = torch.ones(n, dtype=torch.float64)
    if band > 0:
        centre = torch.arange(n, dtype=torch.float64) + 0.5  # pixel centres from the start
        if soft_start:
            w = torch.minimum(w, centre / band)
        if soft_end:
            w = torch.minimum(w, (n - centre) / band)
    return _smoothstep(w.clamp(0, 1)).to(torch.float32)


def head_region(face_xyxy, scale: float = config.PASTE_KEEPOUT_SCALE) -> tuple[float, float, float, float]:
    """A face box ``(x1, y1, x2, y2)`` scaled by ``scale`` about its centre: the head it stands for."""
    x1, y1, x2, y2 = face_xyxy
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def keep_out(region, heads, scale: float = config.PASTE_KEEPOUT_SCALE,
             soft: float = config.PASTE_KEEPOUT_SOFT) -> torch.Tensor:
    """Weights ``[rh, rw]`` (float64) over ``region = (x1, y1, x2, y2)`` in photo pixels: 0 on every
    pixel whose centre lies in the head region of one of ``heads`` (face boxes ``(x1, y1, x2, y2)``,
    see ``head_region``), rising (smoothstep of the distance) to 1 at ``soft`` x that region's shorter
    side outside it; 1 where no head is near. Several heads multiply."""
    rx1, ry1, rx2, ry2 = region
    ys = torch.arange(ry1, ry2, dtype=torch.float64) + 0.5  # [rh] pixel centres
    xs = torch.arange(rx1, rx2, dtype=torch.float64) + 0.5  # [rw]
    keep = torch.ones(len(ys), len(xs), dtype=torch.float64)  # [rh, rw]
    for head in heads:
        hx1, hy1, hx2, hy2 = head_region(head, scale)
        dx = torch.maximum(hx1 - xs, xs - hx2).clamp(min=0)  # [rw] px outside the head region, across
        dy = torch.maximum(hy1 - ys, ys - hy2).clamp(min=0)  # [rh] px outside it, down
        dist = torch.hypot(dy[:, None], dx[None, :])  # [rh, rw]
        band = soft * min(hx2 - hx1, hy2 - hy1)  # px
        t = (dist / band).clamp(0, 1) if band > 0 else (dist > 0).to(torch.float64)
        keep = keep * _smoothstep(t)
    return keep


def _other_faces(box) -> list[tuple[float, float, float, float]]:
    """``box.others`` (face boxes of the other faces of the photo, photo pixels) checked; a box whose
    centre lies in this face's own box is dropped with a warning (it would hide the driven face)."""
    x1, y1 = box.crop_xyxy[:2]
    own = (x1 + box.x, y1 + box.y, x1 + box.x + box.w, y1 + box.y + box.h)
    heads = []
    for other in getattr(box, "others", ()) or ():
        vals = tuple(float(v) for v in other) if isinstance(other, (tuple, list)) else ()
        if len(vals) != 4 or not all(np.isfinite(vals)) or vals[2] <= vals[0] or vals[3] <= vals[1]:
            raise ValueError(f"the face box lists another face as {other!r}; expected (x1, y1, x2, y2) in the "
                             "photo's pixels: connect Face Mask Detect's face_box unchanged")
        cx, cy = (vals[0] + vals[2]) / 2, (vals[1] + vals[3]) / 2
        if own[0] <= cx <= own[2] and own[1] <= cy <= own[3]:
            log.warning("paste-back: another face %s lies on this face's own box %s: not left out", vals, own)
            continue
        heads.append(vals)
    return heads


def _gauss(n: int, sigma: float) -> torch.Tensor:
    """``[n, n]`` matrix of a Gaussian blur along one axis of ``n`` cells with zero padding (a
    normalised convolution divides the padding out): row i weighs cell j by ``exp(-(i-j)^2 / 2 sigma^2)``."""
    r = max(1, math.ceil(3 * sigma))
    d = torch.arange(n, dtype=torch.float32)
    d = d[:, None] - d[None, :]  # [n, n] cell offsets
    k = torch.exp(-d ** 2 / (2 * sigma * sigma)) * (d.abs() <= r)
    norm = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma)).sum()
    return k / norm


def _pooling(n: int, cells: int) -> torch.Tensor:
    """``[cells, n]`` matrix averaging ``n`` pixels into ``cells`` bins (adaptive average pooling)."""
    m = torch.zeros(cells, n)
    for c in range(cells):
        a, b = (c * n) // cells, -((-(c + 1) * n) // cells)  # floor, ceil: torch's adaptive bins
        m[c, a:b] = 1.0 / (b - a)
    return m


class ColorMatch:
    """A smooth per-channel gain that pulls a generated crop's colour to what lies under it.

    ``ring [ch, cw]``: where to measure (a band along the crop's border, 0 elsewhere). Local means of
    the frame and of the photo over the ring are taken on a coarse grid (``PASTE_COLOR_GRID`` cells on
    the short side), spread by a Gaussian (``PASTE_COLOR_SIGMA`` cells) and pulled towards the whole
    ring's mean where the ring is far (``PASTE_COLOR_PRIOR``); their ratio, within ``1 +-
    PASTE_COLOR_MAX_GAIN`` and bilinearly upsampled, multiplies the frame. Only the lowest frequencies
    change: a drift of the model's colour, not the face's own motion. Small matrices do the pooling and
    the blur (a convolution on an 8x8 grid costs more in call overhead than in arithmetic).
    """

    def __init__(self, ring: torch.Tensor):
        rh, rw = ring.shape
        short = min(rh, rw)
        self.grid = (max(1, round(config.PASTE_COLOR_GRID * rh / short)),
                     max(1, round(config.PASTE_COLOR_GRID * rw / short)))
        self.size = (rh, rw)
        self.ring = ring.to(torch.float32)  # [rh, rw]
        self.pool = (_pooling(rh, self.grid[0]), _pooling(rw, self.grid[1]))  # [gh, rh], [gw, rw]
        self.blur = (_gauss(self.grid[0], config.PASTE_COLOR_SIGMA), _gauss(self.grid[1], config.PASTE_COLOR_SIGMA))
        den = self.pool[0] @ self.ring @ self.pool[1].T  # [gh, gw]
        self.total = float(den.sum())
        self.prior = config.PASTE_COLOR_PRIOR * float((self.blur[0] @ den @ self.blur[1].T).amax())
        self.active = self.total > 0
        self.fixed = None  # the photo's means, kept once measured (``fixed=True`` calls)

    def to(self, device) -> "ColorMatch":
        out = object.__new__(ColorMatch)
        out.__dict__.update(self.__dict__, ring=self.ring.to(device), pool=tuple(m.to(device) for m in self.pool),
                            blur=tuple(m.to(device) for m in self.blur), fixed=None)
        return out

    def _means(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rh, rw, 3]`` -> local ring sums (blurred, not normalised) ``[3, gh, gw]`` and the whole
        ring's mean ``[3, 1, 1]``."""
        (ph, pw), (bh, bw) = self.pool, self.blur
        rh, rw = self.size
        y = ph @ (x * self.ring[:, :, None]).reshape(rh, rw * 3)  # [gh, rw * 3]
        pooled = torch.einsum("grc,vr->cgv", y.reshape(-1, rw, 3), pw)  # [3, gh, gw]
        return bh @ pooled @ bw.T, pooled.sum((1, 2), keepdim=True) / self.total

    def __call__(self, part: torch.Tensor, under: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """``part`` (the frame's crop) ``[rh, rw, 3]`` with its colour matched to ``under`` (what it is
        pasted onto); ``fixed``: ``under`` is the same photo at every call (its means are kept)."""
        if not self.active:
            return part
        if fixed and self.fixed is None:
            self.fixed = self._means(under)
        (fl, fg), (pl, pg) = self._means(part), (self.fixed if fixed else self._means(under))
        eps = 1 / config.U8_MAX / config.U8_MAX  # far below one level: black on black stays a gain of 1
        gain = (pl + self.prior * pg + eps) / (fl + self.prior * fg + eps)  # [3, gh, gw]
        gain = gain.clamp(1 - config.PASTE_COLOR_MAX_GAIN, 1 + config.PASTE_COLOR_MAX_GAIN)
        gain = torch.nn.functional.interpolate(gain[None] - 1, size=self.size, mode="bilinear",
                                               align_corners=False)  # [1, 3, rh, rw]
        return (part + part * gain[0].permute(1, 2, 0)).clamp_(0, 1)  # gain - 1 [rh, rw, 3]: 0 leaves part exact


def base_frames(photo: torch.Tensor) -> torch.Tensor:
    """The photo input of a paste: one image (``[H, W, C]`` / ``[1, H, W, C]``) -> ``[1, H, W, 3]``, or
    a batch of base frames ``[N, H, W, C]`` -> ``[N, H, W, 3]`` float32 (views of the input where it is
    float32 already: no copy of a long batch). Checked as ``to_rgb`` checks one image."""
    if photo.ndim != 4 or photo.shape[0] <= 1:
        return to_rgb(photo)[None]  # [1, H, W, 3]
    n = photo.shape[0]
    to_rgb(photo[0])  # channels, size
    what = f"the batch of {n} base frames"
    if photo.is_floating_point() and photo.dtype != torch.bool:
        peak = 0.0
        for k in range(n):  # frame by frame: no batch-sized temporary
            if not bool(torch.isfinite(photo[k]).all()):
                raise ValueError(f"base frame {k} of {what} has NaN or infinite pixels: check the node that "
                                 "produced it")
            peak = max(peak, float(photo[k].amax()))
        if peak > U8_RANGE_PEAK:
            photo = unit_range(photo, what)
    else:
        photo = unit_range(photo, what)
    c = photo.shape[-1]
    if c == 4:
        photo = photo[..., :3]  # [N, H, W, 3] alpha dropped
    elif c == 1:
        photo = photo.expand(-1, -1, -1, 3)  # [N, H, W, 3] grey repeated
    return photo.to(torch.float32)


class PasteBack:
    """Blends generated crop frames into the photo the crop was taken from, frame by frame.

    ``photo``: the IMAGE given to Face Mask Detect (RGBA/gray become RGB), or a batch of base frames
    of that size, one per generated frame (frame k is pasted into base k: a previous paste's output,
    so faces chain). ``box``: its face box with ``crop_xyxy``; the head region of every face in
    ``box.others`` is left out of the blend, with a soft edge (``keep_out``), so no paste covers
    another face. ``feather``: the soft edge as a fraction of the blended region's shorter side.
    ``region``: ``"crop"`` (the whole crop rectangle) or ``"face"`` (the face box scaled by
    ``PASTE_FACE_SCALE``, within the crop). ``color_match``: each frame's low-frequency colour pulled
    to the photo's, measured in the blend band (``ColorMatch``). Outside the region every pixel is
    the photo's own; sides on the photo's border are not feathered. Built once per clip; calling it on
    ``[n, h, w, C]`` frames (any size of the crop's aspect) returns ``[n, H, W, 3]`` on their device.
    """

    def __init__(self, photo: torch.Tensor, box, feather: float = config.PASTE_FEATHER,
                 region: str = config.PASTE_REGION, color_match: bool = config.PASTE_COLOR_MATCH):
        if region not in config.PASTE_REGIONS:
            raise ValueError(f"paste-back region {region!r} is not one of {config.PASTE_REGIONS}")
        feather = config.check_inputs({"paste_feather": feather})["paste_feather"]  # the node's range
        if box is None or not hasattr(box, "crop_xyxy"):
            raise ValueError(f"expected the face box of Face Mask Detect (SONIC_FACE_BOX), got "
                             f"{type(box).__name__}")
        if box.crop_xyxy is None:
            raise ValueError("the face box has no crop (crop off, or no face found with on_no_face "
                             "whole_image): there is nothing to paste back")
        self.bases = base_frames(photo)  # [N, H, W, 3] float32
        self.photo = self.bases[0]  # [H, W, 3]
        h, w = self.photo.shape[:2]
        if box.source_size is not None and tuple(box.source_size) != (w, h):
            sw, sh = box.source_size
            raise ValueError(f"the photo is {w}x{h} but the face box was found on a {sw}x{sh} image: "
                             "connect the image you gave Face Mask Detect")
        from .face import check_same_photo

        if self.bases.shape[0] == 1:  # a batch of base frames is an earlier paste's output (another face in it)
            check_same_photo(self.photo, box)  # same size, another picture: refused (issue 29)
        x1, y1, x2, y2 = (int(v) for v in box.crop_xyxy)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ValueError(f"the face box's crop {box.crop_xyxy} does not lie inside the {w}x{h} photo: "
                             "connect the image you gave Face Mask Detect")
        self.crop = (x1, y1, x2, y2)
        if region == "face":  # face box (crop pixels) scaled about its centre, in photo pixels, within the crop
            cx, cy = x1 + box.x + box.w / 2, y1 + box.y + box.h / 2
            hw, hh = box.w * config.PASTE_FACE_SCALE / 2, box.h * config.PASTE_FACE_SCALE / 2
            rx1, ry1 = max(x1, int(np.floor(cx - hw))), max(y1, int(np.floor(cy - hh)))
            rx2, ry2 = min(x2, int(np.ceil(cx + hw))), min(y2, int(np.ceil(cy + hh)))
            if rx2 <= rx1 or ry2 <= ry1:
                raise ValueError(f"the face box {box.xyxy} lies outside its crop {box.crop_xyxy}: use "
                                 "region crop")
        else:
            rx1, ry1, rx2, ry2 = x1, y1, x2, y2
        self.region = (rx1, ry1, rx2, ry2)
        short = min(rx2 - rx1, ry2 - ry1)
        band = feather * short  # px
        self.others = _other_faces(box)
        keep = keep_out(self.region, self.others) if self.others else None  # [rh, rw] float64
        if keep is not None and float(keep[int(box.y) + y1 - ry1:int(box.y + box.h) + y1 - ry1,
                                            int(box.x) + x1 - rx1:int(box.x + box.w) + x1 - rx1].min()) < 1:
            log.warning("paste-back: another face's head region reaches this face's box %s: that part of the "
                        "face is left as the photo's (the faces are very close)", box.xyxy)

        def weights(px: float) -> torch.Tensor:  # [rh, rw] the blend over a band of px, other heads left out
            wy = _ramp(ry2 - ry1, px, ry1 > 0, ry2 < h)  # [rh]
            wx = _ramp(rx2 - rx1, px, rx1 > 0, rx2 < w)  # [rw]
            m = wy[:, None] * wx[None, :]  # [rh, rw]
            return m if keep is None else (m * keep).to(torch.float32)

        self.mask = weights(band)[:, :, None]  # [rh, rw, 1]
        self.color = None
        if color_match:  # measured along the crop's own border (background, also for region face: the head moves)
            px = config.PASTE_COLOR_BAND * min(x2 - x1, y2 - y1)  # not the feather: a wide one reaches the hair
            r = _ramp(y2 - y1, px, y1 > 0, y2 < h)[:, None] * _ramp(x2 - x1, px, x1 > 0, x2 < w)[None, :]  # [ch, cw]
            ring = 4 * r * (1 - r)  # [ch, cw] where a crop-wide blend would be half photo, half frame
            if self.others:  # not where another face's paste may lie: each face's gain is its single-face one
                ring = (ring * keep_out(self.crop, self.others, config.PASTE_COLOR_KEEPOUT_SCALE, 0.0)).float()
            self.color = ColorMatch(ring)
            if not self.color.active:
                log.warning("paste-back: the crop %s has no soft side to measure colour in: no colour match",
                            self.crop)
        self._on: dict = {}  # device -> (photo, mask, colour match) there
        log.info("paste-back: crop %s of the %dx%d photo (%d base frame(s)), region %s %s, feather %.0f px, "
                 "%d other face(s) left out, colour match %s", self.crop, w, h, self.bases.shape[0], region,
                 self.region, band, len(self.others), "on" if color_match else "off")

    @property
    def size(self) -> tuple[int, int]:
        """Output ``(width, height)``: the photo's."""
        return self.photo.shape[1], self.photo.shape[0]

    def check_frames(self, height: int, width: int) -> None:
        """Refuse frames whose aspect is not the crop's (the x64 working-size rounding is allowed)."""
        x1, y1, x2, y2 = self.crop
        cw, ch = x2 - x1, y2 - y1
        ratio = (width / height) / (cw / ch)
        if abs(ratio - 1) > config.PASTE_ASPECT_TOLERANCE:
            raise ValueError(f"frames are {width}x{height} but the face box's crop is {cw}x{ch}: paste back "
                             "the frames generated from that crop (Face Mask Detect with crop on, the same "
                             "face box)")

    def check_count(self, frames: int) -> None:
        """Refuse a batch of base frames whose length is not the number of frames to paste."""
        n = self.bases.shape[0]
        if n > 1 and n != frames:
            raise ValueError(f"the photo input is a batch of {n} base frames but there are {frames} frames to "
                             "paste: connect one image, or one base frame per frame (the previous Paste Back's "
                             "output for these same frames)")

    def _device(self, device: torch.device) -> tuple:
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.photo.to(device), self.mask.to(device),
                             self.color.to(device) if self.color is not None else None)
        return self._on[key]

    def base(self, k: int, device: torch.device) -> torch.Tensor:
        """Base frame ``k`` ``[H, W, 3]`` on ``device``: the photo, or the k-th of a batch."""
        if self.bases.shape[0] == 1:
            return self._device(device)[0]
        return self.bases[k].to(device, torch.float32)

    def resize_to_crop(self, frames: torch.Tensor) -> torch.Tensor:
        """``[n, h, w, C]`` -> ``[n, ch, cw, 3]`` float32: antialiased bicubic (no-op at the crop's size)."""
        x1, y1, x2, y2 = self.crop
        frames = frames[..., :3].to(torch.float32)
        if tuple(frames.shape[1:3]) == (y2 - y1, x2 - x1):
            return frames
        x = frames.permute(0, 3, 1, 2).contiguous()  # [n, 3, h, w]; contiguous: 2x faster on a CPU
        x = torch.nn.functional.interpolate(x, size=(y2 - y1, x2 - x1), mode="bicubic", align_corners=False,
                                            antialias=True)  # [n, 3, ch, cw]
        return x.clamp_(0, 1).permute(0, 2, 3, 1)  # [n, ch, cw, 3]; bicubic overshoots at edges

    def __call__(self, frames: torch.Tensor, out: torch.Tensor | None = None, callback=None, start: int = 0,
                 base: torch.Tensor | None = None) -> torch.Tensor:
        """Frames ``[n, h, w, C]`` -> ``[n, H, W, 3]`` (into ``out`` when given, on any device; ``out`` may
        be ``base``). ``start``: the clip index of ``frames[0]`` (which base frame each one goes into);
        ``base``: ``[n, H, W, 3]`` frames to paste into instead of the photo (an earlier face's result,
        while streaming). ``callback(done, n)`` after every frame."""
        if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
            raise ValueError(f"paste-back takes frames [N, H, W, 3], got {tuple(frames.shape)}")
        self.check_frames(frames.shape[1], frames.shape[2])
        n_bases = self.bases.shape[0]
        if base is None and n_bases > 1 and start + frames.shape[0] > n_bases:
            raise ValueError(f"frames {start}..{start + frames.shape[0] - 1} to paste, but the photo input has "
                             f"{n_bases} base frames: connect one base frame per frame")
        frames = unit_range(frames, "the frames to paste back")
        photo, mask, color = self._device(frames.device)
        w, h = self.size
        if base is not None and tuple(base.shape) != (frames.shape[0], h, w, 3):
            raise ValueError(f"base frames {tuple(base.shape)} for {frames.shape[0]} frames on the {w}x{h} photo: "
                             "every face must come from the same photo")
        if out is None:
            out = torch.empty(frames.shape[0], h, w, 3, dtype=torch.float32, device=frames.device)
        x1, y1, x2, y2 = self.crop
        rx1, ry1, rx2, ry2 = self.region
        for k in range(frames.shape[0]):  # one frame at a time: one crop-sized copy alive
            under = base[k].to(frames.device) if base is not None else self.base(start + k, frames.device)
            crop = self.resize_to_crop(frames[k:k + 1])[0]  # [ch, cw, 3]
            if color is not None:
                crop = color(crop, under[y1:y2, x1:x2], fixed=base is None and n_bases == 1)
            part = crop[ry1 - y1:ry2 - y1, rx1 - x1:rx2 - x1]  # [rh, rw, 3]
            inside = under[ry1:ry2, rx1:rx2]  # [rh, rw, 3]
            blended = torch.lerp(inside, part, mask)  # weight 0: the photo, 1: the frame, exactly
            frame = out[k] if out.device == frames.device else torch.empty_like(photo)  # [H, W, 3]
            if frame.data_ptr() != under.data_ptr():
                frame.copy_(under)
            frame[ry1:ry2, rx1:rx2] = blended
            if frame.device != out.device:
                out[k].copy_(frame)
            if callback is not None:
                callback(k + 1, frames.shape[0])
        return out


def plan_paste(photo: torch.Tensor, box, feather: float = config.PASTE_FEATHER,
               region: str = config.PASTE_REGION, color_match: bool = config.PASTE_COLOR_MATCH) -> PasteBack | None:
    """A ``PasteBack`` for ``photo`` and ``box``; None (with a warning: the frames pass through
    unchanged) when the box has no crop, i.e. the frames already show the whole photo."""
    if box is not None and getattr(box, "crop_xyxy", False) is None:
        log.warning("paste-back: the face box has no crop (crop off in Face Mask Detect, or no face found "
                    "with on_no_face whole_image), so the frames already show the whole photo: they pass "
                    "through unchanged, at their own size")
        return None
    return PasteBack(photo, box, feather, region, color_match)
