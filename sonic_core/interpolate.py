"""Frame interpolation with RIFE (SPEC §12): F frames -> 2F - 1 frames, optionally twice.

Output order is the official one: ``f0, mid(f0,f1), f1, ..., f_{F-1}``; the original frames are
copied unchanged and every middle frame is ``clamp(IFNet(f_k, f_k+1), 0, 1)``. Frame pairs run
in batches on the model's device and dtype; results go back to the frames' device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .config import GENERATED_FPS
from .models.rife import pad_for_rife

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None] | None
MULTIPLIERS = (2, 4)  # 4 = the 2x pass applied twice
MIN_FRAMES = 2  # frames RIFE needs: it makes a new frame between two


def check_frame_count(num_frames: int) -> None:
    """Refuse fewer than MIN_FRAMES frames, saying how to do without interpolation."""
    if num_frames < MIN_FRAMES:
        raise ValueError(f"RIFE needs at least {MIN_FRAMES} frames to interpolate, got {num_frames}: give at "
                         f"least {MIN_FRAMES} video frames of audio ({MIN_FRAMES / GENERATED_FPS:g} s), or skip frame interpolation "
                         "(--no-interpolate on the command line; bypass Frame Interpolate, or rife_model none "
                         "in Latent To Video)")


def interpolated_length(num_frames: int, multiplier: int) -> int:
    """Frames after interpolation: 2F - 1 per 2x pass."""
    for _ in range(multiplier.bit_length() - 1):
        num_frames = 2 * num_frames - 1
    return num_frames


def _check(frames: torch.Tensor, multiplier: int, batch_size: int) -> None:
    if multiplier not in MULTIPLIERS:
        raise ValueError(f"multiplier {multiplier} is not supported: use one of {MULTIPLIERS}")
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise ValueError(f"frames must be an IMAGE batch [N, H, W, 3], got shape {tuple(frames.shape)}")
    check_frame_count(frames.shape[0])
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")


@torch.no_grad()
def _double(model: nn.Module, frames: torch.Tensor, batch_size: int,
            step: Callable[[int], None]) -> torch.Tensor:
    """One 2x pass: ``frames [N,H,W,3]`` -> ``[2N-1,H,W,3]`` on the frames' device."""
    param = next(model.parameters())
    n, h, w, _ = frames.shape
    out = frames.new_empty(2 * n - 1, h, w, 3)
    out[0::2] = frames[..., :3]
    for start in range(0, n - 1, batch_size):
        stop = min(start + batch_size, n - 1)
        pair = frames[start:stop + 1, ..., :3].to(param.device, param.dtype)  # [b+1,H,W,3]
        pair = pair.permute(0, 3, 1, 2)  # [b+1,3,H,W]
        pair, h0, w0 = pad_for_rife(pair)
        mid = model(pair[:-1], pair[1:])  # [b,3,H',W']
        mid = mid[..., :h0, :w0].clamp(0, 1).permute(0, 2, 3, 1)  # [b,H,W,3]
        out[2 * start + 1:2 * stop:2] = mid.to(out.device, out.dtype)
        step(stop - start)
    return out


def interpolate(model: nn.Module, frames: torch.Tensor, multiplier: int = 2, batch_size: int = 4,
                callback: Callback = None) -> torch.Tensor:
    """Interpolate ``frames [N,H,W,3]`` (0..1) with the RIFE ``model``.

    ``multiplier`` 2 gives 2N-1 frames, 4 gives 4N-3 (the 2x pass twice). ``callback(done,
    total)`` is called after every batch of pairs (it may raise to cancel).
    """
    _check(frames, multiplier, batch_size)
    passes = multiplier.bit_length() - 1
    total, n = 0, frames.shape[0]
    for _ in range(passes):
        total += n - 1
        n = 2 * n - 1
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if callback is not None:
            callback(done, total)

    out = frames
    for _ in range(passes):
        out = _double(model, out, batch_size, step)
    log.info("RIFE: %d -> %d frames (x%d)", frames.shape[0], out.shape[0], multiplier)
    return out
