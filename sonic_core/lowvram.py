"""Low-VRAM modes: UNet weights stored in fp8, and chunk sizes planned from free memory.

fp8 storage (``store_weights_fp8``): every Linear / Conv weight of the UNet (99.9 % of its
parameters) is kept as ``float8_e4m3fn`` with one float32 scale per output channel, and read back
in the compute dtype when its layer runs (``weight`` is upcast on access, so diffusers' own
forwards and our GroupedLinear need no change). The stored bytes halve against fp16; every layer
computes in fp16/bf16 as before, with weights rounded to 3 mantissa bits. Like ComfyUI's
``weight_dtype`` fp8 option, but scaled per channel (plain unscaled casting flushes the small
weights of a channel to zero or to a few subnormal steps). Biases and norms keep the compute dtype.

Chunk sizes (``auto_decode_chunk``, ``auto_rife_batch``): the largest chunk whose activations fit
the free accelerator memory the caller measured (None: a CPU, keep the default). The per-pixel
costs are meta-counted peaks (bench/bench_vram.py). The decode chunk is the temporal decoder's
window, so it changes the frames slightly (SPEC §11): the official 8 is kept whenever it fits.
RIFE pairs are independent, so its batch changes only the speed.

Devices and free memory are arguments here; nodes/runtime.py (ComfyUI) or sonic_core.budget
(standalone) measure them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import (
    PLAN_MEMORY_MARGIN,
    RIFE_AUTO_BATCH_MAX,
    RIFE_BATCH,
    RIFE_BYTES_PER_PIXEL,
    SAMPLER_DEFAULTS,
    VAE_DECODE_BYTES_PER_PIXEL,
)

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448, largest finite e4m3fn value
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": FP8}  # weight storage choices (loader node, CLI)
FP8_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers whose weight is stored in fp8
_REFERENCE_BITS = 16  # the per-pixel constants are measured with 16-bit activations (RIFE: 32)


# ----------------------------------------------------------------------------------------------
# fp8 weight storage
# ----------------------------------------------------------------------------------------------
class Fp8Weight:
    """Mixin for a Linear / Conv module whose ``weight`` is stored as fp8 with ``weight_scale``.

    Reading ``module.weight`` (what every forward does) gives ``fp8 * scale`` in
    ``compute_dtype``, a temporary of one layer; ``state_dict()`` / ``parameters()`` see the stored
    fp8 tensor (the parameter keys are unchanged, the scale is a non-persistent buffer).
    """

    compute_dtype: torch.dtype

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if name == "weight":
            scale = super().__getattr__("weight_scale")  # [out, 1, ...] float32
            return (value.to(scale.dtype) * scale).to(self.compute_dtype)
        return value


_fp8_classes: dict[type, type] = {}


def _fp8_class(cls: type) -> type:
    if cls not in _fp8_classes:
        _fp8_classes[cls] = type(f"Fp8{cls.__name__}", (Fp8Weight, cls), {})
    return _fp8_classes[cls]


def quantize_fp8(weight: torch.Tensor, storage: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, ...]`` -> (fp8 values, float32 scale ``[out, 1, ...]``), ``values * scale ~ weight``.

    Each output channel is scaled so that its largest magnitude maps to the format's largest
    finite value; an all-zero channel gets scale 1.
    """
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)  # [out, 1, ...]
    fmax = float(torch.finfo(storage).max)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    return (w / scale).clamp(-fmax, fmax).to(storage), scale


def store_weights_fp8(model: nn.Module, compute_dtype: torch.dtype, storage: torch.dtype = FP8) -> dict:
    """Keep every Linear / Conv weight of ``model`` in ``storage`` (fp8), upcast per layer at compute.

    In place, one layer at a time (the compute-dtype copy of a layer is freed before the next).
    Returns ``{"layers": n, "bytes_before": b0, "bytes_after": b1}`` of the converted weights.
    """
    if storage not in WEIGHT_DTYPES.values():
        raise ValueError(f"weight storage {storage} is not one of {list(WEIGHT_DTYPES)}")
    layers = before = after = 0
    for module in list(model.modules()):
        if isinstance(module, Fp8Weight) or not isinstance(module, FP8_LAYERS):
            continue
        weight = module._parameters["weight"]
        if weight is None:
            continue
        values, scale = quantize_fp8(weight, storage)
        before += weight.numel() * weight.element_size()
        module._parameters["weight"] = nn.Parameter(values, requires_grad=False)
        module.register_buffer("weight_scale", scale, persistent=False)
        module.__class__ = _fp8_class(type(module))
        module.compute_dtype = compute_dtype
        after += values.numel() * values.element_size() + scale.numel() * scale.element_size()
        layers += 1
    if layers == 0:
        raise ValueError("the model has no Linear or Conv weights to store in fp8")
    log.info("UNet weights in %s: %d layers, %.2f GiB -> %.2f GiB (compute %s)", str(storage).removeprefix(
        "torch."), layers, before / 2**30, after / 2**30, str(compute_dtype).removeprefix("torch."))
    return {"layers": layers, "bytes_before": before, "bytes_after": after}


def is_fp8(model: nn.Module) -> bool:
    """Does ``model`` hold fp8-stored layers (``store_weights_fp8``)?"""
    return any(isinstance(m, Fp8Weight) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# ----------------------------------------------------------------------------------------------
# Chunk sizes from free memory
# ----------------------------------------------------------------------------------------------
def fit_count(free_bytes: int, per_item: float, cap: int) -> int:
    """How many items of ``per_item`` bytes fit the planned share of ``free_bytes``: 1 to ``cap``."""
    return max(1, min(cap, int(free_bytes * PLAN_MEMORY_MARGIN // max(per_item, 1.0))))


def auto_decode_chunk(free_bytes: int | None, height: int, width: int, dtype: torch.dtype,
                      default: int = SAMPLER_DEFAULTS.decode_chunk_size) -> int:
    """Frames per temporal-VAE decode call at ``height x width`` px: ``default`` (official 8) when it
    fits ``free_bytes`` (None: a CPU, always ``default``), else the most that fit (at least 1).

    A smaller chunk changes the decoded frames slightly (the decoder mixes frames inside a chunk).
    """
    if free_bytes is None:
        return default
    per_frame = height * width * VAE_DECODE_BYTES_PER_PIXEL * torch.finfo(dtype).bits / _REFERENCE_BITS
    chunk = fit_count(free_bytes, per_frame, default)
    if chunk < default:
        log.warning("VAE decode: %d frames per chunk fit %.1f GiB free at %dx%d (official %d); the "
                    "temporal decoder then mixes fewer frames, which changes the video slightly",
                    chunk, free_bytes / 2**30, width, height, default)
    return chunk


def auto_rife_batch(free_bytes: int | None, height: int, width: int, dtype: torch.dtype = torch.float32,
                    cap: int = RIFE_AUTO_BATCH_MAX, cpu: int = RIFE_BATCH) -> int:
    """Frame pairs per RIFE call at ``height x width`` px: as many as fit ``free_bytes``, at most
    ``cap`` (None: a CPU, ``cpu`` pairs). Pairs are independent: the batch changes only the speed."""
    if free_bytes is None:
        return cpu
    per_pair = height * width * RIFE_BYTES_PER_PIXEL * torch.finfo(dtype).bits / 32
    return fit_count(free_bytes, per_pair, cap)
