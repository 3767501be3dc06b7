"""Model classes (unet, audio_proj, rife, face_detector, svd) and the SONIC_MODEL container."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

MODEL_NAMES = ("unet", "audio2token", "audio2bucket", "whisper")


@dataclass
class SonicModels:
    """The Sonic-specific models (what a SONIC_MODEL carries between nodes).

    ``dtype`` is the UNet's compute dtype; whisper, audio2token and audio2bucket compute in
    float32 as in the official pipeline, and their outputs are cast where the UNet consumes them.
    ``load(name)`` returns a module ready on its compute device: without a hook it moves the
    module to ``device``; the ComfyUI nodes install a hook that goes through model management.
    """

    unet: nn.Module
    audio2token: nn.Module
    audio2bucket: nn.Module
    whisper: nn.Module  # transformers WhisperEncoder (only the encoder is used)
    feature_extractor: Any  # transformers WhisperFeatureExtractor
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    load_hook: Callable[[str], nn.Module] | None = None

    def load(self, name: str) -> nn.Module:
        if name not in MODEL_NAMES:
            raise KeyError(f"unknown Sonic model {name!r}; one of {MODEL_NAMES}")
        if self.load_hook is not None:
            return self.load_hook(name)
        return getattr(self, name).to(self.device)

    def compute_device(self, name: str) -> torch.device:
        """Device the module's parameters are on after ``load(name)``."""
        return next(self.load(name).parameters()).device
