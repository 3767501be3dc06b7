"""Dynamic VRAM on a GPU (issue 31): are other models kept resident across a Sonic run?

Imports a real ComfyUI 0.33 tree (``--comfyui``), starts comfy-aimdo the way its main.py does
when dynamic VRAM works (``comfy_aimdo.control.init`` / ``init_devices``, then
``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic``), loads "another model" (a stack of
comfy.ops casting Linear layers, as core models are built, under ``CoreModelPatcher``), runs it once,
then loads Sonic's UNet (full SVD-xt size, random fp16 weights) through this pack's
``runtime.ManagedModel`` and runs UNet calls, while ComfyUI believes VRAM is short (its reserve set to
the free VRAM, so a load asks for more than is free). Twice: Sonic under the patcher ComfyUI uses
(``dynamic``) and under the plain ``ModelPatcher`` the pack used before (``legacy``). For each it
prints and writes (``--out``/dynamic_vram.{md,json}``) the patcher that wrapped Sonic's UNet, the
``for_dynamic`` of every ``free_memory`` call during its load, and the other model's resident
bytes before and after. Expected on NVIDIA: dynamic keeps the other model, legacy unloads it.

``--dry-run``: the same code on the CPU (``--cpu``: no dynamic VRAM, both rows ModelPatcher, nothing
resident), with the tiny UNet. Run by bench/device_run.sh --dynamic-vram.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # sonic_core
OTHER_WIDTH = 4096  # features of each Linear of the other model
MIB = 1024 ** 2
UNET_CALLS = 2  # UNet calls of the "Sonic run"
WINDOW = 25  # frames per window (official)
SIDE = 512  # pixels (official min side)
AUDIO_TOKENS = 32  # tokens per frame (official)
KEPT_RATIO = 0.9  # the other model counts as kept when this share of its resident bytes stays


def comfy_setup(tree: Path, cpu: bool):
    """Import ComfyUI's model management from ``tree``; turn dynamic VRAM on as its main.py does."""
    sys.path.insert(0, str(tree))
    sys.argv = ["main.py"] + (["--cpu"] if cpu else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    from comfy.cli_args import args, enables_dynamic_vram

    import comfy_aimdo.control

    if enables_dynamic_vram():
        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    enabled = False
    if enables_dynamic_vram() and mm.is_nvidia():
        devices = [(d.index, int(args.vram_headroom * 1024 ** 3)) for d in mm.get_all_torch_devices()]
        if comfy_aimdo.control.init_devices(devices):
            mp.CoreModelPatcher = mp.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            enabled = True
    return mm, mp, enabled


def pack_runtime():
    """This pack's nodes/runtime.py as ComfyUI imports it (inside the pack's package), without
    importing every node family."""
    for name, path in (("ComfyUI_Sonic", REPO), ("ComfyUI_Sonic.nodes", REPO / "nodes")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    return importlib.import_module("ComfyUI_Sonic.nodes.runtime")


def other_model(mp, mm, gb: float, dtype: torch.dtype):
    import comfy.ops

    layers = max(1, int(gb * 1024 ** 3 / (OTHER_WIDTH * OTHER_WIDTH * dtype.itemsize)))
    with torch.device("meta"):
        net = torch.nn.Sequential(*[comfy.ops.manual_cast.Linear(OTHER_WIDTH, OTHER_WIDTH, bias=False)
                                    for _ in range(layers)])
    net = net.to_empty(device=mm.unet_offload_device()).to(dtype)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=OTHER_WIDTH ** -0.5)
    return mp.CoreModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def run_other(mm, patcher, dtype):
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        patcher.model(torch.randn(1, OTHER_WIDTH, device=mm.get_torch_device(), dtype=dtype))


def sonic_unet(dry: bool, dtype: torch.dtype):
    from sonic_core.models.unet import build_sonic_unet, load_config
    from sonic_core.selftest import TINY_UNET

    config = dict(TINY_UNET) if dry else load_config(None)
    with torch.device("meta"):
        unet = build_sonic_unet(dict(config))
    unet = torch.nn.Module.to(unet, "meta", dtype).to_empty(device="cpu").eval().requires_grad_(False)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return unet, config


def unet_call(unet, config: dict, side: int, window: int, device, dtype):
    lat, dim = side // 8, config["cross_attention_dim"]
    m = dict(device=device, dtype=dtype)
    with torch.no_grad():
        unet(torch.randn(1, window, 8, lat, lat, **m), torch.tensor(1.0, **m), torch.randn(1, 1, dim, **m),
             torch.randn(1, 3, **m), audio_tokens=torch.randn(1, window, AUDIO_TOKENS, dim, **m),
             face_mask=torch.ones(1, 1, side, side, **m))


def check(mode: str, mm, mp, runtime, other, unet, config, a, dtype) -> dict:
    run_other(mm, other, dtype)
    before = int(other.loaded_size())
    calls: list[bool] = []
    real_free = mm.free_memory

    def recording_free(*args, **kwargs):
        calls.append(bool(kwargs.get("for_dynamic", False)))
        return real_free(*args, **kwargs)

    core = getattr(mp, "CoreModelPatcher", mp.ModelPatcher)
    if mode == "legacy":
        mp.CoreModelPatcher = mp.ModelPatcher  # what the pack built before issue 31
    reserve = mm.EXTRA_RESERVED_VRAM
    mm.free_memory = recording_free
    t0 = time.perf_counter()
    try:
        device = mm.get_torch_device()
        if device.type != "cpu":
            mm.EXTRA_RESERVED_VRAM = int(mm.get_free_memory(device))  # ComfyUI now thinks VRAM is short
        managed = runtime.ManagedModel(unet, name="SonicUNet")
        module = managed.load()
        for _ in range(UNET_CALLS):
            unet_call(module, config, a.side, a.window, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        mm.free_memory, mm.EXTRA_RESERVED_VRAM, mp.CoreModelPatcher = real_free, reserve, core
    after = int(other.loaded_size())
    row = dict(mode=mode, sonic_patcher=type(managed.patcher).__name__, sonic_dynamic=managed.patcher.is_dynamic(),
               free_memory_for_dynamic=calls, other_before_mib=before / MIB, other_after_mib=after / MIB,
               other_kept=before > 0 and after >= KEPT_RATIO * before, seconds=time.perf_counter() - t0)
    del managed, module
    mm.unload_all_models()  # both models off the GPU: the next mode starts from the same state
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI 0.33 source tree")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--other-gb", type=float, default=8.0, help="size of the other model (fp16)")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    a.side, a.window = (64, 4) if a.dry_run else (SIDE, WINDOW)
    mm, mp, enabled = comfy_setup(a.comfyui, cpu=a.dry_run)
    runtime = pack_runtime()
    dtype = torch.float32 if a.dry_run else torch.float16
    other = other_model(mp, mm, 0.01 if a.dry_run else a.other_gb, dtype)
    unet, config = sonic_unet(a.dry_run, dtype)
    rows = [check(mode, mm, mp, runtime, other, unet, config, a, dtype) for mode in ("dynamic", "legacy")]
    lines = [f"# Dynamic VRAM check ({'DRY RUN, CPU' if a.dry_run else mm.get_torch_device_name(mm.get_torch_device())})",
             f"dynamic VRAM enabled: {enabled}; other model {a.other_gb if not a.dry_run else 0.01} GB; "
             f"Sonic UNet {'tiny' if a.dry_run else 'SVD-xt size'}, {UNET_CALLS} calls at {a.side}px x {a.window} frames",
             "", "| Sonic patcher | mode | free_memory for_dynamic | other before MiB | other after MiB | kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sonic_patcher']} | {r['mode']} | {sorted(set(r['free_memory_for_dynamic']))} | "
                     f"{r['other_before_mib']:.0f} | {r['other_after_mib']:.0f} | {r['other_kept']} |")
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "dynamic_vram.md").write_text(text + "\n")
    (a.out / "dynamic_vram.json").write_text(json.dumps(dict(enabled=enabled, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
