"""Motion buckets from audio + image embedding (SPEC §4.5, §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SonicMotion:
    """What SonicMotionBucketPredict hands on (type SONIC_MOTION)."""

    buckets: torch.Tensor  # [F, 2] float32: (head translation, expression) per frame, scales applied
    head_scale: float = 1.0
    expression_scale: float = 1.0
