"""Face family: SonicFaceMaskDetect (face box, optional square crop, face mask).

The face box output has its own type, ``SONIC_FACE_BOX`` (a ``sonic_core.face.FaceBox``:
``x, y, w, h`` float pixels of the output image, ``image_size``, ``source``, ``score``,
``crop_xyxy``). A private type keeps it from being wired into other packs' ``BBOX`` inputs,
which use differing layouts.
"""

from __future__ import annotations

import logging
import os

from . import runtime
from .runtime import core

log = logging.getLogger(__name__)

NONE = "none"
_DETECTOR_CACHE: dict = {}  # (path, mtime, device) -> detector; one entry, loaded on first use


def _detector(name: str):
    """The chosen detector file on ComfyUI's device, loaded once and reused across runs."""
    if name == NONE:
        return None
    path = runtime.resolve_path(name)
    device = runtime.load_device()
    key = (path, os.path.getmtime(path), str(device))
    if key not in _DETECTOR_CACHE:
        _DETECTOR_CACHE.clear()
        _DETECTOR_CACHE[key] = core("face").load_detector(path, device)
    return _DETECTOR_CACHE[key]


class SonicFaceMaskDetect:
    """Find the face (YOLOv5-face or a drawn mask), crop a square around it, build the face mask."""

    @classmethod
    def INPUT_TYPES(cls):
        cfg = core("config")
        files = runtime.list_files((".pt",))
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Portrait to animate (first image of a batch; RGB, RGBA "
                                               "or gray)."}),
                "detector": (files + [NONE], {
                    "tooltip": "YOLOv5-face TorchScript file in models/sonic (yoloface_v5m.pt), or 'none' "
                               "to use the mask input only."}),
                "crop": ("BOOLEAN", {"default": True, "tooltip": "Crop a square around the face "
                                     "(as the official demo/gradio app). Off: keep the whole image."}),
                "expand_ratio": cfg.LIMITS["expand_ratio"].widget(
                    "Crop margin around the face, in face sizes on every side (official 0.5).", step=0.05),
                "mask_area": cfg.LIMITS["mask_area"].widget(
                    "Face mask = face box scaled by this about its centre (official 1.1).", step=0.05),
                "confidence": cfg.LIMITS["confidence"].widget(
                    "Detector score threshold; lower it if a face is missed (official 0.5).", step=0.01),
                "on_no_face": (list(core("face").ON_NO_FACE), {
                    "default": "error", "tooltip": "No face found: stop with an error, or use the whole "
                                                   "image as the face (no crop)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional: paint over the face; its bounding box is used "
                                             "instead of the detector. A transparent background (a "
                                             "cut-out), an empty mask or specks: the detector runs. "
                                             "Several face regions mark several faces."}),
                "face_index": cfg.LIMITS["face_index"].widget(
                    "Which face: 0 = the largest (official), 1..N = the N-th face from the left, as "
                    "numbered in the preview output. A conversation uses one Face Mask Detect per face."),
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK", "SONIC_FACE_BOX", "IMAGE")
    RETURN_NAMES = ("image", "face_mask", "face_box", "preview")
    OUTPUT_TOOLTIPS = (
        "The cropped image (or the original when crop is off / no face was found).",
        "Face region of that image: 1 inside the face box scaled by mask_area, 0 outside.",
        "Face box (x, y, w, h in output-image pixels, source, score, crop): connect it to Sonic Paste Back or "
        "Latent To Video to paste the animation back into the photo.",
        "The whole input image with every face found boxed and numbered left to right, the chosen one in "
        "green with a thicker line: see which face_index is whom before anything slow runs.",
    )
    FUNCTION = "detect"
    CATEGORY = "Sonic"
    DESCRIPTION = ("Detects the largest face with the official YOLOv5-face model (or takes it from a "
                   "mask), optionally crops a square around it and returns the face mask the Sonic "
                   "sampler uses to place the audio-driven motion. With several people, face_index "
                   "picks one (numbered left to right in the preview output).")

    def detect(self, image, detector, crop, expand_ratio, mask_area, confidence, on_no_face, mask=None,
               face_index=0):
        if image.ndim >= 3:  # a too-small image is refused before the detector loads
            core("image").check_image_size(int(image.shape[-2]), int(image.shape[-3]), "the image")
        n = core("config").check_inputs(dict(expand_ratio=expand_ratio, mask_area=mask_area,
                                             confidence=confidence, face_index=face_index))  # NaN, inf, range
        expand_ratio, mask_area, confidence = n["expand_ratio"], n["mask_area"], n["confidence"]
        face = core("face")
        result = face.detect_face_mask(
            image, detector=_detector(detector), mask=mask, crop=crop, expand_ratio=expand_ratio,
            mask_area=mask_area, on_no_face=on_no_face, confidence=confidence, face_index=n["face_index"])
        preview = face.face_preview(image, result.faces, result.box.number or None)  # [H, W, 3] whole image
        out_dev = runtime.intermediate_device()
        return (result.image.contiguous().unsqueeze(0).to(out_dev),  # [1, H, W, 3]
                result.mask.unsqueeze(0).to(out_dev),  # [1, H, W]
                result.box,
                preview.unsqueeze(0).to(out_dev))  # [1, H, W, 3]


NODE_CLASS_MAPPINGS = {"SonicFaceMaskDetect": SonicFaceMaskDetect}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicFaceMaskDetect": "Face Mask Detect"}
