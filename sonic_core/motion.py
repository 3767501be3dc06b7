"""Motion buckets from audio + image embedding (SPEC §4.5, §6)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .config import BUCKET_BATCH_FRAMES, BUCKET_OFFSET, BUCKET_SCALE, MOTION_CHANNELS, U8_MAX

log = logging.getLogger(__name__)

HEAD, EXPRESSION = 0, 1  # bucket channels: head translation, expression


@dataclass
class SonicMotion:
    """What SonicMotionBucketPredict hands on (type SONIC_MOTION)."""

    buckets: torch.Tensor  # [F, 2] float32: (head translation, expression) per frame, scales applied
    head_scale: float = 1.0
    expression_scale: float = 1.0


@torch.no_grad()
def predict_motion(
    audio2bucket: torch.nn.Module,
    audio,
    image_embeds: torch.Tensor,
    head_scale: float = 1.0,
    expression_scale: float = 1.0,
    fixed_head: float | None = None,
    fixed_expression: float | None = None,
    batch_frames: int = BUCKET_BATCH_FRAMES,
    callback: Callable[[int, int], None] | None = None,
) -> SonicMotion:
    """Per-frame motion buckets ``(raw * 16 + 16) * scale`` for every frame of ``audio`` (a SonicAudio).

    ``image_embeds``: ``[1, D]`` CLIP embedding of the working-size reference image. The official
    ``dynamic_scale`` multiplies both channels; here ``head_scale`` multiplies channel 0 (head
    translation) and ``expression_scale`` channel 1 (expression), so both 1.0 (or both equal to
    ``dynamic_scale``) reproduce it. ``fixed_head`` / ``fixed_expression``, when given, replace
    that channel for every frame with the value as is (no scale applied). Runs in the module's
    dtype (float32 officially); buckets are float32 on the CPU.
    """
    if image_embeds.dim() != 2 or image_embeds.shape[0] != 1:
        raise ValueError(
            f"image_embeds must be [1, D] (one reference image), got {tuple(image_embeds.shape)}"
        )
    from .config import check_inputs

    given = {"head_scale": head_scale, "expression_scale": expression_scale, "fixed_head": fixed_head,
             "fixed_expression": fixed_expression}
    checked = check_inputs({k: v for k, v in given.items() if v is not None},  # node ranges; NaN refused
                           {"head_scale": "motion_scale", "expression_scale": "motion_scale",
                            "fixed_head": "fixed_bucket", "fixed_expression": "fixed_bucket"})
    head_scale, expression_scale = checked["head_scale"], checked["expression_scale"]
    fixed_head, fixed_expression = checked.get("fixed_head"), checked.get("fixed_expression")
    num_frames = int(audio.num_frames)
    if num_frames < 1:
        raise ValueError("the audio gives no video frame; use at least 0.08 s of audio")
    p = next(audio2bucket.parameters())
    emb = image_embeds.to(p.device, p.dtype)  # [1, D]
    raw = torch.empty(num_frames, MOTION_CHANNELS, dtype=torch.float32)  # [F, 2]
    batches = -(-num_frames // batch_frames)
    for b in range(batches):
        s, e = b * batch_frames, min(num_frames, (b + 1) * batch_frames)
        win = audio.bucket_windows(s, e).to(p.device, p.dtype)  # [n, 50, 1, d]
        out = audio2bucket(win, emb)  # [n, 2]
        if out.shape[-1] != MOTION_CHANNELS:
            raise ValueError(
                f"audio2bucket gives {out.shape[-1]} values per frame, expected "
                f"{MOTION_CHANNELS} (head, expression); check the checkpoint"
            )
        raw[s:e] = out.float().cpu()
        if callback is not None:
            callback(b + 1, batches)
    if not bool(torch.isfinite(raw).all()):
        raise ValueError(f"audio2bucket predicted {int((~torch.isfinite(raw)).sum())} NaN/inf motion values: "
                         "the audio features or the audio2bucket checkpoint are invalid; re-encode the audio "
                         "or download audio2bucket.pth again")
    buckets = raw * BUCKET_SCALE + BUCKET_OFFSET  # [F, 2]
    scale = torch.tensor([head_scale, expression_scale], dtype=torch.float32)  # [2]
    buckets = buckets * scale
    for ch, fixed in ((HEAD, fixed_head), (EXPRESSION, fixed_expression)):
        if fixed is not None:
            buckets[:, ch] = float(fixed)
    log.info(
        "motion buckets: %d frames, head %.2f..%.2f, expression %.2f..%.2f",
        num_frames,
        buckets[:, HEAD].min(),
        buckets[:, HEAD].max(),
        buckets[:, EXPRESSION].min(),
        buckets[:, EXPRESSION].max(),
    )
    return SonicMotion(
        buckets=buckets, head_scale=float(head_scale), expression_scale=float(expression_scale)
    )


@torch.no_grad()
def reference_embeds(clip_vision, image: torch.Tensor, min_resolution: int) -> torch.Tensor:
    """CLIP ``image_embeds [1, D]`` of the reference at the sampler's working size (SPEC §2.3-2.4).

    ``image``: ComfyUI IMAGE (first of the batch used). The image is resized with PIL LANCZOS to
    the working size, as the sampler does, then given to ``clip_vision.encode_image(crop=False)``
    as ``u8 / 255`` (sonic_core's encoder then applies the official 224 LANCZOS preprocessing;
    ComfyUI's CLIP_VISION its own).
    """
    from .image import resize_lanczos, to_rgb, to_u8, working_size

    rgb = to_rgb(image)  # [H0, W0, 3]
    h0, w0 = rgb.shape[:2]
    u8 = resize_lanczos(to_u8(rgb.cpu()).numpy(), working_size(w0, h0, min_resolution))  # [H, W, 3]
    pixels = torch.from_numpy(u8).to(torch.float32)[None] / U8_MAX  # [1, H, W, 3]
    return clip_vision.encode_image(pixels, crop=False).image_embeds.float().reshape(1, -1)  # [1, D]
