"""Peak activation memory of one full-size Sonic UNet step per low-VRAM mode, counted on the CPU.

One window's guided velocity (``sampler._guided_velocity``, the code the sampler runs: the CFG
input, the UNet call(s), the guidance sum) of the SVD-xt-sized Sonic UNet with random weights at
512x512 (64x64 latent), 25-frame windows, in 16-bit activations. It runs on the ``meta`` device
under bench/_memcount.py's counter: every tensor's bytes are exact, nothing is computed, so the
full size takes seconds here. SDPA is counted as CUDA's flash kernel allocates (output and
log-sum-exp, no score matrix); see _memcount.py for what is not counted (allocator rounding,
cuDNN workspaces, the CUDA context).

Modes: guidance rows 3 (one UNet call per window) or 1 (three calls), window batch 1 or 2, UNet
weights stored in fp16 or fp8 (float8_e4m3fn with per-channel scales, upcast per layer).
Estimated GPU total = stored weights + peak activations (+ the sampler's clip-long tensors for a
10 s clip, small); the CUDA context (~0.3-0.6 GB) comes on top and is listed separately.

Validation (``--validate``): the same counter on meta against a real CPU run of the same call,
measured by torch.profiler (every CPU allocator event) and by peak-RSS growth, at sizes where
the real run is quick: small Sonic UNets at 128-256 px in float32, and the full SVD-xt
architecture at 64x64 with 4-frame windows in bf16 (3 GB of weights).

    python bench/bench_vram.py --json FILE [--validate] [--size 512]

Writes a JSON list of rows {"mode": ..., "activation_mb": ..., ...}; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _memcount as mc  # noqa: E402
from _official_driver import reset_peak, rss_kib  # noqa: E402

from sonic_core import lowvram, sampler  # noqa: E402
from sonic_core.config import (  # noqa: E402
    AUDIO_TOKENS,
    LATENT_CHANNELS,
    SAMPLER_DEFAULTS,
    VAE_SCALE,
)
from sonic_core.models.unet import build_sonic_unet, load_config  # noqa: E402

MB = 2**20
GB = 1e9  # "8 GB card": decimal, as vendors count
CLIP_SECONDS = 10.0  # s of audio the clip-long tensors are sized for
CUDA_CONTEXT_MB = (300, 600)  # typical CUDA context + kernels of torch on one GPU (not counted)
SIGMA = 700.0  # any sigma: memory does not depend on it
MODES = [  # (guidance rows, window batch, weight storage)
    (3, 1, "fp16"), (1, 1, "fp16"), (3, 2, "fp16"), (1, 2, "fp16"),
    (3, 1, "fp8"), (1, 1, "fp8"),
]


def mode_name(rows: int, wb: int, weights: str) -> str:
    return f"rows{rows}_wb{wb}_{weights}"


def step_inputs(device, dtype, frames: int, side: int, dim: int, tokens: int = AUDIO_TOKENS,
                gen: torch.Generator | None = None) -> dict:
    """What ``_guided_velocity`` reads, for a clip of ``frames`` frames at ``side`` px."""
    lat = side // VAE_SCALE

    def rnd(*shape):
        if device == "meta" or gen is None:
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(latents=rnd(frames, LATENT_CHANNELS, lat, lat), img_lat=rnd(1, LATENT_CHANNELS, lat, lat),
                clip=rnd(1, 1, dim), cond=rnd(frames, tokens, dim), uncond=rnd(tokens, dim),
                mb=torch.full((frames, 2), 20.0, device=device),
                mask=torch.ones(1, 1, side, side, device=device, dtype=dtype))


def guided_step(unet, x: dict, rows: int, wb: int, window: int, dtype):
    """One ``_guided_velocity`` call for ``wb`` windows (the sampler's own code)."""
    frames = x["latents"].shape[0]
    chunk = [[(b * window + j) % frames for j in range(window)] for b in range(wb)]
    settings = dataclasses.replace(SAMPLER_DEFAULTS, frames_per_window=window, guidance_rows=rows)
    dev = x["latents"].device
    g = torch.tensor(2.0, device=dev, dtype=dtype)
    return sampler._guided_velocity(unet, x["latents"], chunk, torch.tensor(1.6, device=dev),
                                    torch.tensor(SIGMA, device=dev), x["img_lat"], x["clip"], x["cond"],
                                    x["uncond"], x["mb"], x["mask"], g, g, settings)


def meta_unet(config: dict, dtype, weights: str):
    with torch.device("meta"):
        unet = build_sonic_unet(dict(config))
    unet = unet.to("meta", dtype).eval().requires_grad_(False)  # legacy torch.Tensor buffers too
    if weights == "fp8":
        lowvram.store_weights_fp8(unet, dtype)
    return unet


# ----------------------------------------------------------------------------------------------
# Full size on meta
# ----------------------------------------------------------------------------------------------
def full_size(a) -> list[dict]:
    config = load_config(None)
    dim = config["cross_attention_dim"]
    frames = int(CLIP_SECONDS * SAMPLER_DEFAULTS.fps_conditioning)  # 125 at 12.5 fps
    lat = a.size // VAE_SCALE
    rows_out = []
    for rows, wb, weights in MODES:
        unet = meta_unet(config, torch.float16, weights)
        x = step_inputs("meta", torch.float16, frames, a.size, dim)
        t0 = time.perf_counter()
        peak, _left = mc.meta_peak_bytes(lambda: guided_step(unet, x, rows, wb, a.window, torch.float16),
                                         mc.module_tensors(unet) + list(x.values()))
        w_bytes = lowvram.weight_bytes(unet)
        clip_bytes = sum(t.numel() * t.element_size() for t in x.values())
        # beside the latents: the float32 start (4 B an element) and, counted for every frame as an
        # upper bound (2 B), the step accumulator; since StepAccumulator it only holds frames several
        # windows share, none for 125 frames = 5 windows, so the totals are ~4 MB high
        clip_bytes += frames * LATENT_CHANNELS * lat * lat * (2 + 4)
        total = w_bytes + peak + clip_bytes
        rows_out.append(dict(
            mode=mode_name(rows, wb, weights), activation_mb=round(peak / MB, 1), guidance_rows=rows,
            window_batch=wb, weights=weights, weight_mb=round(w_bytes / MB, 1),
            clip_tensors_mb=round(clip_bytes / MB, 1), estimated_total_mb=round(total / MB, 1),
            estimated_total_gb=round(total / GB, 2), size=a.size, window=a.window, frames=frames,
            activation_dtype="fp16", bytes_per_latent_element=round(peak / (rows * wb * a.window * lat * lat)),
            method="meta counter (_memcount.LiveBytes, SDPA as flash)", seconds=round(time.perf_counter() - t0, 1)))
        del unet
    return rows_out


# ----------------------------------------------------------------------------------------------
# Validation: meta counter vs a real CPU run
# ----------------------------------------------------------------------------------------------
def random_unet(config: dict, dtype) -> torch.nn.Module:
    """The UNet built on meta and given random values in ``dtype`` on the CPU (no float32 copy)."""
    with torch.device("meta"):
        unet = build_sonic_unet(dict(config))
    unet = unet.to("meta", dtype).to_empty(device="cpu").eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in (*unet.named_parameters(), *unet.named_buffers()):
            if name.endswith("mix_factor"):
                t.fill_(0.0)
            elif t.ndim >= 2:
                t.copy_(torch.rand(t.shape, generator=gen).mul_(2).sub_(1).mul_(t[0].numel() ** -0.5))
            elif name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.zero_()
    return unet


def validate_one(name: str, config: dict, side: int, window: int, rows: int, dtype) -> dict:
    dim = config["cross_attention_dim"]
    frames = window
    meta = meta_unet(config, dtype, "fp16")
    xm = step_inputs("meta", dtype, frames, side, dim)
    counted, _ = mc.meta_peak_bytes(lambda: guided_step(meta, xm, rows, 1, window, dtype),
                                    mc.module_tensors(meta) + list(xm.values()))
    del meta, xm
    unet = random_unet(config, dtype)
    x = step_inputs("cpu", dtype, frames, side, dim, gen=torch.Generator().manual_seed(1))
    run = lambda: guided_step(unet, x, rows, 1, window, dtype)  # noqa: E731
    gc.collect()
    ok = reset_peak()
    rss0 = rss_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = run()
    seconds = time.perf_counter() - t0
    growth = (rss_kib("VmHWM") - rss0) * 1024 if ok else -1
    del out
    gc.collect()
    profiled = mc.cpu_peak_bytes(run)
    counted_cpu = mc.counted_peak_bytes(run, mc.module_tensors(unet) + list(x.values()))
    return dict(mode=f"validate_{name}_{side}px_rows{rows}", activation_mb=round(counted / MB, 2),
                cpu_profiler_mb=round(profiled / MB, 2), cpu_counter_mb=round(counted_cpu / MB, 2),
                rss_growth_mb=round(growth / MB, 1) if growth >= 0 else None,
                meta_over_profiler=round(counted / profiled, 4), size=side, window=window, guidance_rows=rows,
                dtype=str(dtype).removeprefix("torch."), cpu_seconds=round(seconds, 1))


def validation_cases(a) -> dict[str, tuple]:
    from bench_vs_official import SMALL_UNET  # SVD-xt layout, narrow channels

    from sonic_core.selftest import TINY_UNET

    cases = {"tiny": (TINY_UNET, 128, 25, torch.float32), "small": (SMALL_UNET, 256, 25, torch.float32)}
    if not a.no_full_validate:
        cases["svdxt"] = (load_config(None), a.validate_side, 4, torch.bfloat16)  # 4 frames: bf16 is slow here
    return cases


def validation(a) -> list[dict]:
    """Each case and row count in a fresh process, so its peak-RSS growth is its own."""
    import subprocess

    out = []
    for name in validation_cases(a):
        for rows in (3, 1):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{name}:{rows}",
                   "--validate-side", str(a.validate_side), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"validation worker {name}:{rows} failed")
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {out[-1]}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["mode"] == "rows3_wb1_fp16")
    lines = ["| mode | guidance rows | windows per call | weights | weights MB | peak activations MB "
             "| vs rows 3 | weights + activations GB | bytes / latent element |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['guidance_rows']} | {r['window_batch']} | {r['weights']} | "
                     f"{r['weight_mb']:.0f} | {r['activation_mb']:.0f} | "
                     f"{r['activation_mb'] / base['activation_mb'] * 100:.0f} % | {r['estimated_total_gb']:.2f} | "
                     f"{r['bytes_per_latent_element']} |")
    return "\n".join(lines)


def validation_table(rows: list[dict]) -> str:
    lines = ["| case | dtype | meta counter MB | CPU profiler MB | counter on CPU MB | peak RSS growth MB "
             "| meta / profiler | CPU s |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['activation_mb']:.2f} | {r['cpu_profiler_mb']:.2f} | "
                     f"{r['cpu_counter_mb']:.2f} | {r['rss_growth_mb']} | {r['meta_over_profiler']:.4f} | "
                     f"{r['cpu_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--size", type=int, default=512, help="image side in px (latent side / 8)")
    p.add_argument("--window", type=int, default=SAMPLER_DEFAULTS.frames_per_window, help="frames per window")
    p.add_argument("--validate", action="store_true", help="also check the counter against real CPU runs")
    p.add_argument("--validate-side", type=int, default=64, help="px of the full-architecture CPU check")
    p.add_argument("--no-full-validate", action="store_true", help="skip the 3 GB full-architecture check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # NAME:ROWS, one validation case
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        name, rows = a.worker.split(":")
        print(json.dumps(validate_one(name, *validation_cases(a)[name][:3], int(rows),
                                      validation_cases(a)[name][3])))
        return 0
    rows = full_size(a)
    print(f"Sonic UNet (SVD-xt size), {a.size}x{a.size}, windows of {a.window} frames, 16-bit activations, "
          f"meta-counted; torch {torch.__version__}, {platform.machine()}")
    print(table(rows))
    r3 = next(r for r in rows if r["mode"] == "rows3_wb1_fp16")
    r1 = next(r for r in rows if r["mode"] == "rows1_wb1_fp16")
    print(f"rows 1 / rows 3: {r1['activation_mb'] / r3['activation_mb'] * 100:.1f} %; "
          f"CUDA context not counted: {CUDA_CONTEXT_MB[0]}-{CUDA_CONTEXT_MB[1]} MB")
    if a.validate:
        checks = validation(a)
        print(validation_table(checks))
        rows += checks
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
