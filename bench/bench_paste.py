"""Paste-back speed: milliseconds per frame to blend a generated crop into a photo (issue 23).

``sonic_core.image.PasteBack`` as the streaming paths run it (one ``[1, H, W, 3]`` frame at a time,
``stream.paste_chunks``): the crop resized (antialiased bicubic) and blended into a copy of the photo.
A face square of a quarter of the short side, crop by Face Mask Detect's rule (expand 0.5), frames at
the working size 512x512, float32, on the CPU unless ``--device`` says otherwise.

    python bench/bench_paste.py [--photos 1080x1920 2160x3840 4096x4096] [--frames 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sonic_core import face, image, stream  # noqa: E402

WORKING = 512  # px, the generated crop's side at min_resolution 512


def per_frame_ms(w: int, h: int, frames: int, device: str) -> float:
    photo = torch.rand(1, h, w, 3)
    side = min(w, h) // 4
    mask = torch.zeros(1, h, w)
    mask[0, h // 3:h // 3 + side, (w - side) // 2:(w + side) // 2] = 1
    box = face.detect_face_mask(photo, mask=mask, crop=True).box
    paste = image.PasteBack(photo, box)
    crops = torch.rand(frames, WORKING, WORKING, 3, device=device)
    for _ in stream.paste_chunks(paste, [crops[:2]]):  # warm-up: the photo moved to the device once
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in stream.paste_chunks(paste, [crops]):
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / frames * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", nargs="+", default=["1080x1920", "2160x3840", "4096x4096"])
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for spec in args.photos:
        w, h = (int(v) for v in spec.split("x"))
        print(f"{w}x{h}: {per_frame_ms(w, h, args.frames, args.device):.1f} ms per frame", flush=True)


if __name__ == "__main__":
    main()
