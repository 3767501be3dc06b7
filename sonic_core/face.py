"""Face detection, face box -> square crop, and face mask (image transforms live in image.py).

SPEC §2. Boxes are floats in image pixels, ``(x, y, w, h)`` with ``(x, y)`` the top-left corner,
as the official detector returns them. Images are ComfyUI-style ``[H, W, C]`` float tensors in
``[0, 1]`` unless a name says ``u8``.

Project decisions (where the official code has a quirk or no answer):
* Several faces: the truly largest box wins (the official loop compares with box 0 only);
  equal areas keep the higher-scoring one (detector order). ``face_index`` k >= 1 picks the k-th
  face from the left instead (``find_faces`` numbers them 1..N by box centre; issue 30).
* A MASK input marks the face by its bounding box (pixels > 0.5) and takes precedence over the
  detector, when it plausibly is a face mask (``judge_mask``: regions of plausible size, off
  most of the border); several such regions mark several faces. A transparent background (a
  cut-out) is composited onto a plain background and the detector runs; an empty mask (Load
  Image's placeholder) or specks leave it to the detector.
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
    ``source_size = (width, height)`` that input image's size (paste-back checks the photo against it).
    ``number``: 1-based number of this face among all faces found, left to right by box centre (0 = not
    numbered, e.g. whole_image); ``others``: the boxes ``(x1, y1, x2, y2)`` (not expanded) of every other
    face found, in the pixels of the source photo (paste-back leaves their head regions untouched).
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
    number: int = 0
    others: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x + self.w, self.y + self.h)

    @property
    def area(self) -> float:
        return self.w * self.h


@dataclass(frozen=True)
class FaceMaskResult:
    """What SonicFaceMaskDetect returns: ``image [H, W, 3]``, ``mask [H, W]`` (0/1), ``box``; ``faces``:
    every face found, numbered, in the pixels of the input image (for ``face_preview``)."""

    image: torch.Tensor
    mask: torch.Tensor
    box: FaceBox
    faces: tuple[FaceBox, ...] = ()


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
    mask: the detector runs); ``why`` says so in words, for the log and for error messages.
    ``boxes``: every face region's box (kind "face"; ``box`` is the largest of them)."""

    kind: str
    why: str
    box: FaceBox | None = None
    boxes: tuple[FaceBox, ...] = ()


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
    """Whether a ``[H, W]`` mask (1 = marked; for an alpha channel 1 = transparent) plausibly marks
    faces: each region's box at least ``MASK_FACE_MIN_SIDE_FRACTION`` of the short side and at most
    ``MASK_FACE_MAX_AREA_FRACTION`` of the image, and marked on at most ``MASK_CUTOUT_BORDER_FRACTION``
    of the border. Several such regions: several faces (``boxes``; ``box`` is the largest). Marked on
    more of the border: a cut-out's transparent background. Nothing above ``threshold`` (Load
    Image's empty placeholder, alpha 250 everywhere) or only specks: no face mask.
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
    for box in faces:
        if box.area > config.MASK_FACE_MAX_AREA_FRACTION * w * h:
            return MaskVerdict("none", f"{what} marks {box.area / (w * h):.0%} of the image, not a face")
    ignored = f" ({len(specks)} speck(s) ignored)" if specks else ""
    box = largest_face(faces)
    if len(faces) > 1:
        why = (f"{what} marks {len(faces)} separate regions: {len(faces)} faces, the largest "
               f"{box.w:.0f}x{box.h:.0f} px at ({box.x:.0f}, {box.y:.0f}){ignored}")
        return MaskVerdict("face", why, box, tuple(faces))
    return MaskVerdict("face", f"{what} marks the face: {box.w:.0f}x{box.h:.0f} px at "
                               f"({box.x:.0f}, {box.y:.0f}){ignored}", box, (box,))


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


def detect_faces(detector, image: torch.Tensor, confidence: float = config.DETECTOR_CONFIDENCE,
                 iou: float = config.DETECTOR_NMS_IOU) -> list[FaceBox]:
    """Every face the detector keeps (score above ``confidence``, after NMS) in an RGB float
    ``[H, W, 3]`` image, best score first, not numbered."""
    h, w = image.shape[:2]
    return [FaceBox(x=d.x, y=d.y, w=d.w, h=d.h, image_size=(w, h), source="detector", score=d.score)
            for d in detector.detect(to_u8(image), confidence, iou)]


def _centre(box: FaceBox) -> tuple[float, float]:
    return (box.x + box.w / 2, box.y + box.h / 2)


def number_faces(boxes) -> list[FaceBox]:
    """The boxes left to right by box centre (top to bottom on a tie), numbered 1..N, each carrying
    the other faces' boxes in ``others``."""
    order = sorted(boxes, key=_centre)
    return [replace(b, number=k + 1, others=tuple(o.xyxy for j, o in enumerate(order) if j != k))
            for k, b in enumerate(order)]


def choose_face(boxes, face_index: int) -> FaceBox:
    """``face_index`` 0: the largest face (today's choice; equal areas keep the higher score);
    k >= 1: the k-th face from the left (by box centre). Past the faces found: ValueError saying
    how many were found."""
    if isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer)) or face_index < 0:
        raise ValueError(f"face_index {face_index!r} must be a whole number >= 0 (0 = the largest face, "
                         "1..N = the N-th face from the left)")
    boxes = list(boxes)
    n = len(boxes)
    if face_index > n or n == 0:
        found = "no face was found" if n == 0 else \
            f"only {n} face{'s were' if n > 1 else ' was'} found (numbered 1..{n} from the left)"
        raise ValueError(f"face_index {face_index} is past the faces in the photo: {found}. Choose a face "
                         "number from the preview (0 = the largest face), or lower the confidence if a "
                         "face is missed")
    if face_index == 0:  # by score first (stable), so equal areas keep the higher-scoring face
        return largest_face(sorted(boxes, key=lambda b: -(b.score if b.score is not None else 0.0)))
    return sorted(boxes, key=_centre)[face_index - 1]


def _faces_in(image: torch.Tensor, detector, mask: torch.Tensor | None, confidence: float, mask_name: str):
    """(image, faces, verdict) for an RGB ``[H, W, 3]`` image: the image composited onto a plain
    background if the mask is a cut-out, the faces numbered left to right (from the mask's face
    regions, else from the detector), the mask's verdict (None without a mask)."""
    h, w = image.shape[:2]
    verdict, faces = None, []
    if mask is not None:
        m = mask[0] if mask.ndim == 3 else mask  # [H, W]
        verdict = judge_mask(m, mask_name)
        if verdict.kind != "none" and tuple(m.shape) != (h, w):
            raise ValueError(f"face mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}: "
                             "draw the mask on this image")
        if verdict.kind == "face":
            faces = list(verdict.boxes)
            log.info("%s: used as the face box%s", verdict.why, "es" if len(faces) > 1 else "")
        elif verdict.kind == "cutout":
            from .image import flatten_cutout

            image = flatten_cutout(image, m.to(image.device))  # [H, W, 3]
            log.info("%s: composited onto a plain background (grey level %g); %s", verdict.why,
                     config.CUTOUT_BACKGROUND, "the face detector finds the face" if detector is not None
                     else "no detector chosen")
        else:
            log.info("%s: %s", verdict.why, "the face detector runs" if detector is not None
                     else "no detector chosen")
    if not faces and detector is not None:
        faces = detect_faces(detector, image, confidence)
        log.info("face detector: %d face(s) at confidence %g", len(faces), confidence)
    return image, number_faces(faces), verdict


def find_faces(image: torch.Tensor, detector=None, mask: torch.Tensor | None = None,
               confidence: float = config.DETECTOR_CONFIDENCE, mask_name: str = "the mask") -> list[FaceBox]:
    """Every face in a ComfyUI image (see ``to_rgb``), in its pixels, left to right, numbered 1..N:
    the face regions of ``mask`` when it marks faces (``judge_mask``), else every box the detector
    keeps (a cut-out mask is composited first, as ``detect_face_mask`` does). Empty if none."""
    return _faces_in(to_rgb(image), detector, mask, confidence, mask_name)[1]


def _match_on_crop(detector, crop: torch.Tensor, want: FaceBox, confidence: float) -> FaceBox | None:
    """The face re-detected on ``crop`` that overlaps ``want`` (in crop pixels) most, if its IoU
    reaches ``FACE_MATCH_MIN_IOU``: a neighbour's face reaching into the crop is never taken."""
    best, best_iou = None, config.FACE_MATCH_MIN_IOU
    for b in detect_faces(detector, crop, confidence):
        iou = _iou(b.xyxy, want.xyxy)
        if iou >= best_iou:
            best, best_iou = b, iou
    return best


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_face_mask(image: torch.Tensor, detector=None, mask: torch.Tensor | None = None,
                     crop: bool = True, expand_ratio: float = config.CROP_EXPAND_RATIO,
                     mask_area: float = config.MASK_AREA, on_no_face: str = "error",
                     confidence: float = config.DETECTOR_CONFIDENCE,
                     mask_name: str = "the mask", face_index: int = 0) -> FaceMaskResult:
    """Find the face, optionally crop a square around it, and build the face mask.

    image: ComfyUI image (see ``to_rgb``). detector: a ``YoloFaceDetector`` or None. mask: an
    optional ``[H, W]`` / ``[B, H, W]`` MASK whose face regions mark the faces (wins over the
    detector) when ``judge_mask`` finds it a face mask; a cut-out is composited onto a plain
    background first; ``mask_name`` names it in the log and in errors. ``face_index``: 0 = the
    largest face, k = the k-th from the left (``choose_face``). Returns the (cropped) image
    ``[h, w, 3]``, its mask ``[h, w]``, the face box in its pixels (numbered, with the other faces'
    boxes in source pixels) and every face found.
    """
    if on_no_face not in ON_NO_FACE:
        raise ValueError(f"on_no_face={on_no_face!r}; choose one of {ON_NO_FACE}")
    if expand_ratio < 0:
        raise ValueError(f"expand_ratio={expand_ratio} must be >= 0")
    if mask_area <= 0:
        raise ValueError(f"mask_area={mask_area} must be > 0")
    image = to_rgb(image)
    h, w = image.shape[:2]

    image, faces, verdict = _faces_in(image, detector, mask, confidence, mask_name)
    if not faces:
        if on_no_face == "error" or face_index:
            tried = " and ".join(
                ([verdict.why] if verdict is not None else [])
                + (["no face detected"] if detector is not None else [])
            ) or "no detector and no mask given"
            raise ValueError(
                f"no face found in the {w}x{h} image ({tried}): lower the confidence threshold, "
                "crop the image tighter around the face, choose a detector file, or connect a "
                "mask that covers the face (or set on_no_face to whole_image"
                + (f" and face_index to 0, not {face_index}" if face_index else "") + ")"
            )
        log.warning("no face found: the whole %dx%d image is used as the face", w, h)
        box = FaceBox(x=0.0, y=0.0, w=float(w), h=float(h), image_size=(w, h), source="whole_image")
        return FaceMaskResult(image=image, mask=torch.ones(h, w), box=box)
    box = choose_face(faces, face_index)
    log.info("%d face(s) found; chosen face %d of %d (%s): %.1f,%.1f %.1fx%.1f%s", len(faces), box.number,
             len(faces), "the largest" if face_index == 0 else "from the left", box.x, box.y, box.w, box.h,
             "" if box.score is None else f" (score {box.score:.3f})")

    if crop:
        x1, y1, x2, y2 = process_bbox(box.xyxy, expand_ratio, h, w)
        if min(x2 - x1, y2 - y1) < config.MIN_IMAGE_SIDE:
            raise ValueError(
                f"the face crop {x2 - x1}x{y2 - y1} px is under {config.MIN_IMAGE_SIDE} px: raise "
                "expand_ratio, turn crop off, or use a larger image"
            )
        image = image[y1:y2, x1:x2]  # [h', w', 3]
        ch, cw = image.shape[:2]
        shifted = replace(box, x=box.x - x1, y=box.y - y1, image_size=(cw, ch))
        found = None
        if box.source == "detector":  # index 0: the largest on the crop, as the official demo
            found = detect_largest_face(detector, image, confidence) if face_index == 0 else \
                _match_on_crop(detector, image, shifted, confidence)
        if found is None:
            found = shifted
        box = replace(found, crop_xyxy=(x1, y1, x2, y2), source_size=(w, h), number=box.number,
                      others=box.others)
        h, w = ch, cw
    return FaceMaskResult(image=image, mask=face_mask(box, w, h, mask_area), box=box, faces=tuple(faces))


# ----------------------------------------------------------------------------------------------
# Preview: every face boxed and numbered, the chosen one highlighted
# ----------------------------------------------------------------------------------------------
DIGIT_BITMAPS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111",
                 "101101111001001", "111100111001111", "111100111101111", "111001001001001",
                 "111101111101111", "111101111001111")  # 0..9: 3 columns x 5 rows, row by row
DIGIT_COLS, DIGIT_ROWS = 3, 5


def _fill(out: torch.Tensor, x0: int, y0: int, x1: int, y1: int, colour: torch.Tensor) -> None:
    """Paint ``out[y0:y1, x0:x1]`` (clipped to the image) with an RGB ``[3]`` colour, in place."""
    h, w = out.shape[:2]
    x0, x1, y0, y1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = colour


def _label(out: torch.Tensor, x: int, y: int, number: int, cell: int, colour, ink) -> None:
    """The number in ``DIGIT_BITMAPS`` cells of ``cell`` px, on a ``colour`` label whose top-left is
    ``(x, y)`` (moved inside the image where it fits)."""
    h, w = out.shape[:2]
    text = str(number)
    lw = cell * (2 + len(text) * (DIGIT_COLS + 1) - 1)  # one cell of margin round, one between digits
    lh = cell * (2 + DIGIT_ROWS)
    x, y = min(max(x, 0), max(w - lw, 0)), min(max(y, 0), max(h - lh, 0))
    _fill(out, x, y, x + lw, y + lh, colour)
    for k, ch in enumerate(text):
        bits = DIGIT_BITMAPS[int(ch)]
        dx = x + cell * (1 + k * (DIGIT_COLS + 1))
        for r in range(DIGIT_ROWS):
            for c in range(DIGIT_COLS):
                if bits[r * DIGIT_COLS + c] == "1":
                    x0, y0 = dx + c * cell, y + (1 + r) * cell
                    _fill(out, x0, y0, x0 + cell, y0 + cell, ink)


def face_preview(image: torch.Tensor, boxes, chosen: int | None = None) -> torch.Tensor:
    """The image (``[H, W, 3]`` float, or anything ``to_rgb`` takes) with every face box outlined and
    numbered (``FaceBox.number``, else its place in ``boxes``), the face numbered ``chosen`` in
    ``FACE_PREVIEW_CHOSEN_COLOUR`` with a thicker line, the others in ``FACE_PREVIEW_COLOUR``.
    Returns ``[H, W, 3]`` float32; pixels away from the boxes and labels are the image's own."""
    out = to_rgb(image).detach().to("cpu", torch.float32).clone()  # [H, W, 3]
    h, w = out.shape[:2]
    line = max(config.FACE_PREVIEW_LINE_MIN_PX, round(config.FACE_PREVIEW_LINE_FRACTION * max(h, w)))
    cell = max(config.FACE_PREVIEW_DIGIT_MIN_PX, round(config.FACE_PREVIEW_DIGIT_FRACTION * min(h, w))) \
        // DIGIT_ROWS
    ink = torch.tensor(config.FACE_PREVIEW_DIGIT_COLOUR, dtype=torch.float32) / config.U8_MAX
    numbered = [(b.number or k + 1, b) for k, b in enumerate(boxes)]
    numbered.sort(key=lambda nb: nb[0] == chosen)  # the chosen face drawn last, on top
    for number, b in numbered:
        is_chosen = number == chosen
        rgb = config.FACE_PREVIEW_CHOSEN_COLOUR if is_chosen else config.FACE_PREVIEW_COLOUR
        colour = torch.tensor(rgb, dtype=torch.float32) / config.U8_MAX
        t = line * (config.FACE_PREVIEW_CHOSEN_LINE_SCALE if is_chosen else 1)
        x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
        x1, y1 = int(np.ceil(b.x + b.w)), int(np.ceil(b.y + b.h))
        _fill(out, x0, y0, x1, y0 + t, colour)  # top, bottom, left, right bands inside the box
        _fill(out, x0, y1 - t, x1, y1, colour)
        _fill(out, x0, y0, x0 + t, y1, colour)
        _fill(out, x1 - t, y0, x1, y1, colour)
        _label(out, x0, y0, number, cell, colour, ink)
    return out
