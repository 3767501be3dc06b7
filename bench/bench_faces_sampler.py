"""Two faces sampled together against twice one face: the sampler alone (issue 30 item 7).

The selftest's tiny Sonic UNet (random weights) in one process, two faces with the same crop size
(their own latents, CLIP embedding, audio tokens, buckets and face mask), on this CPU:

* ``twice-one``: ``sampler.sample`` for face 1, then for face 2 (``--window-batch`` windows a call);
* ``shared``: ``sampler_faces.sample_faces`` for both, ``--window-batch`` windows of either face a
  call (with one window a step per face and 2 windows a call, each step is one call, not two).

Modes run interleaved ``--repeat`` times; the median wall time is reported, and the peak of live
tensor bytes of one run of each (bench/_memcount.py's counter: latents, activations, not weights).

    python bench/bench_faces_sampler.py [--frames 20] [--size 128] [--steps 4] [--window-batch 2]
        [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._memcount import counted_peak_bytes, module_tensors  # noqa: E402
from sonic_core import sampler, sampler_faces, selftest  # noqa: E402
from sonic_core.config import SAMPLER_DEFAULTS  # noqa: E402
from sonic_core.models.unet import build_sonic_unet  # noqa: E402

TOKENS = 4  # audio tokens per frame


def face(seed: int, frames: int, hw: tuple[int, int]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    d = selftest.TINY_WIDTH
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 2 * h : 6 * h, (1 + seed) * w : (4 + seed) * w] = 1.0
    return dict(image_latents=torch.randn(1, 4, h, w, generator=gen),
                ref_latents=torch.randn(1, 4, h, w, generator=gen),
                clip_embeds=torch.randn(1, d, generator=gen),
                cond_tokens=torch.randn(frames, TOKENS, d, generator=gen),
                uncond_tokens=torch.randn(TOKENS, d, generator=gen),
                buckets=torch.rand(frames, 2, generator=gen) * 100, face_mask=mask,
                noise=torch.randn(frames, 4, h, w, generator=gen))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20, help="frames of the clip (20 = 1.6 s at 12.5 fps)")
    p.add_argument("--size", type=int, default=128, help="working size in px (square)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--window-batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    unet = build_sonic_unet(dict(selftest.TINY_UNET)).eval().requires_grad_(False)
    s = dataclasses.replace(SAMPLER_DEFAULTS, steps=args.steps)
    hw = (args.size // 8, args.size // 8)

    def twice_one():
        return [sampler.sample(unet, **face(k, args.frames, hw), settings=s, window_batch=args.window_batch)
                for k in (1, 2)]

    def shared():
        return sampler_faces.sample_faces(unet, [face(k, args.frames, hw) for k in (1, 2)], settings=s,
                                          window_batch=args.window_batch)

    modes = {"twice-one": twice_one, "shared": shared}
    times: dict[str, list[float]] = {m: [] for m in modes}
    results = {}
    for _ in range(args.repeat):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    peaks = {name: counted_peak_bytes(fn, module_tensors(unet)) / 2**20 for name, fn in modes.items()}
    diff = max((a - b).abs().max().item() for a, b in zip(results["twice-one"], results["shared"]))
    med = {m: statistics.median(t) for m, t in times.items()}
    summary = {"frames": args.frames, "size": args.size, "steps": args.steps,
               "window_batch": args.window_batch, "repeat": args.repeat, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "median_s": med, "times_s": times, "peak_tensor_mib": peaks,
               "time_ratio_shared_vs_twice_one": med["shared"] / med["twice-one"],
               "peak_ratio_shared_vs_twice_one": peaks["shared"] / peaks["twice-one"],
               "max_abs_diff": diff}
    text = json.dumps(summary, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
