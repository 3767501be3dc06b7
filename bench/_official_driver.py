"""Worker for bench/bench_vs_official.py: runs the OFFICIAL Sonic code through its public classes.

Run by the official code's own Python (diffusers 0.29 / transformers 4.43), never imported by the
project. It contains no official code: it adds ``--official-src`` (a checkout of
github.com/jixiaozhong/Sonic, fetched outside this repository) to ``sys.path`` and calls its
``UNetSpatioTemporalConditionModel``, ``add_ip_adapters`` and ``SonicPipeline``. Tensors and
weights come from the temp folder the bench script writes; results go back as JSON + safetensors.

    <official python> bench/_official_driver.py --official-src DIR --job unet|sampler|device --work DIR

``fill_random_`` (also used by our side, bench/_device_bench.py) gives both implementations the same
random weights without a weight file: every state-dict entry is drawn from its own generator,
seeded by the entry's name, so equal keys get equal values in any process on the same device.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    """Reset the peak-RSS mark (VmHWM) so it covers only what runs next (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


NORM_SPREAD = 0.1  # 1-D weights (norm scales) are 1 +- this; other 1-D entries (biases) are +- this / 5
SEED_STRIDE = 1_000_003  # prime between the seeds of two runs' entries


def fill_random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every floating state-dict entry of ``module`` drawn from a generator seeded by its key, in place:
    weights U(-1, 1) / sqrt(fan_in) (PyTorch's default scale), norm scales 1 +- 0.1, biases +- 0.02.
    Values depend only on (seed, key, shape, device type), never on module construction order."""
    with torch.no_grad():
        for key, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            gen = torch.Generator(device=t.device).manual_seed(seed * SEED_STRIDE + zlib.crc32(key.encode()))
            u = torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float32) * 2 - 1
            if t.ndim >= 2:
                u /= (t[0].numel()) ** 0.5
            elif key.endswith("weight"):
                u = 1 + NORM_SPREAD * u
            else:
                u *= NORM_SPREAD / 5
            t.data.copy_(u)
    return module


def save_sampler_inputs(path, frames: int, side: int, dim: int, clip_size: int, tokens: int, seed: int = 2) -> None:
    """The sampler inputs both sides read (bench_vs_official part b, _device_bench): a random
    portrait, CLIP image, face mask, audio tokens, motion buckets and noise for ``frames`` frames."""
    from safetensors.torch import save_file

    lat = side // 8  # VAE scale
    g = torch.Generator().manual_seed(seed)
    save_file({
        "ref_image": torch.rand(1, 3, side, side, generator=g) * 2 - 1,  # [1, 3, H, W] in [-1, 1]
        "clip_image": torch.randn(1, 3, clip_size, clip_size, generator=g),  # [1, 3, c, c]
        "face_mask": (torch.rand(1, 1, side, side, generator=g) > 0.5).float(),  # [1, 1, H, W]
        "cond_tokens": torch.randn(frames, tokens, dim, generator=g),  # [F, K, D]
        "uncond_tokens": torch.randn(tokens, dim, generator=g),  # [K, D]
        "buckets": 16 + torch.rand(frames, 2, generator=g) * 8,  # [F, 2]
        "noise": torch.randn(frames, 4, lat, lat, generator=g),  # [F, 4, h, w]
    }, str(path))


def _meta_official_unet(config: dict, scale: float):
    """Official UNet + official IP-adapter processors on the meta device (no memory, no weights)."""
    from src.models.base.unet_spatio_temporal_condition import (  # official, from --official-src
        UNetSpatioTemporalConditionModel,
        add_ip_adapters,
    )

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**cfg)
        add_ip_adapters(unet, [32], [scale])
    return unet


def random_official_unet(config: dict, dtype: torch.dtype, device: str, seed: int, scale: float):
    """Official UNet + IP-adapter processors with ``fill_random_`` weights, built without a float32 copy."""
    unet = torch.nn.Module.to(_meta_official_unet(config, scale), "meta", dtype).to_empty(device=device)
    return fill_random_(unet, seed).eval().requires_grad_(False)


def build_unet(config: dict, weights: Path, scale: float):
    """Official UNet + official IP-adapter processors, weights assigned from the shared file."""
    unet = _meta_official_unet(config, scale)
    state = load_file(str(weights))
    missing, unexpected = unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SystemExit(f"official UNet keys differ: {len(missing)} missing {missing[:10]}, "
                         f"{len(unexpected)} unexpected {unexpected[:10]}")
    del state
    with torch.no_grad():  # read every weight once: mapped file pages resident before the baseline
        for t in unet.state_dict().values():
            t.sum()
    return unet.eval().requires_grad_(False)


def job_unet(work: Path, meta: dict) -> dict:
    unet = build_unet(meta["config"], work / "unet.safetensors", meta["audio_scale"])
    x = load_file(str(work / "inputs.safetensors"))
    w = x["sample"].shape[1]
    # official call convention (its pipeline): per-frame CLIP rows and a list of per-frame audio rows
    ehs = (x["clip"].repeat_interleave(w, dim=0), [x["audio"].flatten(0, 1)])  # [B*W,1,D], [[B*W,K,D]]
    kwargs = {"ip_adapter_masks": [x["face_mask"]]}
    gc.collect()
    rss0, ok = rss_kib("VmRSS"), reset_peak()
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(meta["repeat"]):
            t0, c0 = time.perf_counter(), time.process_time()
            out = unet(x["sample"], x["timestep"], encoder_hidden_states=ehs, added_time_ids=x["ids"],
                       cross_attention_kwargs=kwargs, return_dict=False)[0]
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    save_file({"out": out.contiguous()}, str(work / "out_official.safetensors"))
    return dict(times=times, cpu=cpu, rss_before_kib=rss0, hwm_kib=rss_kib("VmHWM") if ok else -1)


def tiny_vae_and_clip(dim: int, clip_size: int, seed: int):
    """Small random temporal VAE (8x downscale) and CLIP vision tower (projection = ``dim``)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                       down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=clip_size, patch_size=8, projection_dim=dim))
    return vae.eval().requires_grad_(False), clip.eval().requires_grad_(False)


def job_sampler(work: Path, meta: dict) -> dict:
    from diffusers import EulerDiscreteScheduler
    from src.pipelines.pipeline_sonic import SonicPipeline  # official, from --official-src

    s = meta["settings"]
    unet = build_unet(meta["config"], work / "unet.safetensors", s["audio_scale"])
    vae, clip = tiny_vae_and_clip(meta["config"]["cross_attention_dim"], meta["clip_size"], meta["seed"])
    sched = EulerDiscreteScheduler.from_config(meta["scheduler_config"])
    pipe = SonicPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    x = load_file(str(work / "inputs.safetensors"))
    f = x["noise"].shape[0]
    with torch.no_grad():  # the conditioning the pipeline computes inside, for our side to reuse
        t0 = time.perf_counter()
        clip_embeds = clip(x["clip_image"]).image_embeds  # [1, D]
        ref_mean = vae.encode(x["ref_image"]).latent_dist.mean  # [1, 4, h, w]
        encode_s = time.perf_counter() - t0
    save_file({"clip_embeds": clip_embeds.contiguous(), "vae_mean": ref_mean.contiguous()},
              str(work / "cond_official.safetensors"))
    gc.collect()
    rss0, ok = rss_kib("VmRSS"), reset_peak()
    times, cpu = [], []
    for _ in range(meta["repeat"]):
        t0, c0 = time.perf_counter(), time.process_time()
        out = pipe(
            x["ref_image"], x["clip_image"], x["face_mask"],
            list(x["cond_tokens"]), [x["uncond_tokens"]] * f, list(x["buckets"]),
            height=x["ref_image"].shape[-2], width=x["ref_image"].shape[-1], num_frames=f,
            num_inference_steps=s["steps"], min_guidance_scale1=s["min_appearance_guidance"],
            max_guidance_scale1=s["max_appearance_guidance"], min_guidance_scale2=s["min_audio_guidance"],
            max_guidance_scale2=s["max_audio_guidance"], fps=s["fps_conditioning"],
            motion_bucket_scale=1.0, noise_aug_strength=0.0, latents=x["noise"].unsqueeze(0),
            output_type="latent", overlap=s["overlap"], shift_offset=s["shift_offset"],
            frames_per_batch=s["frames_per_window"], i2i_noise_strength=s["i2i_strength"],
        ).frames  # [1, F, 4, h, w]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    save_file({"out": out[0].contiguous()}, str(work / "out_official.safetensors"))
    return dict(times=times, cpu=cpu, encode_s=encode_s, rss_before_kib=rss0,
                hwm_kib=rss_kib("VmHWM") if ok else -1)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def job_device(work: Path, meta: dict) -> dict:
    """The official SonicPipeline at the device-run size, per dtype: a warm-up run, then a timed one;
    peak memory from CUDA's allocator. Writes its conditioning and latents for our side to compare."""
    from diffusers import EulerDiscreteScheduler
    from src.pipelines.pipeline_sonic import SonicPipeline  # official, from --official-src

    s, device = meta["settings"], meta["device"]
    x = load_file(str(work / "inputs.safetensors"))
    f = x["noise"].shape[0]
    rows = []
    for name in meta["dtypes"]:
        dtype = DTYPES[name]
        t0 = time.perf_counter()
        unet = random_official_unet(meta["config"], dtype, device, meta["seed"], s["audio_scale"])
        vae, clip = tiny_vae_and_clip(meta["config"]["cross_attention_dim"], meta["clip_size"], meta["seed"])
        vae, clip = vae.to(device, dtype), clip.to(device, dtype)
        sched = EulerDiscreteScheduler.from_config(meta["scheduler_config"])
        pipe = SonicPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        build_s = time.perf_counter() - t0
        with torch.no_grad():  # the conditioning the pipeline computes inside, for our side to reuse
            clip_embeds = clip(x["clip_image"].to(device, dtype)).image_embeds.float().cpu()  # [1, D]
            ref_mean = vae.encode(x["ref_image"].to(device, dtype)).latent_dist.mean.float().cpu()  # [1, 4, h, w]
        save_file({"clip_embeds": clip_embeds.contiguous(), "vae_mean": ref_mean.contiguous()},
                  str(work / f"cond_official_{name}.safetensors"))

        def run(steps: int):
            return pipe(
                x["ref_image"], x["clip_image"], x["face_mask"],
                list(x["cond_tokens"]), [x["uncond_tokens"]] * f, list(x["buckets"]),
                height=x["ref_image"].shape[-2], width=x["ref_image"].shape[-1], num_frames=f,
                num_inference_steps=steps, min_guidance_scale1=s["min_appearance_guidance"],
                max_guidance_scale1=s["max_appearance_guidance"], min_guidance_scale2=s["min_audio_guidance"],
                max_guidance_scale2=s["max_audio_guidance"], fps=s["fps_conditioning"],
                motion_bucket_scale=1.0, noise_aug_strength=0.0, latents=x["noise"].unsqueeze(0).to(device, dtype),
                output_type="latent", overlap=s["overlap"], shift_offset=s["shift_offset"],
                frames_per_batch=s["frames_per_window"], i2i_noise_strength=s["i2i_strength"],
            ).frames  # [1, F, 4, h, w]

        with torch.no_grad():
            t0 = time.perf_counter()
            run(meta["warm_steps"])
            sync(device)
            warm_s = time.perf_counter() - t0
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = run(meta["timed_steps"])
            sync(device)
            timed_s = time.perf_counter() - t0
        save_file({"out": out[0].float().cpu().contiguous()}, str(work / f"out_official_{name}.safetensors"))
        rows.append(dict(side="official", dtype=name, build_s=build_s, warm_s=warm_s, timed_s=timed_s,
                         timed_steps=meta["timed_steps"],
                         weights_bytes=sum(t.numel() * t.element_size() for t in unet.state_dict().values()),
                         peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                         peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                         allocated_before=before if cuda else None))
        del pipe, unet, vae, clip, out
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return dict(rows=rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--official-src", required=True, type=Path)
    p.add_argument("--job", required=True, choices=["unet", "sampler", "device"])
    p.add_argument("--work", required=True, type=Path)
    a = p.parse_args()
    sys.path.insert(0, str(a.official_src.resolve()))
    meta = json.loads((a.work / "meta.json").read_text())
    torch.set_num_threads(meta["threads"])
    res = {"unet": job_unet, "sampler": job_sampler, "device": job_device}[a.job](a.work, meta)
    import diffusers
    import transformers

    res.update(maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, torch=torch.__version__,
               diffusers=diffusers.__version__, transformers=transformers.__version__,
               threads=torch.get_num_threads())
    (a.work / "result_official.json").write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
