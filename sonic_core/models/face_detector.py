"""YOLOv5-face detector (the official ``yoloface_v5m.pt`` TorchScript file), wrapped in plain torch.

What the official wrapper does with the file (studied, described here in our own words):

* **Input.** The RGB image (``h0 x w0``) is resized, without keeping the aspect ratio and without
  letterboxing, to ``w1 x h1`` where ``r = 416 / min(h0, w0)`` and each side is ``int(side * r +
  31) // 32 * 32`` (the scaled side rounded up to a multiple of 32; the short side becomes 416).
  The resize is bilinear (OpenCV ``INTER_LINEAR`` on uint8, i.e. half-pixel centres, no
  antialiasing). Pixels go in as float32 ``u8 / 255`` in ``[0, 1]``, layout ``[1, 3, h1, w1]``,
  channel order **RGB** (the official code hands the detector a BGR array and converts it back
  to RGB before the call).
* **Call.** ``model(image, grids)``: ``grids`` is a list of three float32 tensors, one per output
  level with strides 8, 16, 32, each ``[1, 1, ny, nx, 2]`` with ``ny = h1 // stride``,
  ``nx = w1 // stride`` and ``grids[l][0, 0, j, i] = (i, j)`` (column index first).
* **Output.** One float tensor ``[1, N, 15 + nc]`` (``nc = 1`` for faces): per anchor, the box
  centre ``cx, cy``, size ``w, h`` and objectness, then five landmarks ``(x, y)``, then the class
  score(s). The anchor/grid decoding (sigmoid, ``(2*s - 0.5 + grid) * stride``, ``(2*s)**2 *
  anchor``) happens *inside* the TorchScript module; its coordinates are pixels of the resized
  ``w1 x h1`` input. The wrapper therefore only filters, suppresses and rescales.
* **Post-processing.** Keep rows with objectness > 0.5; score = objectness * best class score;
  keep score > 0.5; greedy non-maximum suppression at IoU > 0.45 (highest score first); boxes and
  landmarks are scaled back with ``w0 / w1`` and ``h0 / h1`` separately and are **not** clipped to
  the image (a face at the border may extend slightly past it, as in the official code).

The file is loaded only through ``torchscript_check.load_checked``: its TorchScript code and pickles
are checked against a reviewed allowlist before ``torch.jit.load`` sees them.

Everything here takes the device as an argument; nothing is decided at import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import config
from ..weights import CheckpointError
from .torchscript_check import load_checked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One detected face in source-image pixels: top-left ``(x, y)``, size ``(w, h)``."""

    x: float
    y: float
    w: float
    h: float
    score: float
    landmarks: tuple[tuple[float, float], ...] = ()

    @property
    def area(self) -> float:
        return self.w * self.h


def input_size(width: int, height: int) -> tuple[int, int]:
    """Detector input ``(w1, h1)``: short side scaled to 416, both sides rounded up to x32."""
    if min(width, height) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    r = config.DETECTOR_SHORT_SIDE / min(height, width)
    m = config.DETECTOR_STRIDE_MULTIPLE
    h1 = int(height * r + (m - 1)) // m * m
    w1 = int(width * r + (m - 1)) // m * m
    return w1, h1


def make_grids(width: int, height: int, device: torch.device | str) -> list[torch.Tensor]:
    """Cell-index grids for each output level: ``[1, 1, ny, nx, 2]`` holding ``(column, row)``."""
    grids = []
    for stride in config.DETECTOR_STRIDES:
        ny, nx = height // stride, width // stride
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")  # [ny, nx] each
        grid = torch.stack((xv, yv), dim=2)  # [ny, nx, 2], (x, y) order
        grids.append(grid.view(1, 1, ny, nx, 2).to(device=device, dtype=torch.float32))  # [1,1,ny,nx,2]
    return grids


def preprocess(image_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """RGB uint8 ``[H, W, 3]`` -> detector input ``[1, 3, h1, w1]`` float32 in ``[0, 1]``.

    Bilinear resize with half-pixel centres and no antialiasing (the behaviour of OpenCV's
    ``INTER_LINEAR``), rounded back to the uint8 grid like OpenCV's uint8 output.
    """
    if image_u8.dtype != torch.uint8 or image_u8.ndim != 3 or image_u8.shape[2] != 3:
        raise ValueError(
            f"detector input must be an RGB uint8 [H, W, 3] tensor, got {image_u8.dtype} "
            f"{tuple(image_u8.shape)}"
        )
    h0, w0 = image_u8.shape[:2]
    w1, h1 = input_size(w0, h0)
    x = image_u8.to(device).permute(2, 0, 1).unsqueeze(0).to(torch.float32)  # [1, 3, h0, w0]
    if (h1, w1) != (h0, w0):
        x = F.interpolate(x, size=(h1, w1), mode="bilinear", align_corners=False, antialias=False)
        x = x.round().clamp(0, config.U8_MAX)  # [1, 3, h1, w1] back on the uint8 grid
    return x / config.U8_MAX


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one ``[4]`` xyxy box with ``[N, 4]`` boxes -> ``[N]`` (areas without a +1)."""
    lt = torch.maximum(box[:2], boxes[:, :2])  # [N, 2]
    rb = torch.minimum(box[2:], boxes[:, 2:])  # [N, 2]
    inter = (rb - lt).clamp(min=0).prod(dim=1)  # [N]
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    return inter / (area_a + area_b - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in plain torch; indices of kept boxes, best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box is greater than
    ``iou_threshold`` (the rule of ``torchvision.ops.nms``). Equal scores keep input order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # [N]
    keep: list[int] = []
    while order.numel() > 0:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if rest.numel() == 0:
            break
        iou = box_iou(boxes[best], boxes[rest])  # [len(rest)]
        order = rest[iou <= iou_threshold]
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def postprocess(pred: torch.Tensor, conf_threshold: float = config.DETECTOR_CONFIDENCE,
                iou_threshold: float = config.DETECTOR_NMS_IOU) -> torch.Tensor:
    """Raw detector rows ``[N, 15 + nc]`` -> kept rows ``[M, 15]``: x1, y1, x2, y2, score, landmarks.

    Coordinates stay in detector-input pixels. Rows are ordered by score, best first.
    """
    nf = config.DETECTOR_BOX_FIELDS
    pred = pred.to(torch.float32)
    pred = pred[pred[:, 4] > conf_threshold]  # objectness filter
    if pred.shape[0] == 0:
        return pred.new_zeros((0, nf))
    score = (pred[:, nf:] * pred[:, 4:5]).max(dim=1).values  # [N] objectness x best class score
    cxcy, wh = pred[:, 0:2], pred[:, 2:4]  # [N, 2] each
    xyxy = torch.cat((cxcy - wh / 2, cxcy + wh / 2), dim=1)  # [N, 4]
    rows = torch.cat((xyxy, score[:, None], pred[:, 5:nf]), dim=1)  # [N, 15]
    rows = rows[score > conf_threshold]
    if rows.shape[0] == 0:
        return rows
    keep = nms(rows[:, :4], rows[:, 4], iou_threshold)
    return rows[keep]


class YoloFaceDetector:
    """The official YOLOv5-face TorchScript module on one device, called as ``model(x, grids)``."""

    def __init__(self, module: torch.jit.ScriptModule | torch.nn.Module, device: torch.device | str):
        self.module = module.eval()
        self.device = torch.device(device)
        self._grids: tuple[tuple[int, int], list[torch.Tensor]] | None = None

    @classmethod
    def from_file(cls, path: str, device: torch.device | str) -> YoloFaceDetector:
        """Load a TorchScript detector (e.g. ``yoloface_v5m.pt``) onto ``device``.

        The archive is checked statically first (``torchscript_check``): a file whose code or data
        is outside the reviewed allowlist raises ``UnsafeTorchScriptError`` and none of it runs.
        """
        from .. import identify

        with identify.expecting(path, identify.DETECTOR):  # another model's file: says which
            module = cls._load(path, device)
        log.info("loaded face detector %s on %s", path, device)
        return cls(module, device)

    @staticmethod
    def _load(path: str, device: torch.device | str):
        from ..paths import check_input

        check_input(path, "face detector", fix="put yoloface_v5m.pt in models/sonic or choose 'none' and "
                    "draw a face mask")
        try:
            return load_checked(path, map_location=torch.device(device))
        except CheckpointError:
            raise  # refused by the check, or not a TorchScript archive: the message says which
        except (RuntimeError, ValueError) as exc:
            raise ValueError(
                f"{path!r} is not a TorchScript face detector ({exc.__class__.__name__}: {exc}); "
                "use the official yoloface_v5m.pt"
            ) from exc

    def grids(self, width: int, height: int) -> list[torch.Tensor]:
        if self._grids is None or self._grids[0] != (width, height):
            self._grids = ((width, height), make_grids(width, height, self.device))
        return self._grids[1]

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Call the module on a preprocessed ``[1, 3, h1, w1]`` input -> ``[N, 15 + nc]`` rows."""
        h1, w1 = x.shape[2], x.shape[3]
        out = self.module(x, self.grids(w1, h1))
        if isinstance(out, (tuple, list)):  # some exports return (decoded, per-level raw)
            out = out[0]
        if (not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 1
                or out.shape[2] <= config.DETECTOR_BOX_FIELDS):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"face detector returned {shape}; expected [1, N, {config.DETECTOR_BOX_FIELDS} + classes]"
                " (a YOLOv5-face TorchScript such as yoloface_v5m.pt)"
            )
        return out[0]  # [N, 15 + nc]

    def detect(self, image_u8: torch.Tensor, conf_threshold: float = config.DETECTOR_CONFIDENCE,
               iou_threshold: float = config.DETECTOR_NMS_IOU) -> list[Detection]:
        """Faces in an RGB uint8 ``[H, W, 3]`` image, best score first, in source pixels."""
        h0, w0 = image_u8.shape[:2]
        x = preprocess(image_u8, self.device)  # [1, 3, h1, w1]
        h1, w1 = x.shape[2], x.shape[3]
        rows = postprocess(self.raw(x), conf_threshold, iou_threshold).cpu().double()  # [M, 15]
        sx, sy = w0 / w1, h0 / h1
        dets = []
        for r in rows.tolist():
            x1, y1, x2, y2 = r[0] * sx, r[1] * sy, r[2] * sx, r[3] * sy
            marks = tuple((r[5 + 2 * k] * sx, r[6 + 2 * k] * sy) for k in range(config.DETECTOR_LANDMARKS))
            dets.append(Detection(x=x1, y=y1, w=x2 - x1, h=y2 - y1, score=r[4], landmarks=marks))
        return dets
