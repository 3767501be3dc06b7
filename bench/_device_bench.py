"""The one-shot GPU benchmark that bench/device_run.sh runs: ours vs the official implementation.

Both sides get the same random full-size weights (``_official_driver.fill_random_``: drawn per
state-dict key, no weight file), the same inputs (a 10 s clip at 12.5 fps = 125 frames, 512x512,
25-frame windows, K = 32 audio tokens) and the conditioning the official pipeline computes with a
tiny random VAE / CLIP tower. Each side runs a few denoising steps after a warm-up run; the time
is extrapolated to 25 steps (every step costs the same: 5 windows x one UNet call per guidance
setting). Peak memory is CUDA's ``max_memory_allocated`` during the timed run; "activations" is
that peak minus what was allocated before it (weights, inputs). Our modes: fp16 / bf16, guidance
rows 3 / 1, all windows of a step in one call, fp8 weights, torch.compile, and three runs capped at
7.5 GB (``set_per_process_memory_fraction``: an 8 GB card less its CUDA context).

    python bench/_device_bench.py run --work DIR --official-src DIR --official-site DIR [--dry-run]
    python bench/_device_bench.py worker --work DIR       (our side, in its own process)

``--dry-run``: the same code at tiny sizes on the CPU (tiny SVD-layout UNet, 64x64, 12 frames,
windows of 4, fp32 in place of fp16 / bf16, torch.compile with the eager backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from _official_driver import DTYPES, fill_random_, save_sampler_inputs, sync  # noqa: E402

GB = 1e9
CAP_BYTES = 7.5e9  # an 8 GB card less ~0.5 GB of CUDA context (not counted by the allocator)
FULL_STEPS = 25  # official denoising steps: what the timings are extrapolated to
CLIP_SECONDS = 10.0
AUDIO_TOKENS = 32
CLIP_SIZE = 32  # px, the tiny CLIP tower's input side (its output width is the UNet's context width)
SEED = 0
# name, dtype, guidance rows, windows per call (0 = every window of a step), weights, torch.compile,
# memory cap (bytes or None)
MODES = [
    ("fp16", 3, 1, "default", False, None), ("fp16", 1, 1, "default", False, None),
    ("fp16", 3, 0, "default", False, None), ("fp16", 3, 1, "fp8", False, None),
    ("fp16", 1, 1, "fp8", False, None),
    ("bf16", 3, 1, "default", False, None), ("bf16", 1, 1, "default", False, None),
    ("bf16", 3, 0, "default", False, None), ("bf16", 3, 1, "fp8", False, None),
    ("fp16", 1, 1, "default", False, CAP_BYTES), ("fp16", 3, 1, "default", False, CAP_BYTES),
    ("fp16", 3, 1, "fp8", False, CAP_BYTES),
    ("bf16", 3, 1, "default", True, None), ("fp16", 3, 1, "default", True, None),
]


DRY_UNET = {  # two levels of the SVD-xt blocks at tiny widths: the dry run's per-call overhead stays small
    "sample_size": 8, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64], "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1, "cross_attention_dim": 32, "transformer_layers_per_block": 1,
    "num_attention_heads": [2, 4], "num_frames": 25,
}
DRY_MODES = [  # one of each kind (the memory cap is skipped on a CPU, which the dry run checks too)
    ("fp16", 3, 1, "default", False, None), ("fp16", 1, 1, "default", False, None),
    ("fp16", 3, 0, "default", False, None), ("fp16", 3, 1, "fp8", False, None),
    ("bf16", 3, 1, "default", False, None), ("fp16", 1, 1, "default", False, CAP_BYTES),
    ("bf16", 3, 1, "default", True, None),
]


def mode_name(dtype, rows, wb, weights, compiled, cap) -> str:
    parts = [dtype, f"rows{rows}", "all-windows" if wb == 0 else f"wb{wb}"]
    if weights != "default":
        parts.append(f"{weights}-weights")
    if compiled:
        parts.append("compiled")
    if cap:
        parts.append(f"cap{cap / GB:g}GB")
    return " ".join(parts)


def sizes(dry: bool) -> dict:
    if dry:
        return dict(config=dict(DRY_UNET), side=64, frames=8, window=4, warm_steps=1, timed_steps=1,
                    dtypes=["fp16", "bf16"])
    from sonic_core.models.unet import load_config

    return dict(config=load_config(None), side=512, frames=int(CLIP_SECONDS * 12.5), window=25, warm_steps=1,
                timed_steps=2, dtypes=["fp16", "bf16"])


# ----------------------------------------------------------------------------------------------
# our side (a fresh process)
# ----------------------------------------------------------------------------------------------
def our_unet(config: dict, dtype: torch.dtype, device: str, weights: str):
    from sonic_core import lowvram
    from sonic_core.models.unet import build_sonic_unet

    with torch.device("meta"):
        unet = build_sonic_unet(dict(config))
    unet = torch.nn.Module.to(unet, "meta", dtype).to_empty(device=device)
    unet = fill_random_(unet, SEED).eval().requires_grad_(False)
    if weights == "fp8":
        lowvram.store_weights_fp8(unet, dtype)
    return unet


def flops_per_call(config: dict, side: int, window: int, rows: int) -> float:
    """FLOPs of one UNet call (torch.utils.flop_counter on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sonic_core.models.unet import build_sonic_unet

    with torch.device("meta"):
        unet = build_sonic_unet(dict(config))
    unet = unet.to("meta")
    lat, dim = side // 8, config["cross_attention_dim"]
    m = dict(device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(torch.empty(rows, window, 8, lat, lat, **m), torch.tensor(1.0, **m), torch.empty(rows, 1, dim, **m),
             torch.empty(rows, 3, **m), audio_tokens=torch.empty(rows, window, AUDIO_TOKENS, dim, **m),
             face_mask=torch.empty(1, 1, side, side, **m))
    return float(counter.get_total_flops())


def worker(a) -> int:
    from sonic_core import sampler
    from sonic_core.config import SAMPLER_DEFAULTS, VAE_SCALING_FACTOR

    meta = json.loads((a.work / "meta.json").read_text())
    device = meta["device"]
    cuda = device.startswith("cuda")
    x = load_file(str(a.work / "inputs.safetensors"))
    settings = dataclasses.replace(SAMPLER_DEFAULTS, **meta["settings"])
    n_windows = sampler.window_count(x["noise"].shape[0], settings)
    t_start = time.perf_counter()
    results = []
    groups: dict[tuple, list] = {}
    modes = DRY_MODES if meta["dry_run"] else MODES
    for mode in modes:  # one UNet build per (dtype, weights); compiled modes last (slow to build)
        groups.setdefault((mode[0], mode[3]), []).append(mode)
    ordered = [m for g in groups for m in groups[g] if not m[4]] + [m for m in modes if m[4]]
    unet, built = None, None
    seen = set()
    for dtype_name, rows, wb, weights, compiled, cap in ordered:
        dtype_name = meta["dtype_map"].get(dtype_name, dtype_name)  # dry run: fp32 where a CPU lacks fp16
        name = mode_name(dtype_name, rows, wb, weights, compiled, cap)
        if name in seen or (compiled and meta["compile_modes"] <= sum(r.get("compiled", False) for r in results)):
            continue
        seen.add(name)
        elapsed = time.perf_counter() - t_start
        if elapsed > meta["budget_s"]:
            results.append(dict(side="ours", mode=name, skipped=f"time budget spent ({elapsed:.0f} s)"))
            continue
        if cap and not cuda:
            results.append(dict(side="ours", mode=name, skipped="memory cap needs CUDA"))
            continue
        dtype = DTYPES[dtype_name]
        if built != (dtype_name, weights):
            unet = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            unet = our_unet(meta["config"], dtype, device, weights)
            sync(device)
            build_s, built = time.perf_counter() - t0, (dtype_name, weights)
        cond = load_file(str(a.work / f"cond_official_{dtype_name}.safetensors"))
        inputs = dict(image_latents=cond["vae_mean"], ref_latents=cond["vae_mean"] * VAE_SCALING_FACTOR,
                      clip_embeds=cond["clip_embeds"], cond_tokens=x["cond_tokens"],
                      uncond_tokens=x["uncond_tokens"], buckets=x["buckets"], face_mask=x["face_mask"],
                      noise=x["noise"])
        model = unet
        if compiled:
            torch._dynamo.reset()
            model = torch.compile(unet, backend=meta["compile_backend"])
        batch = wb or n_windows
        row = dict(side="ours", mode=name, dtype=dtype_name, guidance_rows=rows, window_batch=batch,
                   weights=weights, compiled=compiled, cap_bytes=cap, build_s=build_s, timed_steps=meta["timed_steps"])
        try:
            if cap:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)

            def run(steps: int):
                s = dataclasses.replace(settings, steps=steps, guidance_rows=rows)
                return sampler.sample(model, **inputs, settings=s, device=torch.device(device), dtype=dtype,
                                      window_batch=batch)

            t0 = time.perf_counter()
            run(meta["warm_steps"])
            sync(device)
            row["warm_s"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                row["allocated_before"] = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = run(meta["timed_steps"])
            sync(device)
            row["timed_s"] = time.perf_counter() - t0
            if cuda:
                row["peak_allocated"] = torch.cuda.max_memory_allocated()
                row["peak_reserved"] = torch.cuda.max_memory_reserved()
            row["fits"] = True
            tag = name.replace(" ", "_")
            save_file({"out": out.float().cpu().contiguous()}, str(a.work / f"out_ours_{tag}.safetensors"))
            row["out"] = f"out_ours_{tag}.safetensors"
        except torch.OutOfMemoryError as e:
            row.update(fits=False, error=str(e).splitlines()[0][:200])
        except Exception as e:  # a mode that breaks (e.g. compile) must not lose the others
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        finally:
            if cap:
                torch.cuda.set_per_process_memory_fraction(1.0)
            model = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        row["weights_bytes"] = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
        results.append(row)
        print(f"ours: {name}: {row.get('timed_s', row.get('error'))}", file=sys.stderr, flush=True)
    (a.work / "result_ours.json").write_text(json.dumps(dict(rows=results)))
    return 0


# ----------------------------------------------------------------------------------------------
# orchestration and the report
# ----------------------------------------------------------------------------------------------
def spawn(cmd: list[str], env: dict, work: Path, required: bool = True) -> bool:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        if required:
            raise SystemExit(f"failed (rc {proc.returncode}): {' '.join(cmd)}")
        print(f"FAILED (rc {proc.returncode}), going on without it: {' '.join(cmd)}", file=sys.stderr)
        return False
    print(f"  {Path(cmd[1]).name} {' '.join(cmd[2:4])}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return True


def make_inputs(work: Path, z: dict) -> None:
    save_sampler_inputs(work / "inputs.safetensors", z["frames"], z["side"], z["config"]["cross_attention_dim"],
                        CLIP_SIZE, AUDIO_TOKENS)


def run(a) -> int:
    from sonic_core import sampler
    from sonic_core.config import SAMPLER_DEFAULTS

    dry = a.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    z = sizes(dry)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    # dry run: fp32 for both (CPU fp16 / bf16 kernels are many times slower; the code path is the same)
    dtype_map = {"fp16": "fp32", "bf16": "fp32"} if dry else {}
    dtypes_run = sorted({dtype_map.get(d, d) for d in z["dtypes"]})
    settings = dict(frames_per_window=z["window"], overlap=0, shift_offset=SAMPLER_DEFAULTS.shift_offset)
    full = {k: getattr(dataclasses.replace(SAMPLER_DEFAULTS, **settings), k) for k in (
        "frames_per_window", "overlap", "shift_offset", "min_appearance_guidance", "max_appearance_guidance",
        "min_audio_guidance", "max_audio_guidance", "fps_conditioning", "i2i_strength", "audio_scale")}
    meta = dict(config=z["config"], seed=SEED, threads=torch.get_num_threads(), device=device, dtypes=dtypes_run,
                dtypes_run=dtypes_run, dtype_map=dtype_map, settings=full, warm_steps=z["warm_steps"],
                timed_steps=z["timed_steps"], clip_size=CLIP_SIZE, budget_s=a.budget_s,
                scheduler_config=json.loads(sampler.SCHEDULER_CONFIG.read_text()),
                compile_backend="eager" if dry else "inductor", compile_modes=1 if dry else 2, dry_run=dry)
    (work / "meta.json").write_text(json.dumps(meta))
    make_inputs(work, z)
    t0 = time.perf_counter()
    official = None
    if a.official_src and (a.official_src / "src" / "pipelines" / "pipeline_sonic.py").is_file():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(a.official_site or ""),) if p))
        if spawn([sys.executable, str(BENCH / "_official_driver.py"), "--official-src", str(a.official_src),
                  "--job", "device", "--work", str(work)], env, work, required=not a.keep_going):
            official = json.loads((work / "result_official.json").read_text())
        else:  # the official side broke on this machine: ours still runs, on stand-in conditioning
            write_own_cond(work, z, dtypes_run, device)
    else:
        print(f"official side skipped: no official source at {a.official_src} (bash bench/device_run.sh "
              "--prepare fetches it)", file=sys.stderr)
        write_own_cond(work, z, dtypes_run, device)
    env = dict(os.environ)
    if a.ours_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(a.ours_site), env.get("PYTHONPATH", "")]))
    spawn([sys.executable, str(Path(__file__).resolve()), "worker", "--work", str(work)], env, work)
    ours = json.loads((work / "result_ours.json").read_text())
    report = build_report(work, z, meta, official, ours, time.perf_counter() - t0, dry)
    print(report)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "device_run.md").write_text(report + "\n")
        (a.out / "device_run.json").write_text(json.dumps(dict(meta={k: v for k, v in meta.items()
                                                                   if k != "scheduler_config"},
                                                             official=official, ours=ours), indent=1))
    return 0


def write_own_cond(work: Path, z: dict, dtypes: list[str], device: str) -> None:
    """Without the official side: the conditioning from our own tiny random VAE / CLIP stand-ins."""
    g = torch.Generator().manual_seed(3)
    lat, dim = z["side"] // 8, z["config"]["cross_attention_dim"]
    for name in dtypes:
        save_file({"clip_embeds": torch.randn(1, dim, generator=g), "vae_mean": torch.randn(1, 4, lat, lat, generator=g)},
                  str(work / f"cond_official_{name}.safetensors"))


def _diff(work: Path, a: str, b: str) -> str:
    x, y = load_file(str(work / a))["out"].double(), load_file(str(work / b))["out"].double()
    d = (x - y).abs()
    return f"max {d.max().item():.3g} / mean {d.mean().item():.3g} (output max {y.abs().max().item():.3g})"


def build_report(work: Path, z: dict, meta: dict, official: dict | None, ours: dict, wall: float, dry: bool) -> str:
    steps = meta["timed_steps"]
    n_win = -(-z["frames"] // z["window"])
    flops = {r: flops_per_call(z["config"], z["side"], z["window"], r) for r in (3, 1)}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else platform.processor() or "CPU"
    lines = [f"device run{' (DRY RUN: tiny sizes on the CPU)' if dry else ''}: {gpu}, torch {torch.__version__}; "
             f"{z['side']}x{z['side']}, {z['frames']} frames ({z['frames'] / 12.5:g} s at 12.5 fps), windows of "
             f"{z['window']} -> {n_win} windows per step; {steps} timed step(s) after {meta['warm_steps']} warm-up, "
             f"extrapolated to {FULL_STEPS}; one 3-row UNet call = {flops[3] / 1e12:.2f} TFLOP; wall {wall:.0f} s",
             "",
             "| side | mode | s / step | 25 steps s | TFLOP/s | peak allocated GB | activations GB | weights GB "
             "| fits | warm-up s | vs official |",
             "|---" * 11 + "|"]
    base = {}

    def cells(r: dict) -> list[str]:
        if r.get("skipped"):
            return ["skipped: " + r["skipped"]] + [""] * 8
        if "timed_s" not in r:
            return ["-", "-", "-", "-", "-", f"{r.get('weights_bytes', 0) / GB:.2f}", str(r.get("fits", "error")),
                    "-", r.get("error", "")[:80]]
        per = r["timed_s"] / steps
        rows = r.get("guidance_rows", 3)
        tflops = flops[rows] * (3 // rows) * n_win / per / 1e12
        peak = r.get("peak_allocated")
        act = peak - r["allocated_before"] if peak is not None else None
        return [f"{per:.2f}", f"{per * FULL_STEPS:.1f}", f"{tflops:.0f}",
                "-" if peak is None else f"{peak / GB:.2f}", "-" if act is None else f"{act / GB:.2f}",
                f"{r['weights_bytes'] / GB:.2f}", str(r.get("fits", True)), f"{r['warm_s']:.1f}"]

    for r in (official or {}).get("rows", []):
        base[r["dtype"]] = r["timed_s"]
        c = cells(r)
        lines.append(f"| official | {r['dtype']} rows3 wb1 | " + " | ".join(c) + " | 1.00x |")
    for r in ours["rows"]:
        c = cells(r)
        ratio = "-"
        if r.get("timed_s") and r.get("dtype") in base and not r.get("cap_bytes"):
            ratio = f"{base[r['dtype']] / r['timed_s']:.2f}x"
        lines.append(f"| ours | {r['mode']} | " + " | ".join(c[:9]) + f" | {ratio} |")
    lines.append("")
    for r in ours["rows"]:
        ref = f"out_official_{r.get('dtype')}.safetensors"
        if r.get("out") and official and (work / ref).is_file() and r["guidance_rows"] in (1, 3):
            lines.append(f"- ours {r['mode']} vs official {r['dtype']} latents after {steps} step(s): "
                         f"{_diff(work, r['out'], ref)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, default=None, help="write device_run.md / device_run.json here")
    r.add_argument("--official-src", type=Path, default=None, help="checkout of the official Sonic code")
    r.add_argument("--official-site", type=Path, default=None, help="site folder with diffusers 0.29 etc.")
    r.add_argument("--ours-site", type=Path, default=None, help="site folder with our diffusers, if needed")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--budget-s", type=float, default=330.0, help="our side skips modes after this long")
    r.add_argument("--keep-going", action="store_true", help="run our side even if the official side fails")
    w = sub.add_parser("worker")
    w.add_argument("--work", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "worker":
        meta = json.loads((a.work / "meta.json").read_text())
        torch.set_num_threads(meta["threads"])
        return worker(a)
    return run(a)


if __name__ == "__main__":
    raise SystemExit(main())
