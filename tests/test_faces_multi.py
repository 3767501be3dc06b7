"""Several faces in one photo (issue 30 item 1): numbering left to right, choosing a face, the preview.

Faces come from three real sources: the transparency of a PNG written and read back (transparent =
marked, as ComfyUI's Load Image gives it: MASK = 1 - alpha), a drawn MASK, and detectors: the tiny
TorchScript YOLOv5-face stand-in of tests/test_face.py (fixed planted boxes, run through the real
YoloFaceDetector: decoding, confidence, NMS) and a colour-blob detector that finds skin-coloured
regions in the pixels it is given (so a crop shows what is really in it).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sonic_core import config, face
from sonic_core.image import to_u8
from sonic_core.pipeline import read_image
from tests.test_face import make_detector, plant  # noqa: F401 (fixture)

SKIN = (225, 185, 150)  # u8 RGB of the drawn faces
BACKGROUND = (70, 110, 160, 255)
# three faces (x0, y0, x1, y1) on a 320x160 photo: the largest is in the middle, not on the left
FACES3 = ((20, 40, 80, 120), (120, 20, 200, 120), (240, 50, 290, 120))


def _photo(path, faces, size=(320, 160), alpha_face=0):
    """An RGBA PNG: an opaque background with skin-coloured ellipses of alpha ``alpha_face``."""
    im = Image.new("RGBA", size, BACKGROUND)
    d = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in faces:
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=(*SKIN, alpha_face))  # PIL's box includes its end
    im.save(path)
    return path


class BlobDetector:
    """Finds skin-coloured regions in the uint8 image it is given (the detector's call format)."""

    def __init__(self, score=0.9):
        self.score, self.calls = score, 0

    def detect(self, image_u8, conf_threshold=None, iou_threshold=None):
        self.calls += 1
        px = image_u8.to(torch.int32).numpy()  # [H, W, 3]
        on = (np.abs(px - np.array(SKIN)).max(axis=2) <= 2)  # [H, W]
        return [SimpleNamespace(x=float(c0), y=float(r0), w=float(c1 - c0), h=float(r1 - r0),
                                score=self.score) for r0, c0, r1, c1 in face._regions(on)]


def _xyxy(b):
    return tuple(round(v) for v in b.xyxy)


# ----------------------------------------------------------------------------------------------
# numbering and choosing
# ----------------------------------------------------------------------------------------------
def test_transparency_with_three_faces_numbers_them_left_to_right(tmp_path):
    image, mask = read_image(_photo(tmp_path / "three.png", FACES3))
    verdict = face.judge_mask(mask[0], "its transparency")
    assert verdict.kind == "face" and "3 separate regions: 3 faces" in verdict.why
    assert _xyxy(verdict.box) == FACES3[1]  # the largest
    faces = face.find_faces(image, mask=mask)
    assert [_xyxy(b) for b in faces] == list(FACES3)
    assert [b.number for b in faces] == [1, 2, 3] and all(b.source == "mask" for b in faces)
    assert faces[0].others == (faces[1].xyxy, faces[2].xyxy)
    assert faces[2].others == (faces[0].xyxy, faces[1].xyxy)
    # face_index 0 = the largest (today's choice), 1..3 from the left, 4 is past them
    assert face.choose_face(faces, 0).number == 2
    assert [face.choose_face(faces, k).number for k in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"face_index 4 is past the faces in the photo: only 3 faces were"):
        face.choose_face(faces, 4)
    with pytest.raises(ValueError, match="face_index -1"):
        face.choose_face(faces, -1)


def test_detect_face_mask_crops_the_chosen_face_and_carries_the_others(tmp_path):
    image, mask = read_image(_photo(tmp_path / "three.png", FACES3))
    for k, want in ((0, 2), (1, 1), (3, 3)):
        res = face.detect_face_mask(image, None, mask=mask, crop=True, face_index=k)
        x0, y0, x1, y1 = FACES3[want - 1]
        cx1, cy1, cx2, cy2 = face.process_bbox((x0, y0, x1, y1), config.CROP_EXPAND_RATIO, 160, 320)
        assert res.box.number == want and res.box.crop_xyxy == (cx1, cy1, cx2, cy2)
        assert (res.box.x, res.box.y) == (x0 - cx1, y0 - cy1) and res.box.source_size == (320, 160)
        assert torch.equal(res.image, image[0, cy1:cy2, cx1:cx2])
        others = [tuple(round(v) for v in o) for o in res.box.others]  # source-photo pixels
        assert others == [f for i, f in enumerate(FACES3) if i != want - 1]
        assert len(res.faces) == 3
    with pytest.raises(ValueError, match="only 3 faces were found"):
        face.detect_face_mask(image, None, mask=mask, face_index=5)


def test_one_face_index_zero_is_as_before(tmp_path):
    image, mask = read_image(_photo(tmp_path / "one.png", FACES3[1:2]))
    res = face.detect_face_mask(image, None, mask=mask, crop=False)
    assert _xyxy(res.box) == FACES3[1] and res.box.number == 1 and res.box.others == ()
    assert torch.equal(res.mask, face.face_mask(res.box, 320, 160))
    assert face.detect_face_mask(image, None, mask=mask, crop=False, face_index=1).box == res.box
    with pytest.raises(ValueError, match="only 1 face was found"):
        face.detect_face_mask(image, None, mask=mask, face_index=2)


def test_drawn_mask_with_two_regions_and_rules_per_region():
    m = torch.zeros(160, 320)
    m[40:120, 200:270] = 1  # right face, larger
    m[50:110, 30:80] = 1  # left face
    m[5:7, 150:152] = 1  # a speck: ignored
    faces = face.find_faces(torch.rand(1, 160, 320, 3), mask=m[None])
    assert [_xyxy(b) for b in faces] == [(30, 50, 80, 110), (200, 40, 270, 120)]
    assert "2 separate regions" in face.judge_mask(m).why and "1 speck(s) ignored" in face.judge_mask(m).why
    # no face and a face index: an error (whole_image would animate everyone), naming the index
    with pytest.raises(ValueError, match="face_index to 0, not 2"):
        face.detect_face_mask(torch.rand(1, 160, 320, 3), None, mask=torch.zeros(1, 160, 320),
                              on_no_face="whole_image", face_index=2)


def test_tiny_yoloface_gives_every_box_above_the_confidence_after_nms(make_detector):  # noqa: F811
    detector, _ = make_detector(
        plant(1, 1, 10, 15, cls=2.0),  # source (94, 46.5) 60x75, score 0.88
        plant(0, 1, 12, 10),  # source (32, 37.5) 20x25, score 1
        plant(0, 1, 12, 11, cls=3.0),  # IoU 0.67 with the one above, lower score: suppressed
        plant(1, 0, 20, 5, cls=1.0),  # source (29, 149) 30x30, score 0.73
        plant(0, 0, 40, 40, cls=-1.0),  # score 0.27: under the confidence
    )
    img = torch.full((1, 208, 208, 3), 0.5)
    faces = face.find_faces(img, detector)
    assert [(b.x, b.y, b.w, b.h) for b in faces] == [(32.0, 37.5, 20.0, 25.0), (29.0, 149.0, 30.0, 30.0),
                                                     (94.0, 46.5, 60.0, 75.0)]  # by centre x: 42, 44, 124
    assert [b.number for b in faces] == [1, 2, 3] and faces[2].score == pytest.approx(0.8808, abs=1e-4)
    assert len(face.find_faces(img, detector, confidence=0.2)) == 4
    res = face.detect_face_mask(img, detector, crop=False, face_index=0)
    assert (res.box.x, res.box.number) == (94.0, 3)  # the largest, as before
    res = face.detect_face_mask(img, detector, crop=False, face_index=2)
    assert (res.box.x, res.box.y, res.box.number, len(res.box.others)) == (29.0, 149.0, 2, 2)


def test_crop_redetects_the_chosen_face_not_a_bigger_neighbour(tmp_path):
    # a small face with a bigger one beside it; with a wide margin the crop holds the neighbour whole
    small, big = (40, 60, 80, 110), (90, 40, 160, 130)
    image, _ = read_image(_photo(tmp_path / "pair.png", (small, big), size=(240, 200), alpha_face=255))
    det = BlobDetector()
    faces = face.find_faces(image, det)
    assert [_xyxy(b) for b in faces] == [small, big]
    res = face.detect_face_mask(image, det, crop=True, expand_ratio=2.0, face_index=1)
    x1, y1, x2, y2 = res.box.crop_xyxy
    assert x1 <= big[0] and big[2] <= x2  # the neighbour is inside the crop
    assert _xyxy(res.box) == (small[0] - x1, small[1] - y1, small[2] - x1, small[3] - y1)
    assert res.box.number == 1 and res.box.score == 0.9 and det.calls == 3  # find_faces, photo, crop
    assert torch.equal(res.mask, face.face_mask(res.box, x2 - x1, y2 - y1))
    # face_index 0 keeps today's rule: the largest face, re-detected as the largest on its crop
    res0 = face.detect_face_mask(image, det, crop=True, expand_ratio=2.0)
    assert res0.box.number == 2 and res0.box.w == big[2] - big[0]


# ----------------------------------------------------------------------------------------------
# preview
# ----------------------------------------------------------------------------------------------
def _u8(t):
    return tuple(int(v) for v in to_u8(t))


def test_preview_boxes_every_face_and_highlights_the_chosen_one(tmp_path):
    image, mask = read_image(_photo(tmp_path / "three.png", FACES3))
    faces = face.find_faces(image, mask=mask)
    out = face.face_preview(image, faces, chosen=3)
    assert out.shape == (160, 320, 3) and out.dtype == torch.float32
    line = max(config.FACE_PREVIEW_LINE_MIN_PX, round(config.FACE_PREVIEW_LINE_FRACTION * 320))
    thick = line * config.FACE_PREVIEW_CHOSEN_LINE_SCALE
    for number, (x0, y0, x1, y1) in enumerate(FACES3, 1):
        colour = config.FACE_PREVIEW_CHOSEN_COLOUR if number == 3 else config.FACE_PREVIEW_COLOUR
        t = thick if number == 3 else line
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        assert _u8(out[y1 - 1, mid_x]) == colour and _u8(out[y1 - t, mid_x]) == colour  # bottom edge
        assert _u8(out[mid_y, x1 - 1]) == colour and _u8(out[mid_y, x0]) == colour  # right, left edges
        assert _u8(out[y1 - t - 1, mid_x]) == _u8(image[0, y1 - t - 1, mid_x])  # just inside: the photo
    # away from the boxes the photo is untouched (no rounding: the same float pixels)
    assert torch.equal(out[150:, :], image[0, 150:, :]) and torch.equal(out[:, 300:], image[0, :, 300:])
    # each label: the box colour with the number's bitmap in ink, at the box's top-left corner
    cell = max(config.FACE_PREVIEW_DIGIT_MIN_PX, round(config.FACE_PREVIEW_DIGIT_FRACTION * 160)) // 5
    ink = torch.tensor(config.FACE_PREVIEW_DIGIT_COLOUR) / 255.0
    for number, (x0, y0, _, _) in enumerate(FACES3, 1):
        label = out[y0:y0 + 7 * cell, x0:x0 + 5 * cell]  # [7 cells, 5 cells, 3]: margin + 3x5 digit
        got = (label - ink).abs().amax(dim=2) < 1e-6  # [h, w] ink pixels
        bits = face.DIGIT_BITMAPS[number]
        want = torch.zeros(7 * cell, 5 * cell, dtype=torch.bool)
        for r in range(5):
            for c in range(3):
                if bits[3 * r + c] == "1":
                    want[(1 + r) * cell:(2 + r) * cell, (1 + c) * cell:(2 + c) * cell] = True
        assert torch.equal(got, want), number
    # no chosen face: all amber; no faces: the photo itself
    plain = face.face_preview(image, faces, None)
    assert _u8(plain[FACES3[2][3] - 1, 265]) == config.FACE_PREVIEW_COLOUR
    assert torch.equal(face.face_preview(image, [], None), image[0])


def test_node_face_index_and_preview(tmp_path):
    from nodes import nodes_face

    cls = nodes_face.SonicFaceMaskDetect
    spec = cls.INPUT_TYPES()["optional"]["face_index"]
    assert spec[0] == "INT" and spec[1]["default"] == 0 and spec[1]["max"] == config.FACE_INDEX_MAX
    assert cls.RETURN_NAMES[-1] == "preview" and cls.RETURN_TYPES[-1] == "IMAGE"
    image, mask = read_image(_photo(tmp_path / "three.png", FACES3))
    out, fmask, box, preview = cls().detect(image, "none", True, 0.5, 1.1, 0.5, "error", mask=mask,
                                            face_index=1)
    assert box.number == 1 and out.shape[1:3] == fmask.shape[1:] and preview.shape == (1, 160, 320, 3)
    x0, _, x1, y1 = FACES3[0]
    assert _u8(preview[0, y1 - 1, (x0 + x1) // 2]) == config.FACE_PREVIEW_CHOSEN_COLOUR
    with pytest.raises(ValueError, match="only 3 faces were found"):
        cls().detect(image, "none", True, 0.5, 1.1, 0.5, "error", mask=mask, face_index=4)
    with pytest.raises(ValueError, match="face_index 65 is out of range"):
        cls().detect(image, "none", True, 0.5, 1.1, 0.5, "error", mask=mask, face_index=65)
    # whole_image: nothing boxed
    _, _, box, preview = cls().detect(torch.rand(1, 80, 100, 3), "none", True, 0.5, 1.1, 0.5, "whole_image")
    assert box.source == "whole_image" and box.number == 0 and preview.shape == (1, 80, 100, 3)


def test_yoloface_style_network_numbers_every_kept_box():
    """The YOLOv5-face-style network of tests/_yoloface (planted faces on one level, many cells): every
    box the real YoloFaceDetector keeps after the confidence and NMS is a numbered face. (Its
    TorchScript exports and their loading are tested in tests/test_face.py; eager here, for speed.)"""
    from sonic_core.models import face_detector as fd
    from tests import _yoloface as yolo

    detector = fd.YoloFaceDetector(yolo.plant_faces(yolo.build(seed=3)).eval(), "cpu")
    img = torch.rand(1, 208, 208, 3, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.1 s network: more threads only wait on each other on a busy CPU
    try:
        kept = detector.detect(to_u8(img[0]))
        faces = face.find_faces(img, detector)
    finally:
        torch.set_num_threads(threads)
    assert len(faces) == len(kept) >= 2
    centres = [b.x + b.w / 2 for b in faces]
    assert centres == sorted(centres) and [b.number for b in faces] == list(range(1, len(kept) + 1))
    assert sorted((b.x, b.y, b.score) for b in faces) == sorted((d.x, d.y, d.score) for d in kept)
    assert face.choose_face(faces, 0).area == max(d.area for d in kept)
