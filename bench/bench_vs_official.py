"""Benchmark: our Sonic UNet / sampler against the OFFICIAL implementation, speed and peak memory.

The official code (github.com/jixiaozhong/Sonic, CC BY-NC-SA) is NOT part of this repository:
fetch it yourself into a folder outside the repo and give its own Python environment
(diffusers==0.29.0, transformers==4.43.2, einops, omegaconf, safetensors, torch):

    python bench/bench_vs_official.py --official-src /path/to/Sonic \\
        --official-python /path/to/official-venv/bin/python [--part a|b|both]

Both sides get identical inputs and identical random weights (one state dict saved to a temp
.safetensors and assigned on both sides). Each measurement runs in its own fresh process, so the
peak RSS figures are comparable; the official side runs through bench/_official_driver.py, which
only imports and calls the official public classes from ``--official-src``.

(a) one UNet call: one window x 3 CFG rows, full SVD-xt Sonic UNet (random weights, float32).
(b) a short sampler run on a small UNet config: ours (``sampler.sample`` with window_batch 1 and
    auto) against the official ``SonicPipeline`` loop (tiny random VAE/CLIP, latent output; the
    conditioning it computes is handed to our side so both denoise the same thing).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sonic_core import sampler  # noqa: E402
from sonic_core.config import SAMPLER_DEFAULTS, VAE_SCALE, VAE_SCALING_FACTOR  # noqa: E402
from sonic_core.models.unet import build_sonic_unet, load_config  # noqa: E402

from _official_driver import reset_peak, rss_kib, save_sampler_inputs  # noqa: E402  (same measurement on both sides)

DRIVER = Path(__file__).resolve().parent / "_official_driver.py"
AUDIO_TOKENS = 32  # K, audio tokens per frame (audio2token context_tokens)
SMALL_UNET = {  # part (b): SVD-xt layout (2 layers per block, 4 levels), narrow channels
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [64, 128, 128, 128],
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 96,
    "layers_per_block": 2,
    "cross_attention_dim": 128,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [2, 4, 4, 4],
    "num_frames": 25,
}
CLIP_SIZE = 32  # px, side of the tiny CLIP tower's input in part (b)


# ----------------------------------------------------------------------------------------------
# Measurement helpers (same rules as the official driver)
# ----------------------------------------------------------------------------------------------
def load_ours(config: dict, weights: Path):
    """Our SonicUNet built on meta and assigned from the shared file (same path as the driver)."""
    with torch.device("meta"):
        unet = build_sonic_unet(config)
    state = load_file(str(weights))
    missing, unexpected = unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SystemExit(f"our UNet keys differ: {len(missing)} missing {missing[:10]}, "
                         f"{len(unexpected)} unexpected {unexpected[:10]}")
    del state
    touch(unet)
    return unet.eval().requires_grad_(False)


def touch(module: torch.nn.Module) -> None:
    """Read every weight once: the memory-mapped file pages become resident before the baseline."""
    with torch.no_grad():
        for t in module.state_dict().values():
            t.sum()


# ----------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process)
# ----------------------------------------------------------------------------------------------
def worker_weights(work: Path, meta: dict) -> dict:
    torch.manual_seed(meta["seed"])
    unet = build_sonic_unet(meta["config"])  # random init, float32
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(work / "unet.safetensors"))
    return dict(params=sum(v.numel() for v in state.values()))


def worker_unet(work: Path, meta: dict) -> dict:
    unet = load_ours(meta["config"], work / "unet.safetensors")
    x = load_file(str(work / "inputs.safetensors"))
    gc.collect()
    rss0, ok = rss_kib("VmRSS"), reset_peak()
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(meta["repeat"]):
            t0, c0 = time.perf_counter(), time.process_time()
            out = unet(x["sample"], x["timestep"], x["clip"], x["ids"], audio_tokens=x["audio"],
                       face_mask=x["face_mask"], audio_scale=meta["audio_scale"])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    save_file({"out": out.contiguous()}, str(work / "out_ours.safetensors"))
    return dict(times=times, cpu=cpu, rss_before_kib=rss0, hwm_kib=rss_kib("VmHWM") if ok else -1)


def worker_sampler(work: Path, meta: dict, window_batch: int) -> dict:
    unet = load_ours(meta["config"], work / "unet.safetensors")
    x = load_file(str(work / "inputs.safetensors"))
    cond = load_file(str(work / "cond_official.safetensors"))  # what the official pipeline encoded
    settings = dataclasses.replace(SAMPLER_DEFAULTS, **meta["settings"])
    inputs = dict(image_latents=cond["vae_mean"], ref_latents=cond["vae_mean"] * VAE_SCALING_FACTOR,
                  clip_embeds=cond["clip_embeds"], cond_tokens=x["cond_tokens"],
                  uncond_tokens=x["uncond_tokens"], buckets=x["buckets"], face_mask=x["face_mask"],
                  noise=x["noise"])
    f, h, w = x["noise"].shape[0], x["noise"].shape[-2], x["noise"].shape[-1]
    n_windows = sampler.window_count(f, settings)
    batch = window_batch or sampler.auto_window_batch(None, h, w, settings.frames_per_window,
                                                      torch.float32, n_windows)
    gc.collect()
    rss0, ok = rss_kib("VmRSS"), reset_peak()
    times, cpu = [], []
    for _ in range(meta["repeat"]):
        t0, c0 = time.perf_counter(), time.process_time()
        out = sampler.sample(unet, **inputs, settings=settings, device=torch.device("cpu"),
                             dtype=torch.float32, window_batch=batch)  # [F, 4, h, w]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    save_file({"out": out.contiguous()}, str(work / f"out_ours_wb{window_batch}.safetensors"))
    return dict(times=times, cpu=cpu, window_batch=batch, rss_before_kib=rss0,
                hwm_kib=rss_kib("VmHWM") if ok else -1)


def run_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["weights", "unet", "sampler"])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--window-batch", type=int, default=1)
    a = p.parse_args(argv)
    meta = json.loads((a.work / "meta.json").read_text())
    torch.set_num_threads(meta["threads"])
    if a.worker == "weights":
        res = worker_weights(a.work, meta)
    elif a.worker == "unet":
        res = worker_unet(a.work, meta)
    else:
        res = worker_sampler(a.work, meta, a.window_batch)
    import diffusers
    import transformers

    res.update(maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, torch=torch.__version__,
               diffusers=diffusers.__version__, transformers=transformers.__version__)
    (a.work / f"result_{a.worker}.json").write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------
def spawn(cmd: list[str], work: Path, result: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(cmd)}")
    res = json.loads((work / result).read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def ours(work: Path, worker: str, *extra: str) -> dict:
    return spawn([sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--work", str(work),
                  *extra], work, f"result_{worker}.json")


def official(a, work: Path, job: str) -> dict:
    return spawn([str(a.official_python), str(DRIVER), "--official-src", str(a.official_src), "--job", job,
                  "--work", str(work)], work, "result_official.json")


def merge(runs: list[dict]) -> dict:
    """Several fresh-process rounds of one side: all timings, memory of the round with the top peak."""
    res = dict(max(runs, key=lambda r: r["hwm_kib"]))
    res["times"] = [t for r in runs for t in r["times"]]
    res["cpu"] = [t for r in runs for t in r["cpu"]]
    res["maxrss_kib"] = max(r["maxrss_kib"] for r in runs)
    return res


def alternate(rounds: int, sides: dict) -> dict:
    """Run every side once per round, in turn (fair under a shared CPU); name -> merged result."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            runs[name].append(fn())
    return {name: merge(r) for name, r in runs.items()}


def mib(kib: int) -> float:
    return kib / 1024


def row(name: str, res: dict, base: dict | None) -> str:
    best = min(res["times"])
    peak, growth = mib(res["hwm_kib"]), mib(res["hwm_kib"] - res["rss_before_kib"])
    runs = " / ".join(f"{t:.1f}" for t in res["times"])
    line = (f"| {name} | {best:.2f} | {min(res['cpu']):.2f} | {runs} | "
            f"{mib(res['rss_before_kib']):.0f} | {peak:.0f} | {growth:.0f} | {mib(res['maxrss_kib']):.0f} |")
    if base is not None:
        bg = mib(base["hwm_kib"] - base["rss_before_kib"])
        line += (f" {min(base['times']) / best:.2f} | {mib(base['hwm_kib']) / peak:.2f} | "
                 f"{bg / growth:.2f} | {mib(base['maxrss_kib']) / mib(res['maxrss_kib']):.2f} |")
    else:
        line += " - | - | - | - |"
    return line


HEADER = ("| side | best s | best CPU s | all runs s | RSS before MiB | peak RSS MiB | peak - before MiB "
          "| ru_maxrss MiB | time official/ours | peak official/ours | growth official/ours "
          "| maxrss official/ours |\n"
          + "|---" * 12 + "|")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def diff_line(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs().max().item()
    top = b.abs().max().item()
    same = (a == b).double().mean().item() * 100
    return f"max abs diff {d:.3e} (output max abs {top:.3e}, rel {d / top:.2e}; {same:.1f}% bit-equal)"


def part_a(a, work: Path) -> None:
    config = load_config(None)
    meta = dict(config=config, seed=0, threads=a.threads, repeat=a.repeat, audio_scale=1.0)
    (work / "meta.json").write_text(json.dumps(meta))
    wres = ours(work, "weights")
    lat, w, rows = a.size // VAE_SCALE, a.window, 3  # 3 CFG rows = one window
    g = torch.Generator().manual_seed(1)
    dim = config["cross_attention_dim"]
    save_file({
        "sample": torch.randn(rows, w, 8, lat, lat, generator=g),  # [3, W, 8, h, w]
        "timestep": torch.tensor(0.25 * 4.0, dtype=torch.float32),  # 0.25 * ln(sigma ~ 55)
        "clip": torch.cat([torch.zeros(1, 1, dim), torch.randn(2, 1, dim, generator=g)]),  # [3, 1, D]
        "ids": torch.tensor([[12.5, 20.0, 22.0]] * rows),  # [3, 3] fps, buckets
        "audio": torch.randn(rows, w, AUDIO_TOKENS, dim, generator=g),  # [3, W, K, D]
        "face_mask": (torch.rand(1, 1, a.size, a.size, generator=g) > 0.5).float(),  # [1, 1, H, W]
    }, str(work / "inputs.safetensors"))
    res = alternate(a.rounds, {"official": lambda: official(a, work, "unet"),
                               "ours": lambda: ours(work, "unet")})
    off, our = res["official"], res["ours"]
    diff = diff_line(load_file(str(work / "out_ours.safetensors"))["out"],
                     load_file(str(work / "out_official.safetensors"))["out"])
    print(f"\n(a) one UNet call: full SVD-xt Sonic UNet ({wres['params'] / 1e9:.3f} B parameters, "
          f"{wres['params'] * 4 / 2**30:.2f} GiB float32), random weights, {a.size}x{a.size} "
          f"({lat}x{lat} latent), W={w} frames x 3 CFG rows, best of {a.repeat} calls x {a.rounds} "
          f"alternating fresh processes per side; load average {load()}")
    print(HEADER)
    print(row(f"official (diffusers {off['diffusers']})", off, None))
    print(row(f"ours (diffusers {our['diffusers']})", our, off))
    print(f"ours vs official output: {diff}")


def part_b(a, work: Path) -> None:
    settings = dict(steps=a.b_steps, frames_per_window=a.b_window, overlap=0,
                    shift_offset=SAMPLER_DEFAULTS.shift_offset)
    full = {k: getattr(dataclasses.replace(SAMPLER_DEFAULTS, **settings), k) for k in (
        "steps", "frames_per_window", "overlap", "shift_offset", "min_appearance_guidance",
        "max_appearance_guidance", "min_audio_guidance", "max_audio_guidance", "fps_conditioning",
        "i2i_strength", "audio_scale")}
    sched = json.loads(sampler.SCHEDULER_CONFIG.read_text())
    meta = dict(config=SMALL_UNET, seed=0, threads=a.threads, repeat=a.b_repeat, settings=full,
                scheduler_config=sched, clip_size=CLIP_SIZE)
    (work / "meta.json").write_text(json.dumps(meta))
    wres = ours(work, "weights")
    f, s, dim = a.b_frames, a.b_size, SMALL_UNET["cross_attention_dim"]
    save_sampler_inputs(work / "inputs.safetensors", f, s, dim, CLIP_SIZE, AUDIO_TOKENS)
    off = official(a, work, "sampler")  # first: it writes the conditioning our side reuses
    res = alternate(a.rounds, {"ours1": lambda: ours(work, "sampler", "--window-batch", "1"),
                               "auto": lambda: ours(work, "sampler", "--window-batch", "0"),
                               "official": lambda: official(a, work, "sampler")})
    one, auto, off = res["ours1"], res["auto"], merge([off, res["official"]])
    ref = load_file(str(work / "out_official.safetensors"))["out"]
    n_win = sampler.window_count(f, dataclasses.replace(SAMPLER_DEFAULTS, **settings))
    print(f"\n(b) sampler: small Sonic UNet ({wres['params'] / 1e6:.1f} M parameters, SVD-xt layout, "
          f"channels {SMALL_UNET['block_out_channels']}), {s}x{s} ({s // 8}x{s // 8} latent), "
          f"{f} frames, windows of {a.b_window}, overlap 0, shift {settings['shift_offset']}, "
          f"{a.b_steps} steps = {n_win} windows/step, best of {a.b_repeat} runs x {a.rounds} alternating "
          f"processes per variant; the official time includes its tiny VAE/CLIP encode "
          f"({off['encode_s']:.3f} s); load average {load()}")
    print(HEADER)
    print(row("official SonicPipeline", off, None))
    print(row("ours, window_batch 1", one, off))
    print(row(f"ours, auto ({auto['window_batch']} per call)", auto, off))
    for name, wb in (("window_batch 1", 1), ("auto", 0)):
        out = load_file(str(work / f"out_ours_wb{wb}.safetensors"))["out"]
        print(f"ours {name} vs official latents: {diff_line(out, ref)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return run_worker(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", type=Path,
                   help="checkout of github.com/jixiaozhong/Sonic (outside the repo)")
    p.add_argument("--official-python", type=Path,
                   help="python of an env with diffusers 0.29 / transformers 4.43")
    p.add_argument("--part", default="both", choices=["a", "b", "both"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads on both sides")
    p.add_argument("--size", type=int, default=256, help="(a) image side in pixels")
    p.add_argument("--window", type=int, default=8, help="(a) frames W of the window")
    p.add_argument("--repeat", type=int, default=3,
                   help="(a) UNet calls per process, best kept (first included)")
    p.add_argument("--b-size", type=int, default=128, help="(b) image side in pixels")
    p.add_argument("--b-frames", type=int, default=16, help="(b) frames F")
    p.add_argument("--b-window", type=int, default=8, help="(b) frames per window W")
    p.add_argument("--b-steps", type=int, default=2, help="(b) denoising steps")
    p.add_argument("--b-repeat", type=int, default=3, help="(b) sampler runs per variant, best kept")
    p.add_argument("--rounds", type=int, default=2, help="alternating fresh processes per side")
    p.add_argument("--keep", type=Path, default=None, help="keep the temp files in this folder")
    a = p.parse_args(argv)
    src_ok = (a.official_src is not None
              and (a.official_src / "src" / "pipelines" / "pipeline_sonic.py").is_file())
    py_ok = a.official_python is not None and a.official_python.is_file()
    if not (src_ok and py_ok):
        print("bench_vs_official needs the official Sonic code and its Python, which are not part of this "
              "repository:\n  --official-src DIR     a checkout of https://github.com/jixiaozhong/Sonic "
              f"(got {a.official_src}{'' if src_ok else ': missing src/pipelines/pipeline_sonic.py'})\n"
              "  --official-python PY   python of a venv with diffusers==0.29.0 transformers==4.43.2 "
              f"einops omegaconf safetensors torch "
              f"(got {a.official_python}{'' if py_ok else ': not a file'})",
              file=sys.stderr)
        return 2
    print(f"CPU {platform.processor() or platform.machine()}, {a.threads} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="sonic_vs_official_") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if a.part in ("a", "both"):
            part_a(a, work)
        if a.part in ("b", "both"):
            part_b(a, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
