"""SonicPasteBack: the generated crop frames pasted back into the whole photo, at its own resolution.

The blend itself is ``sonic_core.image.PasteBack``; Latent To Video does the same while it streams
(its optional photo / face_box inputs), for clips of any length.
"""

from __future__ import annotations

import logging

import torch

from . import runtime
from .nodes_video import _check_images
from .runtime import core

log = logging.getLogger(__name__)
_config = core("config")

FEATHER_TIP = ("Soft edge of the blend, as a fraction of the blended region's shorter side (0.1 of a 700 px "
               "crop = 70 px); 0 = hard edge. Sides on the photo's border are never softened.")
REGION_TIP = ("crop: the whole crop square is pasted (the head, hair and neck move together; the seam lies in "
              f"the background). face: only the face box scaled by {_config.PASTE_FACE_SCALE:g}, so more of the "
              "photo stays as it is, but hair or a chin that moves past that area is cut.")


COLOR_TIP = ("Colour match: pulls each generated frame's overall colour (a smooth gain, the lowest frequencies "
             "only) to the photo's, measured where the crop meets the photo, so a model's slight colour drift "
             "does not show as a lighter or darker square. The face's own motion and detail are untouched.")


def color_input() -> tuple:
    """The colour-match switch, shared with Latent To Video (appended optional input ``color_match``)."""
    return ("BOOLEAN", {"default": _config.PASTE_COLOR_MATCH, "tooltip": COLOR_TIP})


def paste_inputs(prefix: str = "") -> dict:
    """The blend's widgets, shared with Latent To Video (there named paste_feather / paste_region)."""
    return {
        f"{prefix}feather": _config.LIMITS["paste_feather"].widget(FEATHER_TIP, step=0.01),
        f"{prefix}region": (list(_config.PASTE_REGIONS), {"default": _config.PASTE_REGION, "tooltip": REGION_TIP}),
    }


class SonicPasteBack:
    DESCRIPTION = ("Pastes the animated face crop back into the original photo, at the photo's own resolution: "
                   "every frame is resized to the crop rectangle (antialiased bicubic, on the frames' device) "
                   "and blended in with a soft edge; outside it the photo stays exactly as it is. Works frame "
                   "by frame: put it after Frame Interpolate or an upscaler, in a Latent Segment chain for long "
                   "clips (or use Latent To Video's photo input). Several faces of one photo: chain one Paste Back per "
                   "face, each taking the previous one's images as its photo; every other face found in the photo "
                   "is left out of each blend, so no face covers another. Head motion past the crop edge is cut by the "
                   "blend: for big moves lower head_motion_scale (Motion Bucket Predict) or raise expand_ratio "
                   "(Face Mask Detect). "
                   "When the crop is much larger than 512 px, upscale the frames first: a resize cannot add "
                   "detail. A face box without a crop passes the frames through unchanged (with a warning).")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("paste back", "face paste", "uncrop", "composite", "贴回")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("feather", "region")
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The frames at the photo's resolution: the photo with the animated crop blended in.",)

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "frames": ("IMAGE", {"tooltip": "The generated crop frames (decoded, interpolated or upscaled; any "
                                                "number, any size of the crop's shape)."}),
                "photo": ("IMAGE", {"tooltip": "The original photo: the image given to Face Mask Detect (RGBA "
                                               "and gray are made RGB). Several faces: the previous Sonic Paste "
                                               "Back's images (one base frame per frame: frame k goes into base "
                                               "k), so each face is pasted onto the last."}),
                "face_box": ("SONIC_FACE_BOX", {"tooltip": "Face Mask Detect's face_box (crop on): where the crop "
                                                          "came from."}),
                **paste_inputs(),
            },
            "optional": {"color_match": color_input()},
        }, cls.ADVANCED_INPUTS)

    def paste(self, frames, photo, face_box, feather=_config.PASTE_FEATHER, region=_config.PASTE_REGION,
              color_match=_config.PASTE_COLOR_MATCH):
        feather = _config.check_inputs(dict(feather=feather), {"feather": "paste_feather"})["feather"]
        frames = _check_images(frames, "Sonic Paste Back")
        paste = core("image").plan_paste(photo, face_box, float(feather), region, bool(color_match))
        if paste is None:
            return (frames,)
        paste.check_frames(frames.shape[1], frames.shape[2])  # before the output is allocated
        paste.check_count(frames.shape[0])
        w, h = paste.size
        core("budget").check_paste_batch(frames.shape[0], (w, h), runtime.intermediate_device())
        out = torch.empty(frames.shape[0], h, w, 3, dtype=torch.float32, device=runtime.intermediate_device())
        progress = runtime.Progress(frames.shape[0], "Sonic Paste Back")
        paste(frames, out, callback=progress.callback())  # [N, H, W, 3]
        return (out,)


NODE_CLASS_MAPPINGS = {"SonicPasteBack": SonicPasteBack}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicPasteBack": "Sonic Paste Back"}
