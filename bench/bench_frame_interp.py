"""ComfyUI 0.33's own frame interpolation (Run Frame Interpolation Model) against Sonic's RIFE node on the
same frames (issue 31 item 8).

Runs with a ComfyUI tree that has ``comfy_extras/nodes_frame_interpolation.py`` (0.33.0 and later),
imported from ``COMFYUI_PATH`` at run time, in that ComfyUI's Python (its requirements and ours):

    COMFYUI_PATH=/opt/comfy/0.33.0 LD_LIBRARY_PATH=/opt/comfy/stubs \\
        /opt/comfy/venv/bin/python bench/bench_frame_interp.py [--frames 9] [--side 512] [--repeat 2]

Both networks get random weights at their real sizes (no download here): ComfyUI's RIFE 4.x IFNet with
its default widths (head 4, blocks 192/128/96/64/32) and Sonic's RIFE HDv3 (3 blocks of 90 channels,
``RIFE/flownet.pkl``'s layout). What it measures: whether ComfyUI's loader takes Sonic's flownet.pkl
layout, the frame count each gives for N frames at multipliers 2 and 4, whether the input frames pass
through unchanged, the convolution GFLOP of one middle frame (independent of the machine's load)
and the CPU time per interpolated frame at ``--side`` x ``--side``. Picture quality
needs the real weights and is not measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
INIT_STD = 0.02  # std of the random weights (keeps the random flows small and the output finite)
SHIFT_PX = 2  # px the test picture moves per frame
CORE_HEAD = 4  # ComfyUI IFNet defaults (RIFE 4.x): head channels and block widths
CORE_CHANNELS = (192, 128, 96, 64, 32)


def _frames(n: int, side: int) -> torch.Tensor:
    """``[n, side, side, 3]`` in 0..1: the selftest portrait moving right by SHIFT_PX per frame."""
    import tempfile

    import numpy as np
    from PIL import Image

    from sonic_core import selftest

    with tempfile.TemporaryDirectory() as tmp:
        path = selftest.write_portrait(Path(tmp) / "p.png")
        img = Image.open(path).convert("RGB").resize((side, side))
    base = torch.from_numpy(np.asarray(img).copy()).float() / 255  # [side, side, 3]
    return torch.stack([torch.roll(base, i * SHIFT_PX, dims=1) for i in range(n)])  # [n, side, side, 3]


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
    return model.eval()


def _core():
    """ComfyUI's loader and node classes, and its RIFE 4.x IFNet with random weights in a patcher."""
    comfy_path = os.environ.get("COMFYUI_PATH", "")
    if not (Path(comfy_path) / "comfy_extras" / "nodes_frame_interpolation.py").is_file():
        sys.exit(f"COMFYUI_PATH={comfy_path!r} has no comfy_extras/nodes_frame_interpolation.py (ComfyUI 0.33+)")
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()  # what --cpu does; set before model_management loads
    import comfy.model_management as mm
    import comfy.model_patcher
    from comfy_extras import nodes_frame_interpolation as fi
    from comfy_extras.frame_interpolation_models.ifnet import IFNet

    net = _randomize(IFNet(head_ch=CORE_HEAD, channels=CORE_CHANNELS), 0)
    patcher = comfy.model_patcher.CoreModelPatcher(net, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
    return fi, patcher, net


def _params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _timed(fn, repeat: int):
    out, best = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from sonic_core.config import RIFE_CHANNELS, RIFE_STATE_PREFIX
    from sonic_core.interpolate import interpolate
    from sonic_core.models.rife import IFNet as SonicIFNet

    fi, patcher, core_net = _core()
    ours = _randomize(SonicIFNet(RIFE_CHANNELS), 0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.frames} frames "
          f"{args.side}x{args.side}, float32, random weights")
    print(f"parameters: ComfyUI RIFE 4.x IFNet {_params(core_net):.2f} M, Sonic RIFE HDv3 {_params(ours):.2f} M")

    flownet = {RIFE_STATE_PREFIX + k: v for k, v in ours.state_dict().items()}  # flownet.pkl's layout
    try:
        fi.FrameInterpolationModelLoader._detect_and_load(flownet)
        print("ComfyUI's loader takes Sonic's RIFE/flownet.pkl layout")
    except (ValueError, KeyError, RuntimeError) as e:
        print(f"ComfyUI's loader refuses Sonic's RIFE/flownet.pkl layout: {type(e).__name__}: {e}")

    frames = _frames(args.frames, args.side)
    pair = frames[:2].movedim(-1, 1)  # [2, 3, side, side]
    img0, img1 = pair[:1], pair[1:]
    print(f"GFLOP per middle frame at {args.side}x{args.side} (convolutions; the same on any machine): "
          f"ComfyUI RIFE 4.x {_gflop(lambda: core_net(img0, img1, timestep=0.5)):.1f}, "
          f"Sonic RIFE HDv3 {_gflop(lambda: ours(img0, img1)):.1f}")
    best = {"core": float("inf"), "ours": float("inf")}
    with torch.inference_mode():
        for _ in range(args.repeat + 1):  # interleaved, the fastest of each: the least disturbed by other load
            for name, fn in (("core", lambda: core_net(img0, img1, timestep=0.5)), ("ours", lambda: ours(img0, img1))):
                best[name] = min(best[name], _timed(fn, 1)[1])
    print(f"one middle frame, fastest of {args.repeat + 1} interleaved runs: ComfyUI RIFE 4.x "
          f"{1000 * best['core']:.0f} ms, Sonic RIFE HDv3 {1000 * best['ours']:.0f} ms")
    n = frames.shape[0]
    for mult in (2, 4):
        with torch.inference_mode():
            core_out, core_s = _timed(lambda: fi.FrameInterpolate.execute(patcher, frames, mult).result[0],
                                      args.repeat)
            our_out, our_s = _timed(lambda: interpolate(ours, frames, mult, batch_size=4), args.repeat)
        made = (n - 1) * (mult - 1)  # interpolated frames
        for name, out, secs in (("ComfyUI FrameInterpolate", core_out, core_s), ("Sonic RIFE", our_out, our_s)):
            kept = torch.equal(out[::mult].float(), frames)  # the input frames at every mult-th place
            print(f"x{mult} {name}: {n} -> {out.shape[0]} frames, inputs kept unchanged: {kept}, "
                  f"{secs:.2f} s, {1000 * secs / made:.0f} ms per interpolated frame")


if __name__ == "__main__":
    main()
