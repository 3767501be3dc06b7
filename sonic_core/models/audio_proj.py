"""Sonic's two small audio heads (SPEC §4.4, §4.5), with the official state-dict key names.

* ``AudioProjModel`` (``audio2token.pth``): one token window of whisper hidden states per frame
  -> ``K`` audio context tokens of width ``D`` for the UNet's audio cross-attention.
* ``Audio2BucketModel`` (``audio2bucket.pth``): one bucket window of the last whisper hidden state
  plus the CLIP image embedding -> the two raw motion values per frame (head, expression). The
  caller turns them into motion buckets with ``raw * BUCKET_SCALE + BUCKET_OFFSET``.

Both are plain MLPs (``proj1``, ``proj2``, ``proj3``; audio2token adds a LayerNorm ``norm``).
The official pipeline runs them in float32; inputs are cast to the weights' dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import (
    AUDIO2BUCKET_BLOCKS,
    AUDIO2BUCKET_OUTPUT_DIM,
    AUDIO2TOKEN_BLOCKS,
    AUDIO_PROJ_HIDDEN,
    AUDIO_TOKENS,
    BUCKET_WINDOW,
    CLIP_EMBED_DIM,
    CROSS_ATTENTION_DIM,
    LAYER_NORM_EPS,
    MOTION_CHANNELS,
    TOKEN_WINDOW,
    WHISPER_DIM,
)


def _flatten_windows(x: torch.Tensor, window: tuple[int, int, int], what: str) -> torch.Tensor:
    """``[..., seq_len, blocks, channels]`` -> ``[N, seq_len * blocks * channels]`` (row-major).

    Any leading dims are folded into N, so both ``[N, 10, 5, 384]`` and the official
    per-frame layout ``[N, 1, 10, 5, 384]`` are accepted.
    """
    if x.dim() < 4 or tuple(x.shape[-3:]) != window:
        raise ValueError(
            f"{what}: expected windows of shape [N, {window[0]}, {window[1]}, {window[2]}] "
            f"(seq_len, blocks, channels), got {tuple(x.shape)}; build them with the audio window "
            "helpers for this model's configuration"
        )
    n = math.prod(x.shape[:-3])
    return x.reshape(n, window[0] * window[1] * window[2])  # [N, seq_len*blocks*channels]


class AudioProjModel(nn.Module):
    """audio2token: token window ``[N, seq_len, blocks, channels]`` -> tokens ``[N, K, D]``.

    Flatten (position, block, channel) row-major -> Linear -> ReLU -> Linear -> ReLU ->
    Linear(``K*D``) -> reshape token-major ``[K, D]`` -> LayerNorm(D, eps 1e-5).
    Unconditional tokens are this network applied to an all-zero window (not zeros).
    """

    def __init__(self, seq_len: int = TOKEN_WINDOW, blocks: int = AUDIO2TOKEN_BLOCKS,
                 channels: int = WHISPER_DIM, intermediate_dim: int = AUDIO_PROJ_HIDDEN,
                 output_dim: int = CROSS_ATTENTION_DIM, context_tokens: int = AUDIO_TOKENS):
        super().__init__()
        self.seq_len = seq_len
        self.blocks = blocks
        self.channels = channels
        self.intermediate_dim = intermediate_dim
        self.output_dim = output_dim
        self.context_tokens = context_tokens
        self.input_dim = seq_len * blocks * channels
        self.proj1 = nn.Linear(self.input_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)

    @property
    def window_shape(self) -> tuple[int, int, int]:
        """(seq_len, blocks, channels) of one input window."""
        return (self.seq_len, self.blocks, self.channels)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = _flatten_windows(windows, self.window_shape, "audio2token")  # [N, seq_len*blocks*channels]
        x = x.to(self.proj1.weight.dtype)
        x = F.relu(self.proj1(x))  # [N, intermediate]
        x = F.relu(self.proj2(x))  # [N, intermediate]
        x = self.proj3(x)  # [N, K*D]
        x = x.reshape(x.shape[0], self.context_tokens, self.output_dim)  # [N, K, D] token-major
        return self.norm(x)

    def uncond_tokens(self, count: int = 1) -> torch.Tensor:
        """Tokens of an all-zero window, ``[count, K, D]`` (identical rows)."""
        p = self.proj1.weight
        zeros = torch.zeros((1, *self.window_shape), dtype=p.dtype, device=p.device)  # [1, seq, blocks, ch]
        return self.forward(zeros).expand(count, -1, -1)  # [count, K, D]


class Audio2BucketModel(nn.Module):
    """audio2bucket: bucket window ``[N, seq_len, blocks, channels]`` + image embedding -> ``[N, T*O]``.

    Flatten the window, append the CLIP ``image_embeds`` -> Linear -> SiLU -> Linear -> SiLU ->
    Linear(``context_tokens * output_dim``); no norm. With the official sizes the output is
    ``[N, 2]`` = (head translation, expression) raw values; bucket = raw * 16 + 16 (caller).
    """

    def __init__(self, seq_len: int = BUCKET_WINDOW, blocks: int = AUDIO2BUCKET_BLOCKS,
                 channels: int = WHISPER_DIM, clip_channels: int = CLIP_EMBED_DIM,
                 intermediate_dim: int = AUDIO_PROJ_HIDDEN, output_dim: int = AUDIO2BUCKET_OUTPUT_DIM,
                 context_tokens: int = MOTION_CHANNELS):
        super().__init__()
        self.seq_len = seq_len
        self.blocks = blocks
        self.channels = channels
        self.clip_channels = clip_channels
        self.intermediate_dim = intermediate_dim
        self.output_dim = output_dim
        self.context_tokens = context_tokens
        self.input_dim = seq_len * blocks * channels + clip_channels
        self.proj1 = nn.Linear(self.input_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)

    @property
    def window_shape(self) -> tuple[int, int, int]:
        """(seq_len, blocks, channels) of one input window."""
        return (self.seq_len, self.blocks, self.channels)

    def forward(self, windows: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = _flatten_windows(windows, self.window_shape, "audio2bucket")  # [N, seq_len*blocks*channels]
        n = x.shape[0]
        emb = image_embeds
        if emb.dim() == 1:
            emb = emb[None]  # [1, clip]
        emb = emb.reshape(-1, emb.shape[-1])  # [N or 1, clip]
        if emb.shape[-1] != self.clip_channels or emb.shape[0] not in (1, n):
            raise ValueError(
                f"audio2bucket: image_embeds must be [1, {self.clip_channels}] or "
                f"[{n}, {self.clip_channels}] for {n} windows, got {tuple(image_embeds.shape)}; use the "
                "CLIP vision model whose projection width matches this audio2bucket checkpoint"
            )
        emb = emb.expand(n, -1)  # [N, clip]
        dtype = self.proj1.weight.dtype
        x = torch.cat([x.to(dtype), emb.to(dtype)], dim=-1)  # [N, seq_len*blocks*channels + clip]
        x = F.silu(self.proj1(x))  # [N, intermediate]
        x = F.silu(self.proj2(x))  # [N, intermediate]
        return self.proj3(x)  # [N, context_tokens*output_dim]
