"""Waveform -> 16 kHz mono -> whisper log-mel -> encoder hidden states -> per-frame windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SonicAudio:
    """What SonicWhisperAudioEncode hands on (type SONIC_AUDIO).

    Padded whisper features (SPEC §4.2) and the audio tokens of every generated frame.
    """

    token_features: torch.Tensor  # [2*audio_len + 10, L+1, d] float32, zero padded 4 / 6 (audio_prompts)
    bucket_features: torch.Tensor  # [2*audio_len + 50, 1, d] float32, zero padded 24 / 26 (last_audio_prompts)
    cond_tokens: torch.Tensor  # [F, K, D] audio2token of each frame's window, UNet dtype
    uncond_tokens: torch.Tensor  # [K, D] audio2token of an all-zero window (same for every frame)
    num_frames: int  # F = audio_len // FRAME_STEP generated frames
    audio_len: int  # 25 fps frames covered (after the cap)
    fps: float  # generated frame rate (12.5)
    waveform: torch.Tensor  # [1, C, T] source audio (trimmed to the cap), for muxing
    sample_rate: int  # Hz of ``waveform``

    @property
    def duration(self) -> float:
        """Seconds of video the frames cover."""
        return self.num_frames / self.fps
