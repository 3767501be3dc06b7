"""The sampler's own tensors against clip length: peak bytes ``sampler.sample`` allocates beyond
its inputs, counted on ``meta`` (bench/_memcount.py: exact tensor bytes, no compute), so a
ten-minute clip at 512x512 takes seconds.

What grows with the clip in latent space is what the position-shift sampler must hold: every
step denoises the whole clip. This counts it for the selftest's tiny UNet (its per-call
activations are constant; the clip's tensors are the official sizes: ``[F,4,64,64]`` latents at
512 px). The inputs (noise, audio tokens, reference latents) are the caller's and not counted.

    python bench/bench_clip_state.py --seconds 20 120 600 --side 512 [--repo OLD_CHECKOUT] [--json F]

``--repo`` measures another checkout's sonic_core (e.g. a ``git worktree`` of an older commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


def measure(seconds: float, side: int, dtype: torch.dtype) -> dict:
    import _memcount as mc
    from sonic_core import sampler
    from sonic_core.config import LATENT_CHANNELS, SAMPLER_DEFAULTS, VAE_SCALE
    from sonic_core.models.unet import build_sonic_unet
    from sonic_core.selftest import TINY_UNET, TINY_WIDTH

    frames = int(round(seconds * SAMPLER_DEFAULTS.fps_conditioning))
    lat = side // VAE_SCALE
    with torch.device("meta"):
        unet = build_sonic_unet(dict(TINY_UNET))
    unet = unet.to("meta", dtype).eval().requires_grad_(False)
    m = dict(device="meta", dtype=torch.float32)
    inputs = dict(image_latents=torch.empty(1, LATENT_CHANNELS, lat, lat, **m),
                  ref_latents=torch.empty(1, LATENT_CHANNELS, lat, lat, **m),
                  clip_embeds=torch.empty(1, TINY_WIDTH, **m),
                  cond_tokens=torch.empty(frames, 4, TINY_WIDTH, **m),
                  uncond_tokens=torch.empty(4, TINY_WIDTH, **m),
                  buckets=torch.full((frames, 2), 20.0, device="meta"),
                  face_mask=torch.ones(1, 1, side, side, **m),
                  noise=torch.empty(frames, LATENT_CHANNELS, lat, lat, **m))
    settings = dataclasses.replace(SAMPLER_DEFAULTS, steps=1, i2i_strength=1.0)
    # sample() also moves the audio tokens to the latent dtype: 256 B a frame for these tiny ones
    # (4 x 32) in fp16, 64 KB for the real ones (32 x 1024); not subtracted
    t0 = time.perf_counter()
    peak, left = mc.meta_peak_bytes(
        lambda: sampler.sample(unet, **inputs, settings=settings, device=torch.device("meta"), dtype=dtype),
        mc.module_tensors(unet) + list(inputs.values()))
    latent_frame = LATENT_CHANNELS * lat * lat * torch.finfo(dtype).bits // 8
    return dict(seconds=seconds, frames=frames, side=side, dtype=str(dtype).replace("torch.", ""),
                peak_mb=round(peak / MB, 1), left_mb=round(left / MB, 1),
                peak_bytes=peak, latent_frame_bytes=latent_frame,
                count_s=round(time.perf_counter() - t0, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[20, 120, 600])
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--repo", default=str(ROOT), help="checkout whose sonic_core is measured")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _memcount
    sys.path.insert(0, str(Path(a.repo).resolve()))
    import sonic_core

    print(f"sonic_core from {Path(sonic_core.__file__).parent}")
    rows = []
    for name in a.dtypes:
        first = None
        for s in a.seconds:
            r = measure(s, a.side, getattr(torch, name))
            first = first or r
            rows.append(r)
            # growth per added frame, in latent frames of the latent dtype: the clip-sized tensors
            # alive together at the peak (the UNet call's activations are the same for every length)
            extra = r["frames"] - first["frames"]
            per = (r["peak_bytes"] - first["peak_bytes"]) / extra if extra else 0.0
            r["growth_mb"] = round((r["peak_bytes"] - first["peak_bytes"]) / MB, 1)
            r["growth_latent_frames_per_frame"] = round(per / r["latent_frame_bytes"], 2) if extra else None
            print(f"{r['dtype']:8s} {s:6.0f} s {r['frames']:5d} frames {a.side}px  peak {r['peak_mb']:8.1f} MB  "
                  f"growth from {first['seconds']:g} s {r['growth_mb']:8.1f} MB "
                  f"(= {r['growth_latent_frames_per_frame']} latent frames per frame)  "
                  f"[{r['count_s']} s]", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
