"""Face family: crop helper, face mask, and the detector path (image transforms: test_image.py).

The detector tests build a tiny TorchScript module with the official call signature
``model(image, grids)`` that decodes planted raw YOLOv5-face predictions with the grids it is
given (sigmoid, ``(2s - 0.5 + grid) * stride``, ``(2s)^2 * anchor``), save it with
``torch.jit.save`` and load it through the real loader, so loading, grids, confidence filter,
NMS, rescaling and the largest-face choice are all exercised. Expected boxes are worked out by
hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sonic_core import config, face
from sonic_core.image import to_u8
from sonic_core.models import face_detector as fd
from sonic_core.models import torchscript_check, torchscript_code
from tests import _yoloface as yolo
from tests._golden import assert_same_math, load_json

BIG = 100.0  # logit whose sigmoid is exactly 1.0 in float32
LOW = -100.0  # logit whose sigmoid is ~0 (cells without a face)

# anchors (w, h) in input pixels per level (strides 8, 16, 32), 3 per level
ANCHORS = [[[16, 20], [40, 50], [80, 100]],
           [[60, 60], [120, 150], [200, 200]],
           [[250, 250], [300, 350], [400, 400]]]


class TinyYoloFace(nn.Module):
    """YOLOv5-face stand-in: every cell predicts nothing except the planted rows.

    planted rows: (level, anchor, grid_y, grid_x, 16 raw logits: x, y, w, h, obj, 10 landmarks, cls).
    """

    def __init__(self, planted: torch.Tensor):
        super().__init__()
        self.register_buffer("planted", planted.to(torch.float32))
        self.register_buffer("anchors", torch.tensor(ANCHORS, dtype=torch.float32))  # [3, 3, 2]
        self.strides = [8, 16, 32]

    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[0] == 1 and x.shape[1] == 3
        assert len(grids) == 3
        outs: list[torch.Tensor] = []
        for lvl in range(3):
            g = grids[lvl]  # [1, 1, ny, nx, 2]
            stride = self.strides[lvl]
            ny, nx = g.shape[2], g.shape[3]
            assert ny * stride == x.shape[2] and nx * stride == x.shape[3]
            raw = torch.full((1, 3, ny, nx, 16), -100.0)  # LOW: no face
            raw[..., 0:4] = 0.0
            raw[..., 5:15] = 0.0
            for k in range(self.planted.shape[0]):
                p = self.planted[k]
                if int(p[0]) == lvl:
                    raw[0, int(p[1]), int(p[2]), int(p[3])] = p[4:]
            s = torch.sigmoid(raw)
            anchor = self.anchors[lvl].view(1, 3, 1, 1, 2)  # [1, 3, 1, 1, 2]
            xy = (s[..., 0:2] * 2.0 - 0.5 + g) * stride
            wh = (s[..., 2:4] * 2.0) ** 2 * anchor
            marks = raw[..., 5:15] * anchor.repeat(1, 1, 1, 1, 5) + g.repeat(1, 1, 1, 1, 5) * stride
            y = torch.cat((xy, wh, s[..., 4:5], marks, s[..., 15:16]), dim=-1)  # [1, 3, ny, nx, 16]
            outs.append(y.view(1, -1, 16))  # [1, 3*ny*nx, 16]
        return torch.cat(outs, dim=1)  # [1, N, 16]


def plant(level, anchor, gy, gx, obj=BIG, cls=BIG):
    row = torch.zeros(20)
    row[:4] = torch.tensor([level, anchor, gy, gx], dtype=torch.float32)
    row[4 + 4] = obj
    row[4 + 15] = cls
    return row


@pytest.fixture
def make_detector(tmp_path):
    def _make(*rows, name="tiny_yoloface.pt"):
        planted = torch.stack(rows) if rows else torch.zeros(0, 20)
        path = tmp_path / name
        torch.jit.save(torch.jit.script(TinyYoloFace(planted)), str(path))
        return fd.YoloFaceDetector.from_file(str(path), "cpu"), path
    return _make


def image(w, h, value=0.5):
    return torch.full((1, h, w, 3), value)


def xywh(d):
    return [d.x, d.y, d.w, d.h]


# ----------------------------------------------------------------------------------------------
# crop helper and mask
# ----------------------------------------------------------------------------------------------
def test_process_bbox_matches_official_examples():
    ref = load_json("fixtures", "reference", "process_bbox_examples.json")
    assert ref["cases"]
    for case in ref["cases"]:
        out = face.process_bbox(case["bbox_x1y1x2y2"], case["expand_ratio"], case["height"], case["width"])
        assert out == case["out_x1y1x2y2"], case
        assert all(isinstance(v, int) for v in out)


def test_face_mask_parity_golden(golden):
    src = golden.t("input.image_rgb_u8")
    want = golden.t("pre.mask_fullres_u8")  # [h0, w0, 3]
    h0, w0 = src.shape[:2]
    box = tuple(float(v) for v in golden.scalars["chosen_face_xywh"])
    mask = face.face_mask(box, w0, h0, golden.case.area)
    assert mask.shape == (h0, w0)
    got_u8 = (mask * 255).to(torch.uint8)
    for c in range(want.shape[2]):
        assert torch.equal(got_u8, want[..., c]), f"channel {c}"
    if "mask_box_x1y1x2y2_float" in golden.scalars:
        want_rect = [int(v) for v in golden.scalars["mask_box_x1y1x2y2_float"]]
        assert list(face.mask_rect(box, w0, h0, golden.case.area)) == want_rect
    # the same box through the node's core path (no crop, box from a MASK would differ; use a FaceBox)
    fb = face.FaceBox(*box, image_size=(w0, h0))
    assert torch.equal(face.face_mask(fb, w0, h0, golden.case.area), mask)


def test_face_mask_clips_at_border():
    # box hanging over the top-left corner: x2 = 70.5, mw = 137.5, cx = floor(16/2) = 8
    # -> X1 = max(8 - 68, 0) = 0, X2 = min(8 + 68, 208) = 76
    m = face.face_mask((-54.5, -54.5, 125.0, 125.0), 208, 208)
    assert face.mask_rect((-54.5, -54.5, 125.0, 125.0), 208, 208) == (0, 0, 76, 76)
    assert m[:76, :76].eq(1).all() and m.sum() == 76 * 76
    # touching the bottom-right edge: x=150, w=58 -> x2=208, mw=63.8, cx=179 -> X2=min(210, 208)
    assert face.mask_rect((150.0, 100.0, 58.0, 108.0), 208, 208) == (148, 95, 208, 208)
    # crop: expanded (121, 46, 208, 208) is 87 wide, 162 tall -> side 87, vertical centre 127 moves
    # towards the face centre 154 by min(37.5, 27) -> square (121, 110.5, 208, 197.5), rounded
    # half-to-even -> 87x88, stays inside the image
    assert face.process_bbox((150, 100, 208, 208), 0.5, 208, 208) == [121, 110, 208, 198]


def test_box_from_mask_and_largest_face():
    m = torch.zeros(100, 120)
    m[10:30, 40:75] = 1.0
    m[50, 5] = 0.4  # below the threshold
    b = face.box_from_mask(m)
    assert (b.x, b.y, b.w, b.h, b.source, b.image_size) == (40.0, 10.0, 35.0, 20.0, "mask", (120, 100))
    assert face.box_from_mask(torch.zeros(10, 10)) is None
    a1 = face.FaceBox(0, 0, 10, 20, (100, 100), score=0.9)
    a2 = face.FaceBox(50, 50, 20, 10, (100, 100), score=0.8)  # same area, lower score
    a3 = face.FaceBox(5, 5, 5, 5, (100, 100), score=0.99)
    assert face.largest_face([a1, a2, a3]) is a1
    assert face.largest_face([]) is None


def test_detector_preprocess_size_range_and_rgb_order():
    assert fd.input_size(208, 208) == (416, 416)
    assert fd.input_size(312, 208) == (640, 416)  # 624 -> rounded up to 640
    assert fd.input_size(100, 300) == (416, 1248)
    img = torch.zeros(70, 90, 3, dtype=torch.uint8)
    img[..., 0] = 255  # pure red
    img[..., 2] = 51
    x = fd.preprocess(img, "cpu")
    w1, h1 = fd.input_size(90, 70)
    assert x.shape == (1, 3, h1, w1) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.ones(h1, w1)) and x[0, 1].abs().max() == 0
    assert torch.allclose(x[0, 2], torch.full((h1, w1), 0.2))
    grids = fd.make_grids(640, 416, "cpu")
    assert [tuple(g.shape) for g in grids] == [(1, 1, 52, 80, 2), (1, 1, 26, 40, 2), (1, 1, 13, 20, 2)]
    assert grids[0][0, 0, 3, 7].tolist() == [7.0, 3.0]  # (column, row)


def test_nms_plain_torch():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.95, 0.8, 0.9])
    # box 1 (best) suppresses 0 and 3 (IoU 90/110 = 0.82); box 2 is apart
    assert fd.nms(boxes, scores, 0.45).tolist() == [1, 2]
    # IoU exactly at the threshold is kept (torchvision keeps IoU <= threshold)
    b = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10.0]])  # IoU 50/150 = 1/3
    assert fd.nms(b, torch.tensor([0.9, 0.8]), 1 / 3 + 1e-7).tolist() == [0, 1]
    assert fd.nms(b, torch.tensor([0.9, 0.8]), 0.3).tolist() == [0]


# ----------------------------------------------------------------------------------------------
# detector path with a tiny TorchScript model
# ----------------------------------------------------------------------------------------------
def test_detector_decodes_filters_suppresses_and_picks_largest(make_detector):
    s = torch.sigmoid
    detector, _ = make_detector(
        # A: level 0, anchor (40, 50), cell (y12, x10): centre ((10.5)*8, (12.5)*8) = (84, 100)
        #    -> xyxy (64, 75, 104, 125) in 416x416; source 208x208 (x0.5): (32, 37.5) 20x25, score 1
        plant(0, 1, 12, 10),
        # A': next cell, centre (92, 100) -> IoU with A = 1600/2400 = 0.67 > 0.45 -> suppressed
        plant(0, 1, 12, 11, cls=math.log(0.95 / 0.05)),
        # B: level 1, anchor (120, 150), cell (y10, x15): centre (248, 168) -> xyxy (188, 93, 308, 243)
        #    -> source (94, 46.5) 60x75, area 4500, score sigmoid(2)
        plant(1, 1, 10, 15, cls=2.0),
        # C: level 1, anchor (60, 60), cell (y20, x5): centre (88, 328) -> (58, 298, 118, 358)
        #    -> source (29, 149) 30x30, area 900, score sigmoid(1)
        plant(1, 0, 20, 5, cls=1.0),
        # D: objectness 0.4 -> dropped by the objectness filter
        plant(2, 0, 5, 5, obj=math.log(0.4 / 0.6)),
        # E: objectness 1 but class 0.269 -> score 0.269 < 0.5, dropped
        plant(0, 0, 40, 40, cls=-1.0),
    )
    dets = detector.detect(to_u8(image(208, 208)[0]))
    assert len(dets) == 3
    want = [[32.0, 37.5, 20.0, 25.0], [94.0, 46.5, 60.0, 75.0], [29.0, 149.0, 30.0, 30.0]]
    assert [xywh(d) for d in dets] == want
    want_scores = [1.0, float(s(torch.tensor(2.0))), float(s(torch.tensor(1.0)))]
    assert [d.score for d in dets] == pytest.approx(want_scores)
    # landmarks decode to grid * stride (raw 0), scaled by 0.5: A -> (40, 48) five times
    assert dets[0].landmarks == ((40.0, 48.0),) * 5
    # the official first-box quirk would choose C (last box bigger than box 0); we choose B
    best = face.detect_largest_face(detector, image(208, 208)[0])
    assert [best.x, best.y, best.w, best.h, best.source] == [94.0, 46.5, 60.0, 75.0, "detector"]
    # threshold 0.2: D (objectness 0.4) and E (score 0.269) pass too; A' is still suppressed by A
    low = detector.detect(to_u8(image(208, 208)[0]), conf_threshold=0.2)
    assert len(low) == 5


def test_detector_grids_on_non_square_image(make_detector):
    # 312x208 -> input 640x416 (grid 80x52 at stride 8); cell (y5, x70) exists only if x is the column
    # centre (70.5*8, 5.5*8) = (564, 44), anchor (16, 20) -> xyxy (556, 34, 572, 54)
    # back to source: x * 312/640 = 0.4875, y * 0.5 -> (271.05, 17) 7.8 x 10
    detector, _ = make_detector(plant(0, 0, 5, 70))
    (d,) = detector.detect(to_u8(image(312, 208)[0]))
    assert xywh(d) == pytest.approx([271.05, 17.0, 7.8, 10.0])


def test_two_equal_faces_pick_higher_score(make_detector):
    # same anchor (40, 50) at two cells far apart; the one planted first (earlier in the raw output)
    # has the lower score, so the choice must follow the score, not the raw order
    detector, _ = make_detector(plant(0, 1, 5, 5, cls=1.0), plant(0, 1, 40, 40))
    dets = detector.detect(to_u8(image(208, 208)[0]))
    assert len(dets) == 2 and dets[0].area == dets[1].area == 500.0
    best = face.detect_largest_face(detector, image(208, 208)[0])
    # cell (40, 40): centre (324, 324) -> (304, 299, 344, 349) -> source (152, 149.5) 20x25
    assert [best.x, best.y, best.score] == [152.0, 149.5, 1.0]


def test_face_at_border_detect_crop_and_mask(make_detector):
    # level 2, anchor (250, 250), cell (0, 0): centre (16, 16) -> xyxy (-109, -109, 141, 141)
    # -> source (-54.5, -54.5) 125x125, not clipped (as the official wrapper)
    detector, _ = make_detector(plant(2, 0, 0, 0))
    img = torch.rand(1, 208, 208, 3)
    res = face.detect_face_mask(img, detector, crop=False)
    assert [res.box.x, res.box.y, res.box.w, res.box.h] == [-54.5, -54.5, 125.0, 125.0]
    assert res.mask.shape == (208, 208) and res.mask.sum() == 76 * 76 and res.mask[:76, :76].eq(1).all()
    assert torch.equal(res.image, img[0])
    # crop: expanded box clipped to (0, 0, 133, 133) -> square [0, 0, 133, 133]
    res = face.detect_face_mask(img, detector, crop=True, expand_ratio=0.5)
    assert res.box.crop_xyxy == (0, 0, 133, 133)
    assert torch.equal(res.image, img[0, :133, :133])
    # re-detected on the 133x133 crop (input 416x416 again, scale 133/416)
    k = 133 / 416
    assert [res.box.x, res.box.y, res.box.w] == pytest.approx([-109 * k, -109 * k, 250 * k])
    assert res.box.image_size == (133, 133) and res.mask.shape == (133, 133)
    assert torch.equal(res.mask, face.face_mask(res.box, 133, 133))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_detector_on_cuda_matches_cpu(make_detector):
    _, path = make_detector(plant(0, 1, 12, 10), plant(1, 1, 10, 15, cls=2.0))
    img = to_u8(torch.rand(208, 312, 3))
    cpu = fd.YoloFaceDetector.from_file(str(path), "cpu").detect(img)
    gpu = fd.YoloFaceDetector.from_file(str(path), torch.device("cuda")).detect(img)
    assert [xywh(d) for d in gpu] == pytest.approx([xywh(d) for d in cpu])


def test_no_face_each_policy(make_detector):
    detector, _ = make_detector()  # plants nothing
    img = image(100, 80)
    with pytest.raises(ValueError, match="lower the confidence"):
        face.detect_face_mask(img, detector, on_no_face="error")
    with pytest.raises(ValueError, match="no detector and no mask"):
        face.detect_face_mask(img, None, on_no_face="error")
    with pytest.raises(ValueError, match="mask is empty"):
        face.detect_face_mask(img, None, mask=torch.zeros(1, 80, 100), on_no_face="error")
    for det in (detector, None):
        res = face.detect_face_mask(img, det, crop=True, on_no_face="whole_image")
        assert torch.equal(res.image, img[0]) and res.mask.eq(1).all() and res.mask.shape == (80, 100)
        assert (res.box.source, res.box.w, res.box.h, res.box.crop_xyxy) == ("whole_image", 100.0, 80.0, None)
    with pytest.raises(ValueError, match="on_no_face"):
        face.detect_face_mask(img, detector, on_no_face="skip")


def test_mask_input_wins_and_crops(make_detector):
    detector, _ = make_detector(plant(0, 1, 12, 10))
    img = torch.rand(1, 200, 300, 3)
    m = torch.zeros(1, 200, 300)
    m[0, 60:140, 120:180] = 1.0  # face box (120, 60) 60x80
    res = face.detect_face_mask(img, detector, mask=m, crop=False)
    assert (res.box.source, res.box.x, res.box.y, res.box.w, res.box.h) == ("mask", 120.0, 60.0, 60.0, 80.0)
    res = face.detect_face_mask(img, None, mask=m, crop=True, expand_ratio=0.5)
    x1, y1, x2, y2 = face.process_bbox((120, 60, 180, 140), 0.5, 200, 300)
    assert res.box.crop_xyxy == (x1, y1, x2, y2)
    assert torch.equal(res.image, img[0, y1:y2, x1:x2])
    assert (res.box.x, res.box.y) == (120.0 - x1, 60.0 - y1)
    assert torch.equal(res.mask, face.face_mask((120.0 - x1, 60.0 - y1, 60.0, 80.0), x2 - x1, y2 - y1))
    with pytest.raises(ValueError, match="draw the mask on this image"):
        face.detect_face_mask(img, None, mask=torch.ones(1, 100, 100))
    with pytest.raises(ValueError, match="expand_ratio"):
        face.detect_face_mask(img, None, mask=m, crop=True, expand_ratio=-0.1)


def test_small_crop_refused():
    m = torch.zeros(1, 400, 400)
    m[0, 100:130, 100:130] = 1.0  # 30 px face -> 60 px crop (a 10 px one is a speck: judge_mask)
    with pytest.raises(ValueError, match="expand_ratio"):
        face.detect_face_mask(torch.rand(1, 400, 400, 3), None, mask=m, crop=True)


def test_loader_rejects_non_torchscript(tmp_path):
    p = tmp_path / "bad.pt"
    torch.save({"a": torch.zeros(1)}, str(p))
    with pytest.raises(ValueError, match="not a TorchScript"):
        fd.YoloFaceDetector.from_file(str(p), "cpu")
    with pytest.raises(FileNotFoundError, match="yoloface_v5m.pt"):
        fd.YoloFaceDetector.from_file(str(tmp_path / "missing.pt"), "cpu")


def test_detector_rejects_wrong_output(tmp_path):
    class Wrong(nn.Module):
        def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
            return torch.zeros(1, 10, 6)

    p = tmp_path / "wrong.pt"
    torch.jit.save(torch.jit.script(Wrong()), str(p))
    det = fd.YoloFaceDetector.from_file(str(p), "cpu")
    with pytest.raises(ValueError, match=r"returned \(1, 10, 6\)"):
        det.detect(torch.zeros(64, 64, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# node
# ----------------------------------------------------------------------------------------------
def test_node_contract_and_run(tmp_path, monkeypatch, make_detector):
    import nodes
    from nodes import nodes_face, runtime

    models = tmp_path / "models"
    models.mkdir()
    _, path = make_detector(plant(1, 1, 10, 15), name="yoloface_v5m.pt")
    (models / "yoloface_v5m.pt").write_bytes(path.read_bytes())
    monkeypatch.setenv(runtime.MODELS_ENV, str(models))

    assert nodes.NODE_CLASS_MAPPINGS["SonicFaceMaskDetect"] is nodes_face.SonicFaceMaskDetect
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SonicFaceMaskDetect"] == "Face Mask Detect"
    cls = nodes_face.SonicFaceMaskDetect
    spec = cls.INPUT_TYPES()
    for group in spec.values():
        for name, (_, opts) in group.items():
            assert opts.get("tooltip"), name
    assert spec["required"]["detector"][0] == ["yoloface_v5m.pt", "none"]
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert cls.CATEGORY == "Sonic" and cls.DESCRIPTION

    img = torch.rand(1, 208, 208, 3)
    out_img, out_mask, box, _ = cls().detect(img, "yoloface_v5m.pt", False, 0.5, 1.1, 0.5, "error")
    assert out_img.shape == (1, 208, 208, 3) and out_mask.shape == (1, 208, 208)
    assert [box.x, box.y, box.w, box.h] == [94.0, 46.5, 60.0, 75.0]
    assert torch.equal(out_mask[0], face.face_mask(box, 208, 208, 1.1))
    # gray input, no detector, mask drawn, crop on
    m = torch.zeros(1, 208, 208)
    m[0, 80:120, 90:130] = 1
    gray = torch.rand(1, 208, 208, 1)
    out_img, out_mask, box, _ = cls().detect(gray, "none", True, 0.5, 1.1, 0.5, "error", mask=m)
    assert out_img.shape[-1] == 3 and out_img.shape[1:3] == out_mask.shape[1:] and box.source == "mask"


# ----------------------------------------------------------------------------------------------
# YOLOv5-face-style TorchScript files in the official format (random weights, checked loader)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo_exports(tmp_path_factory):
    """Every export of tests/_yoloface (EXPORTS, COVERAGE_EXPORTS) with planted faces: name -> (model, file)."""
    root = tmp_path_factory.mktemp("yoloface")
    out = {}
    for name, variant, how in yolo.EXPORTS + yolo.COVERAGE_EXPORTS:
        model = yolo.plant_faces(yolo.build(variant, seed=3))
        out[name] = (model, yolo.export(model, root / f"{name}.pt", how))
    return out


def _same_detections(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert xywh(g) == pytest.approx(xywh(w), abs=1e-3) and g.score == pytest.approx(w.score, abs=1e-5)
        assert [c for p in g.landmarks for c in p] == pytest.approx([c for p in w.landmarks for c in p], abs=1e-3)


@pytest.mark.parametrize("name", [e[0] for e in yolo.EXPORTS])
def test_yoloface_style_export_passes_the_check_and_detects_as_before(yolo_exports, name):
    model, path = yolo_exports[name]
    checked = fd.YoloFaceDetector.from_file(str(path), "cpu")  # static check, then torch.jit.load
    before = fd.YoloFaceDetector(torch.jit.load(str(path)), "cpu")  # the loader before the check
    # 208 x 208 -> 416 x 416 input (the trace size); two exports also on a 640 x 416 input
    sizes = [(208, 208), (312, 208)] if name.startswith("stem_c3_spp_silu") else [(208, 208)]
    g = torch.Generator().manual_seed(5)
    for w, h in sizes:
        img = to_u8(torch.rand(h, w, 3, generator=g))
        x = fd.preprocess(img, "cpu")  # [1, 3, h1, w1]
        with torch.no_grad():
            eager = model(x, fd.make_grids(x.shape[3], x.shape[2], "cpu"))[0]  # [N, 16]
        raw = checked.raw(x)
        n = 3 * sum((x.shape[2] // s) * (x.shape[3] // s) for s in config.DETECTOR_STRIDES)
        assert raw.shape == (n, yolo.manifest()["network"]["outputs_per_anchor"])
        assert torch.allclose(raw, eager, rtol=1e-4, atol=1e-3)
        assert_same_math(raw, before.raw(x), f"{name}: checked loader vs plain torch.jit.load")  # one file
        _same_detections(checked.detect(img), before.detect(img))


def test_yoloface_manifest_facts_match_config_and_the_export(yolo_exports):
    net = yolo.manifest()["network"]
    assert tuple(net["strides"]) == config.DETECTOR_STRIDES
    assert net["outputs_per_anchor"] == config.DETECTOR_BOX_FIELDS + net["classes"]
    assert [len(a) for a in net["anchors"]] == [2 * net["anchors_per_level"]] * len(net["strides"])
    assert [row[0] for row in net["layers"]] == list(range(24)) and net["layers"][-1][3] == "Detect"
    _, path = yolo_exports["stem_c3_spp_silu_trace"]
    keys = set(torch.jit.load(str(path)).state_dict())
    assert {"model.23.anchors", "model.23.anchor_grid", "model.23.m.2.weight", "model.0.stem_1.conv.weight"} <= keys
    assert tuple(torch.jit.load(str(path)).state_dict()["model.23.anchor_grid"].shape) == (3, 1, 3, 1, 1, 2)


def test_allowlist_is_what_torch_writes_plus_reviewed_extras(yolo_exports, make_detector):
    """Every op on the list is written by the current torch for a YOLOv5-face-style export (or the
    tiny stand-in) or is a reviewed extra with its reason in the manifest; module == manifest."""
    allow = yolo.manifest()["allowlist"]
    groups = [op for g in allow["tensor_ops"] for op in g["ops"]]
    assert len(groups) == len(set(groups)) and set(groups) == torchscript_code.TENSOR_OPS
    assert set(allow["prim_ops"]) == torchscript_code.PRIM_OPS
    assert set(allow["builtin_calls"]) == torchscript_code.BUILTIN_CALLS
    seen = set()
    _, tiny = make_detector(plant(0, 1, 12, 10))
    for path in [p for _, p in yolo_exports.values()] + [tiny]:
        seen |= set(torchscript_check.check_archive(path.read_bytes(), str(path)).ops)
    written = {k.rsplit(".", 1)[1] for k in seen if k.startswith(("torch.", "ops.aten."))}
    prim = {k.rsplit(".", 1)[1] for k in seen if k.startswith("ops.prim.")}
    extras = set(allow["reviewed_extras"])
    assert written | extras == torchscript_code.TENSOR_OPS, "an op is neither written by torch nor reviewed"
    assert not written & extras, f"written by torch, so not an extra: {sorted(written & extras)}"
    assert prim == torchscript_code.PRIM_OPS
    assert all(allow["reviewed_extras"][op] for op in extras)
