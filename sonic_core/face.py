"""Face detection, face box -> square crop, and face mask (image transforms live in image.py).

SPEC §2. Boxes are floats in image pixels, ``(x, y, w, h)`` with ``(x, y)`` the top-left corner,
as the official detector returns them. Images are ComfyUI-style ``[H, W, C]`` float tensors in
``[0, 1]`` unless a name says ``u8``.

Project decisions (where the official code has a quirk or no answer):
* Several faces: the truly largest box wins (the official loop compares with box 0 only);
  equal areas keep the higher-scoring one (detector order).
* A MASK input marks the face by its bounding box (pixels > 0.5) and takes precedence over the
  detector, when it plausibly is a face mask (``judge_mask``: one region of plausible size, off
  most of the border). A transparent background (a cut-out) is composited onto a plain background
  and the detector runs; an empty mask (Load Image's placeholder) or specks leave it to the detector.
* Cropping follows ``process_bbox`` exactly. Like the official demo (which crops, saves the
  crop and detects again on it), the face box of the output is detected again on the crop; if
  that finds nothing (or the box came from a mask) the source box is shifted into the crop.
* No face: ``on_no_face="error"`` raises with advice; ``"whole_image"`` keeps the image uncropped
  and marks all of it as the face.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import config
from .image import to_rgb, to_u8

log = logging.getLogger(__name__)

ON_NO_FACE = ("error", "whole_image")


@dataclass(frozen=True)
class FaceBox:
    """A face box in the pixels of one image (``image_size = (width, height)``).

    ``source`` is ``"detector"``, ``"mask"`` or ``"whole_image"``; ``score`` is the detector
    confidence (None otherwise); ``crop_xyxy`` is the crop taken from the input image, if any, and
    ``source_size = (width, height)`` that input image's size and ``fingerprint`` its
    ``image_fingerprint`` (paste-back checks the photo against both).
    """

    x: float
    y: float
    w: float
    h: float
    image_size: tuple[int, int]
    source: str = "detector"
    score: float | None = None
    crop_xyxy: tuple[int, int, int, int] | None = None
    source_size: tuple[int, int] | None = None
    fingerprint: tuple[float, ...] | None = None  # image_fingerprint of the source image (with a crop)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x + self.w, self.y + self.h)

    @property
    def area(self) -> float:
        return self.w * self.h


def image_fingerprint(image: torch.Tensor) -> tuple[float, ...]:
    """A small fingerprint of an RGB image ``[H, W, C]`` (of a batch ``[B, H, W, C]``: its first frame):
    the mean level of every cell of a ``FINGERPRINT_GRID`` square grid, rows first. Read one band of
    rows at a time (no photo-sized copy); float16 / bfloat16 / uint8 copies of one photo give the same
    figures within rounding."""
    img = image[0] if image.ndim == 4 else image
    h, w = img.shape[:2]
    g = config.FINGERPRINT_GRID
    scale = config.U8_MAX if not img.is_floating_point() else 1.0
    ys = [round(k * h / g) for k in range(g + 1)]
    xs = [round(k * w / g) for k in range(g + 1)]
    cells = []
    for r in range(g):
        band = img[ys[r]:ys[r + 1]].sum(dim=(0, 2), dtype=torch.float64)  # [W]: every channel of each column
        edges = torch.cat([band.new_zeros(1), band.cumsum(0)])  # [W + 1]
        for c in range(g):
            count = (ys[r + 1] - ys[r]) * (xs[c + 1] - xs[c]) * img.shape[2] * scale
            cells.append(round(float(edges[xs[c + 1]] - edges[xs[c]]) / max(count, 1), 4))
    return tuple(cells)


def check_same_photo(photo: torch.Tensor, box: FaceBox) -> None:
    """Refuse a ``photo`` (``[H, W, 3]`` or a batch: its first frame) of the face box's source size that is
    another picture than the one the box was found on: more than ``FINGERPRINT_MAX_CHANGED`` of the
    fingerprint's cells moved by over ``FINGERPRINT_LEVEL_TOL``. A float16 copy, mild edits or another
    face pasted in (a chain of paste-backs) move far fewer. Boxes without a fingerprint pass."""
    if getattr(box, "fingerprint", None) is None:
        return
    now = torch.tensor(image_fingerprint(photo))
    then = torch.tensor(box.fingerprint)
    if now.shape != then.shape:
        return
    changed = float(((now - then).abs() > config.FINGERPRINT_LEVEL_TOL).float().mean())
    if changed > config.FINGERPRINT_MAX_CHANGED:
        h, w = (photo[0] if photo.ndim == 4 else photo).shape[:2]
        raise ValueError(f"the photo is {w}x{h} like the image the face box was found on, but it is another "
                         f"picture ({changed:.0%} of its {config.FINGERPRINT_GRID}x{config.FINGERPRINT_GRID} "
                         f"grid differs by more than {config.FINGERPRINT_LEVEL_TOL * config.U8_MAX:.0f}/255): "
                         "connect the image you gave Face Mask Detect to photo (or give Face Mask Detect this "
                         "photo)")


@dataclass(frozen=True)
class FaceMaskResult:
    """What SonicFaceMaskDetect returns: ``image [H, W, 3]``, ``mask [H, W]`` (0/1), ``box``."""

    image: torch.Tensor
    mask: torch.Tensor
    box: FaceBox


# ----------------------------------------------------------------------------------------------
# Boxes, crop and mask
# ----------------------------------------------------------------------------------------------
def process_bbox(box_xyxy, expand_ratio: float, height: int, width: int) -> list[int]:
    """Square crop ``[x1, y1, x2, y2]`` (ints) around a face box, as the official helper (SPEC §2.6).

    The box is expanded by ``expand_ratio`` times its size on every side and clipped to the
    image; a square of the expanded box's short side is centred on it, then shifted along the
    long side towards the face centre (at most to the expanded box's edge). Corners are rounded
    half-to-even, so the result can be one pixel off square.
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    bw, bh = x2 - x1, y2 - y1
    ex1 = max(x1 - expand_ratio * bw, 0)
    ey1 = max(y1 - expand_ratio * bh, 0)
    ex2 = min(x2 + expand_ratio * bw, width)
    ey2 = min(y2 + expand_ratio * bh, height)
    eh, ew = ey2 - ey1, ex2 - ex1
    cy, cx = (ey1 + ey2) / 2, (ex1 + ex2) / 2
    half = min(eh, ew) / 2
    face_cy, face_cx = (y1 + y2) / 2, (x1 + x2) / 2
    slack = abs((eh - ew) / 2)  # how far the square may move along the long side
    if ew < eh:
        shift = min(slack, abs(face_cy - cy))
        cy = cy + (shift if face_cy > cy else -shift)
    else:
        shift = min(slack, abs(face_cx - cx))
        cx = cx + (shift if face_cx > cx else -shift)
    sx1, sy1, sx2, sy2 = cx - half, cy - half, cx + half, cy + half
    side = min(sx2 - sx1, sy2 - sy1)
    mx, my = (sx1 + sx2) / 2, (sy1 + sy2) / 2
    return [round(mx - side / 2), round(my - side / 2), round(mx + side / 2), round(my + side / 2)]


def mask_rect(box: FaceBox | tuple, width: int, height: int,
              area: float = config.MASK_AREA) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(X1, Y1, X2, Y2)`` (end exclusive) of the face mask, SPEC §2.2.

    The box is scaled by ``area`` about its floored centre; half-sizes are floored; the result
    is clipped to the image and truncated to ints.
    """
    x, y, bw, bh = (box.x, box.y, box.w, box.h) if isinstance(box, FaceBox) else box
    x2, y2 = x + bw, y + bh
    mw, mh = (x2 - x) * area, (y2 - y) * area
    cx, cy = (x2 + x) // 2, (y2 + y) // 2
    rx1 = max(cx - mw // 2, 0)
    ry1 = max(cy - mh // 2, 0)
    rx2 = min(cx + mw // 2, width)
    ry2 = min(cy + mh // 2, height)
    return int(rx1), int(ry1), max(int(rx2), int(rx1)), max(int(ry2), int(ry1))


def face_mask(box: FaceBox | tuple, width: int, height: int, area: float = config.MASK_AREA) -> torch.Tensor:
    """Face mask ``[height, width]`` float32: 1 inside the box scaled by ``area``, 0 elsewhere."""
    x1, y1, x2, y2 = mask_rect(box, width, height, area)
    mask = torch.zeros(height, width, dtype=torch.float32)
    mask[y1:y2, x1:x2] = 1.0
    return mask


def box_from_mask(mask: torch.Tensor, threshold: float = config.MASK_BOX_THRESHOLD) -> FaceBox | None:
    """Bounding box of the pixels of a ``[H, W]`` mask above ``threshold`` (None if there are none)."""
    on = mask > threshold  # [H, W]
    if not bool(on.any()):
        return None
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    h, w = mask.shape
    return FaceBox(x=float(x0), y=float(y0), w=float(x1 - x0), h=float(y1 - y0),
                   image_size=(w, h), source="mask")


def largest_face(boxes):
    """The box with the largest area (first one on ties, i.e. the higher-scoring); None if empty."""
    best = None
    for b in boxes:
        if best is None or b.w * b.h > best.w * best.h:
            best = b
    return best


# ----------------------------------------------------------------------------------------------
# Does a mask (an alpha channel, a MASK input) mark the face?
# ----------------------------------------------------------------------------------------------
MASK_KINDS = ("face", "cutout", "none")


@dataclass(frozen=True)
class MaskVerdict:
    """What a mask says: ``kind`` "face" (``box`` marks it), "cutout" (a transparent background: the
    image is composited onto a plain background and the detector finds the face) or "none" (no face
    mask: the detector runs); ``why`` says so in words, for the log and for error messages."""

    kind: str
    why: str
    box: FaceBox | None = None


def _regions(on: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes ``(r0, c0, r1, c1)`` (end exclusive) of the 8-connected regions of a bool grid."""
    seen = np.zeros_like(on)
    rows, cols = on.shape
    boxes = []
    for r, c in zip(*np.nonzero(on)):
        if seen[r, c]:
            continue
        seen[r, c] = True
        todo, box = [(r, c)], [r, c, r + 1, c + 1]
        while todo:
            y, x = todo.pop()
            box = [min(box[0], y), min(box[1], x), max(box[2], y + 1), max(box[3], x + 1)]
            for ny in range(max(y - 1, 0), min(y + 2, rows)):
                for nx in range(max(x - 1, 0), min(x + 2, cols)):
                    if on[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        todo.append((ny, nx))
        boxes.append(tuple(int(v) for v in box))
    return boxes


def judge_mask(mask: torch.Tensor, what: str = "the mask",
               threshold: float = config.MASK_BOX_THRESHOLD) -> MaskVerdict:
    """Whether a ``[H, W]`` mask (1 = marked; for an alpha channel 1 = transparent) plausibly marks a
    face: one region, its box at least ``MASK_FACE_MIN_SIDE_FRACTION`` of the short side and at most
    ``MASK_FACE_MAX_AREA_FRACTION`` of the image, and marked on at most ``MASK_CUTOUT_BORDER_FRACTION``
    of the border. Marked on more of the border: a cut-out's transparent background. Nothing above
    ``threshold`` (Load Image's empty placeholder, alpha 250 everywhere) or only specks: no face mask.
    """
    m = mask.detach().to("cpu", torch.float32)
    h, w = m.shape
    on = (m > threshold).numpy()  # [H, W]
    if not on.any():
        peak = float(m.max()) if m.numel() else 0.0
        return MaskVerdict("none", f"{what} is empty (nothing above {threshold:g}; its peak is {peak:.3g})")
    border = np.concatenate([on[0], on[-1], on[1:-1, 0], on[1:-1, -1]])  # every edge pixel once
    share = float(border.mean())
    if share > config.MASK_CUTOUT_BORDER_FRACTION:
        return MaskVerdict("cutout", f"{what} is marked on {share:.0%} of the image border: a transparent "
                                     "background (a cut-out), not a face mask")
    cell = max(1, -(-max(h, w) // config.MASK_GRID_SIDE))  # px per grid cell, rounded up
    gh, gw = -(-h // cell), -(-w // cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=bool)
    padded[:h, :w] = on
    grid = padded.reshape(gh, cell, gw, cell).any(axis=(1, 3))  # [gh, gw]: any marked pixel per cell
    min_side = config.MASK_FACE_MIN_SIDE_FRACTION * min(h, w)
    faces, specks = [], []
    for r0, c0, r1, c1 in _regions(grid):
        y0, x0, y1, x1 = r0 * cell, c0 * cell, min(r1 * cell, h), min(c1 * cell, w)
        part = box_from_mask(m[y0:y1, x0:x1], threshold)  # the exact box inside the region's cells
        box = replace(part, x=part.x + x0, y=part.y + y0, image_size=(w, h))
        (faces if min(box.w, box.h) >= min_side else specks).append(box)
    if not faces:
        big = max(specks, key=lambda b: b.area)
        return MaskVerdict("none", f"{what} marks only {len(specks)} speck(s) (the largest {big.w:.0f}x"
                                   f"{big.h:.0f} px, under {min_side:.0f} px), not a face")
    if len(faces) > 1:
        return MaskVerdict("none", f"{what} marks {len(faces)} separate regions, not one face")
    box = faces[0]
    if box.area > config.MASK_FACE_MAX_AREA_FRACTION * w * h:
        return MaskVerdict("none", f"{what} marks {box.area / (w * h):.0%} of the image, not a face")
    ignored = f" ({len(specks)} speck(s) ignored)" if specks else ""
    return MaskVerdict("face", f"{what} marks the face: {box.w:.0f}x{box.h:.0f} px at "
                               f"({box.x:.0f}, {box.y:.0f}){ignored}", box)


# ----------------------------------------------------------------------------------------------
# Detector wrapper
# ----------------------------------------------------------------------------------------------
def load_detector(path: str, device: torch.device | str):
    """The YOLOv5-face TorchScript file at ``path`` on ``device``."""
    from .models.face_detector import YoloFaceDetector

    return YoloFaceDetector.from_file(path, device)


def detect_largest_face(detector, image: torch.Tensor, confidence: float = config.DETECTOR_CONFIDENCE,
                        iou: float = config.DETECTOR_NMS_IOU) -> FaceBox | None:
    """Largest face in an RGB float ``[H, W, 3]`` image, or None."""
    h, w = image.shape[:2]
    dets = detector.detect(to_u8(image), confidence, iou)
    best = largest_face(dets)
    if best is None:
        return None
    log.info("face detector: %d face(s); chosen %.1f,%.1f %.1fx%.1f (score %.3f)",
             len(dets), best.x, best.y, best.w, best.h, best.score)
    return FaceBox(x=best.x, y=best.y, w=best.w, h=best.h, image_size=(w, h), source="detector",
                   score=best.score)


def detect_face_mask(image: torch.Tensor, detector=None, mask: torch.Tensor | None = None,
                     crop: bool = True, expand_ratio: float = config.CROP_EXPAND_RATIO,
                     mask_area: float = config.MASK_AREA, on_no_face: str = "error",
                     confidence: float = config.DETECTOR_CONFIDENCE,
                     mask_name: str = "the mask") -> FaceMaskResult:
    """Find the face, optionally crop a square around it, and build the face mask.

    image: ComfyUI image (see ``to_rgb``). detector: a ``YoloFaceDetector`` or None. mask: an
    optional ``[H, W]`` / ``[B, H, W]`` MASK whose bounding box marks the face (wins over the
    detector) when ``judge_mask`` finds it a face mask; a cut-out is composited onto a plain
    background first; ``mask_name`` names it in the log and in errors. Returns the (cropped) image
    ``[h, w, 3]``, its mask ``[h, w]`` and the face box in its pixels.
    """
    if on_no_face not in ON_NO_FACE:
        raise ValueError(f"on_no_face={on_no_face!r}; choose one of {ON_NO_FACE}")
    if expand_ratio < 0:
        raise ValueError(f"expand_ratio={expand_ratio} must be >= 0")
    if mask_area <= 0:
        raise ValueError(f"mask_area={mask_area} must be > 0")
    image = to_rgb(image)
    source = image  # as given (before a cut-out is flattened): what paste-back's photo is checked against
    h, w = image.shape[:2]

    box, verdict = None, None
    if mask is not None:
        m = mask[0] if mask.ndim == 3 else mask  # [H, W]
        verdict = judge_mask(m, mask_name)
        if verdict.kind != "none" and tuple(m.shape) != (h, w):
            raise ValueError(f"face mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}: "
                             "draw the mask on this image")
        if verdict.kind == "face":
            box = verdict.box
            log.info("%s: used as the face box", verdict.why)
        elif verdict.kind == "cutout":
            from .image import flatten_cutout

            image = flatten_cutout(image, m.to(image.device))  # [H, W, 3]
            log.info("%s: composited onto a plain background (grey level %g); %s", verdict.why,
                     config.CUTOUT_BACKGROUND, "the face detector finds the face" if detector is not None
                     else "no detector chosen")
        else:
            log.info("%s: %s", verdict.why, "the face detector runs" if detector is not None
                     else "no detector chosen")
    if box is None and detector is not None:
        box = detect_largest_face(detector, image, confidence)
    if box is None:
        if on_no_face == "error":
            tried = " and ".join(
                ([verdict.why] if verdict is not None else [])
                + (["no face detected"] if detector is not None else [])
            ) or "no detector and no mask given"
            raise ValueError(
                f"no face found in the {w}x{h} image ({tried}): lower the confidence threshold, "
                "crop the image tighter around the face, choose a detector file, or connect a "
                "mask that covers the face (or set on_no_face to whole_image)"
            )
        log.warning("no face found: the whole %dx%d image is used as the face", w, h)
        box = FaceBox(x=0.0, y=0.0, w=float(w), h=float(h), image_size=(w, h), source="whole_image")
        return FaceMaskResult(image=image, mask=torch.ones(h, w), box=box)

    if crop:
        x1, y1, x2, y2 = process_bbox(box.xyxy, expand_ratio, h, w)
        if min(x2 - x1, y2 - y1) < config.MIN_IMAGE_SIDE:
            raise ValueError(
                f"the face crop {x2 - x1}x{y2 - y1} px is under {config.MIN_IMAGE_SIDE} px: raise "
                "expand_ratio, turn crop off, or use a larger image"
            )
        image = image[y1:y2, x1:x2]  # [h', w', 3]
        ch, cw = image.shape[:2]
        found = detect_largest_face(detector, image, confidence) if box.source == "detector" else None
        if found is None:
            found = replace(box, x=box.x - x1, y=box.y - y1, image_size=(cw, ch))
        box = replace(found, crop_xyxy=(x1, y1, x2, y2), source_size=(w, h), fingerprint=image_fingerprint(source))
        h, w = ch, cw
    return FaceMaskResult(image=image, mask=face_mask(box, w, h, mask_area), box=box)
