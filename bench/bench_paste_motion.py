"""Paste-back under head motion (issue 30 item 8): how far the pasted video is from the ideal one.

A real run moves the head and drifts the colour slightly; the paste then shows a seam where hair or
chin crosses the blend, and a lighter or darker square. Emulated here on a synthetic portrait (a
background and a head layer: face, eyes, mouth, hair above the face box): the generated frame is
the crop of the photo with the head rotated about the chin by ``angle`` degrees and every colour
channel scaled by ``1 +- drift`` (what the model returns), sent through the working size (Lanczos
to 512 px) and pasted back; the ideal is the photo with the same head motion applied in place and
no drift. Errors are u8 levels over the crop: the mean, the 99th percentile, and the mean over the
crop's border ring (where a seam or a colour square shows); flicker: how much the still background
inside the crop changes from the first frame of the turn to any later one.

    python bench/bench_paste_motion.py [--size 512x640] [--angles 0 4 8] [--drift 0.03]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sonic_core import face, image  # noqa: E402

WORKING = 512  # px, the generated crop's side at min_resolution 512
DRIFT_SIGNS = (1.0, 0.0, -1.0)  # the drift per channel: red up, green kept, blue down (a warm cast)
RING = 0.15  # the border ring the seam error is measured in, as a fraction of the crop's side


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                          indexing="ij")  # [h, w] each, pixel centres


def portrait(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """A background ``[h, w, 3]``, a head layer ``[h, w, 4]`` (RGB + coverage) and the face box."""
    yy, xx = _grid(h, w)
    bg = torch.stack([0.55 + 0.2 * torch.sin(xx / w * 5 + yy / h * 2), 0.6 + 0.15 * torch.cos(yy / h * 4),
                      0.7 - 0.2 * xx / w], dim=-1)  # [h, w, 3] a soft wall
    bg = bg + 0.04 * (torch.sin(xx * 0.7) * torch.sin(yy * 0.5))[..., None]  # fine texture the seam shows on
    s = min(h, w) * 0.28  # face side
    cx, cy = w / 2, h * 0.5
    box = (round(cx - s / 2), round(cy - s / 2), round(cx + s / 2), round(cy + s / 2))

    def ellipse(ex, ey, rx, ry, soft=1.5):
        d = torch.sqrt(((xx - ex) / rx) ** 2 + ((yy - ey) / ry) ** 2)  # [h, w]
        return ((1 - d) * min(rx, ry) / soft).clamp(0, 1)

    hair = ellipse(cx, cy - 0.12 * s, 0.62 * s, 0.68 * s)
    skin = ellipse(cx, cy + 0.05 * s, 0.45 * s, 0.55 * s)
    eyes = ellipse(cx - 0.18 * s, cy - 0.05 * s, 0.06 * s, 0.04 * s) + ellipse(cx + 0.18 * s, cy - 0.05 * s,
                                                                              0.06 * s, 0.04 * s)
    mouth = ellipse(cx, cy + 0.3 * s, 0.15 * s, 0.04 * s)
    neck = ((xx - cx).abs() < 0.2 * s) & (yy > cy + 0.4 * s) & (yy < cy + 0.9 * s)
    colour = torch.tensor([0.25, 0.18, 0.12]).expand(h, w, 3).clone()  # hair
    colour = torch.lerp(colour, torch.tensor([0.85, 0.65, 0.55]).expand(h, w, 3), skin[..., None])
    colour = torch.lerp(colour, torch.tensor([0.1, 0.1, 0.12]).expand(h, w, 3), eyes.clamp(0, 1)[..., None])
    colour = torch.lerp(colour, torch.tensor([0.6, 0.2, 0.25]).expand(h, w, 3), mouth[..., None])
    cover = torch.maximum(torch.maximum(hair, skin), neck.float())  # [h, w]
    return bg.clamp(0, 1), torch.cat([colour, cover[..., None]], dim=-1), box


def rotated(layer: torch.Tensor, angle: float, pivot: tuple[float, float]) -> torch.Tensor:
    """``layer [h, w, C]`` rotated by ``angle`` degrees about ``pivot = (x, y)`` (bilinear, zeros outside)."""
    h, w = layer.shape[:2]
    yy, xx = _grid(h, w)
    a = math.radians(angle)
    px, py = pivot
    sx = px + (xx - px) * math.cos(a) + (yy - py) * math.sin(a)  # where each output pixel comes from
    sy = py - (xx - px) * math.sin(a) + (yy - py) * math.cos(a)
    g = torch.stack([sx / w * 2 - 1, sy / h * 2 - 1], dim=-1)[None]  # [1, h, w, 2] in -1..1
    x = layer.permute(2, 0, 1)[None]  # [1, C, h, w]
    out = torch.nn.functional.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0)  # [h, w, C]


def scene(bg: torch.Tensor, head: torch.Tensor, angle: float, pivot) -> torch.Tensor:
    """The photo with the head rotated by ``angle`` about ``pivot``: ``[h, w, 3]``."""
    layer = rotated(head, angle, pivot) if angle else head
    return torch.lerp(bg, layer[..., :3], layer[..., 3:])


class Case:
    """One synthetic portrait of ``h x w``, its face box found by Face Mask Detect (crop on)."""

    def __init__(self, h: int, w: int, working: int = WORKING):
        self.bg, self.head, fb = portrait(h, w)
        self.pivot = ((fb[0] + fb[2]) / 2, fb[3])  # the chin: bottom centre of the face box
        self.photo = image.to_u8(scene(self.bg, self.head, 0.0, self.pivot)).float() / 255  # [h, w, 3] as loaded
        mask = torch.zeros(1, h, w)
        mask[0, fb[1]:fb[3], fb[0]:fb[2]] = 1
        self.box = face.detect_face_mask(self.photo[None], mask=mask, crop=True).box
        self.working = working

    def frame(self, angle: float, drift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generated frame at the working size ``[1, s, s, 3]``, the ideal photo ``[h, w, 3]``)."""
        ideal = scene(self.bg, self.head, angle, self.pivot)
        x1, y1, x2, y2 = self.box.crop_xyxy
        gains = torch.tensor([1 + drift * s for s in DRIFT_SIGNS])
        crop = (ideal[y1:y2, x1:x2] * gains).clamp(0, 1)  # [ch, cw, 3] what the model returns, drifted
        u8 = image.resize_lanczos(image.to_u8(crop).numpy(), (self.working, self.working))
        return torch.from_numpy(u8).float()[None] / 255, ideal

    def flicker(self, angles, drift: float, feather: float, region: str, color_match: bool) -> float:
        """Largest mean change (u8 levels) of the still background inside the crop from the first frame
        of a head turn to any later one: what a colour match that follows the moving head would add."""
        paste = image.PasteBack(self.photo, self.box, feather, region, color_match)
        x1, y1, x2, y2 = self.box.crop_xyxy
        still = torch.ones(y2 - y1, x2 - x1, dtype=torch.bool)  # background in every frame
        outs = []
        for a in angles:
            gen, _ = self.frame(a, drift)
            outs.append(paste(gen)[0, y1:y2, x1:x2])  # [ch, cw, 3]
            still &= rotated(self.head, a, self.pivot)[y1:y2, x1:x2, 3] == 0
        return max(float((o - outs[0])[still].abs().mean()) * 255 for o in outs)

    def errors(self, angle: float, drift: float, feather: float, region: str, color_match: bool) -> dict:
        gen, ideal = self.frame(angle, drift)
        out = image.PasteBack(self.photo, self.box, feather, region, color_match)(gen)[0]  # [h, w, 3]
        x1, y1, x2, y2 = self.box.crop_xyxy
        err = (out - ideal)[y1:y2, x1:x2].abs().mean(-1) * 255  # [ch, cw] levels
        ring = torch.ones_like(err, dtype=torch.bool)
        r = max(1, int(RING * (x2 - x1)))
        ring[r:-r, r:-r] = False
        return {"mean": float(err.mean()), "p99": float(torch.quantile(err.flatten(), 0.99)),
                "ring": float(err[ring].mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512x640", help="photo WxH")
    p.add_argument("--angles", nargs="+", type=float, default=[0.0, 4.0, 8.0])
    p.add_argument("--drift", type=float, default=0.03)
    p.add_argument("--feathers", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    case = Case(h, w)
    print(f"photo {w}x{h}, crop {case.box.crop_xyxy}, drift {args.drift:.0%}; u8 levels over the crop "
          f"(mean / p99 / border ring), worst over angles {args.angles}")
    print("| region | feather | colour match | mean | p99 | ring | mean at 0 deg, no drift | flicker |")
    print("|---|---|---|---|---|---|---|---|")
    for region, feather, cm in itertools.product(("crop", "face"), args.feathers, (False, True)):
        rows = [case.errors(a, args.drift, feather, region, cm) for a in args.angles]
        still = case.errors(0.0, 0.0, feather, region, cm)
        worst = {k: max(r[k] for r in rows) for k in ("mean", "p99", "ring")}
        turn = case.flicker(args.angles, args.drift, feather, region, cm)
        print(f"| {region} | {feather:g} | {'on' if cm else 'off'} | {worst['mean']:.2f} | {worst['p99']:.1f} | "
              f"{worst['ring']:.2f} | {still['mean']:.2f} | {turn:.2f} |", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=2)
    main()
