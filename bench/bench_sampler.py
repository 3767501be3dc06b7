"""Benchmark: Sonic sampler with batched windows vs one window per UNet call.

Tiny mode (default, CPU): a small random Sonic UNet, identical inputs for both runs; prints the
time of each, the speed ratio and the max abs difference of the results.
Full mode (``--full``, for a GPU): the SVD-xt-sized Sonic UNet with random weights, 512x512,
25 steps, 50 frames, windows of 25; prints seconds per step, generated frames per second and
peak VRAM for one-window calls and for the auto window batch.

    python bench/bench_sampler.py                 # tiny, CPU
    python bench/bench_sampler.py --full --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sonic_core import sampler  # noqa: E402
from sonic_core.config import SAMPLER_DEFAULTS  # noqa: E402
from sonic_core.models.unet import build_sonic_unet  # noqa: E402

TINY_UNET = {  # the golden case's tiny UNet architecture
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [32, 64, 64, 64],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [2, 4, 4, 4],
    "num_frames": 25,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(frames: int, size: int, dim: int, tokens: int, gen: torch.Generator) -> dict:
    h = w = size // 8
    return dict(
        image_latents=torch.randn(1, 4, h, w, generator=gen),
        ref_latents=torch.randn(1, 4, h, w, generator=gen) * 0.18215,
        clip_embeds=torch.randn(1, dim, generator=gen),
        cond_tokens=torch.randn(frames, tokens, dim, generator=gen),
        uncond_tokens=torch.randn(tokens, dim, generator=gen),
        buckets=16 + torch.rand(frames, 2, generator=gen) * 8,
        face_mask=(torch.rand(1, 1, size, size, generator=gen) > 0.5).float(),
        noise=torch.randn(frames, 4, h, w, generator=gen),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(unet, inputs, settings, device, dtype, window_batch):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = sampler.sample(
            unet, **inputs, settings=settings, device=device, dtype=dtype, window_batch=window_batch
        )
    sync(device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return out, dt, cpu, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="SVD-xt-sized UNet, 512x512, 25 steps, 50 frames")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 (tiny) / fp16 (full)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--window-batch", type=int, default=0, help="0 = auto (what the node picks)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each variant, alternating; best time kept")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("fp16" if a.full else "fp32")]
    frames = a.frames or (50 if a.full else 48)
    steps = a.steps or (25 if a.full else 3)
    size = a.size or (512 if a.full else 64)
    window = a.window or (25 if a.full else 4)
    settings = dataclasses.replace(SAMPLER_DEFAULTS, steps=steps, frames_per_window=window)

    torch.manual_seed(0)
    with torch.device(device):
        unet = build_sonic_unet(None if a.full else TINY_UNET)
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    dim = unet.config.cross_attention_dim
    tokens = 32 if a.full else 4
    inputs = make_inputs(frames, size, dim, tokens, torch.Generator().manual_seed(1))
    n_windows = sampler.window_count(frames, settings)
    free = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    batch = a.window_batch or sampler.auto_window_batch(free, size // 8, size // 8, window, dtype, n_windows)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device {device} ({name}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {dtype}"
    )
    print(
        f"{'full SVD-xt' if a.full else 'tiny'} UNet, {size}x{size}, {frames} frames, window {window}, "
        f"{steps} steps, {n_windows} windows/step; batched = {batch} windows per UNet call"
    )
    timed_run(
        unet,
        {k: v[:window] if k in ("cond_tokens", "buckets", "noise") else v for k, v in inputs.items()},
        dataclasses.replace(settings, steps=1),
        device,
        dtype,
        1,
    )  # warm-up
    t1 = tb = c1 = cb = float("inf")
    for _ in range(max(1, a.repeat)):  # alternate, keep the best: fair under shared CPUs
        single, t, c, peak1 = timed_run(unet, inputs, settings, device, dtype, 1)
        t1, c1 = min(t1, t), min(c1, c)
        batched, t, c, peakb = timed_run(unet, inputs, settings, device, dtype, batch)
        tb, cb = min(tb, t), min(cb, c)
    diff = (single.float() - batched.float()).abs().max().item()
    for name, t, c, peak in (
        ("one window per call", t1, c1, peak1),
        (f"{batch} windows per call", tb, cb, peakb),
    ):
        line = (
            f"{name:>22}: {t:8.2f} s, {t / steps:7.3f} s/step, {frames / t:7.2f} generated frames/s, "
            f"CPU {c:.2f} s"
        )
        if device.type == "cuda":
            line += f", peak VRAM {peak / 2**30:.2f} GiB"
        print(line)
    if not a.full:  # same comparison in float64: rounding no longer hides the semantics
        u64, in64 = unet.to(torch.float64), {k: v.double() for k, v in inputs.items()}
        s64, *_ = timed_run(u64, in64, settings, device, torch.float64, 1)
        b64, *_ = timed_run(u64, in64, settings, device, torch.float64, batch)
        print(
            f"float64 check: batched vs one window per call, max abs difference "
            f"{(s64 - b64).abs().max().item():.3e}"
        )
    print(
        f"speed-up batched / single: {t1 / tb:.2f}x wall, {c1 / cb:.2f}x CPU time "
        f"(best of {max(1, a.repeat)}); "
        f"max abs difference {diff:.3e} "
        "(0 when every kernel is batch-invariant; oneDNN may pick conv algorithms by batch size)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
