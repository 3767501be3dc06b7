"""fp8 UNet weights (sonic_core.lowvram) against fp16 / bf16 / fp32 on the golden case, on the CPU.

The golden case (../shared/fixtures/golden, SPEC §14): its tiny official-format UNet, recorded
inputs and noise, 3 steps; the sampler's final latents of each weight / compute dtype against the
float32 run (and float64, the round-off floor). The golden's tiny UNet amplifies any rounding
(float32 vs float64 already differ by ~8 % of the output scale), so one UNet call is measured too,
and one call of a wider SVD-layout UNet (bench_vs_official's small config, 128x128, random weights)
where rounding is not amplified. "fp8 unscaled" casts weights to float8_e4m3fn without scales, as a
plain weight-dtype cast does, for comparison.

    python bench/bench_fp8.py [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sonic_core import lowvram, sampler  # noqa: E402
from sonic_core.models.unet import build_sonic_unet  # noqa: E402


def unscaled_fp8(model: torch.nn.Module, compute: torch.dtype) -> None:
    """fp8 storage with every scale 1 (a plain cast of the weights)."""
    originals = {id(m): m.weight.detach().clone() for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))}
    lowvram.store_weights_fp8(model, compute)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lowvram.Fp8Weight):
                w = originals[id(m)].float().clamp(-lowvram.FP8_MAX, lowvram.FP8_MAX)
                m._parameters["weight"].data = w.to(lowvram.FP8)
                m.weight_scale.fill_(1.0)


VARIANTS = {  # name -> (compute dtype, weight storage)
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
    "fp8, fp32 compute": (torch.float32, "fp8"), "fp8, bf16 compute": (torch.bfloat16, "fp8"),
    "fp8, fp16 compute": (torch.float16, "fp8"), "fp8 unscaled, fp32 compute": (torch.float32, "raw"),
}


def prepare(build, variant: str):
    compute, storage = VARIANTS[variant]
    unet = build().to(compute)
    if storage == "fp8":
        lowvram.store_weights_fp8(unet, compute)
    elif storage == "raw":
        unscaled_fp8(unet, compute)
    return unet, compute


def stats(x: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (x.double() - ref.double()).abs()
    return dict(max_abs=d.max().item(), mean_abs=d.mean().item(), rel=d.max().item() / ref.abs().max().item())


def main(argv=None) -> int:
    from tests._golden import DEFAULT_GOLDEN, Golden
    from tests.test_lowvram import _one_step
    from tests.test_sampler import golden_inputs, golden_settings, golden_unet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    g = Golden(DEFAULT_GOLDEN)
    s, inputs = golden_settings(g), golden_inputs(g)
    rows = []
    ref64 = sampler.sample(golden_unet(g).double(), **{k: v.double() for k, v in inputs.items()}, settings=s,
                           dtype=torch.float64)
    ref = None
    call_ref = _one_step(golden_unet(g), inputs, s, 3, [0], torch.float32)
    from bench_vs_official import SMALL_UNET

    def small():
        torch.manual_seed(0)
        return build_sonic_unet(dict(SMALL_UNET)).eval().requires_grad_(False)

    from tests.test_lowvram import _tiny_inputs

    small_in = _tiny_inputs(frames=8, side=128, dim=SMALL_UNET["cross_attention_dim"])
    small_in["cond_tokens"] = torch.randn(8, 32, SMALL_UNET["cross_attention_dim"])
    small_in["uncond_tokens"] = torch.randn(32, SMALL_UNET["cross_attention_dim"])
    small_s = dataclasses.replace(s, frames_per_window=8)
    small_ref = _one_step(small(), small_in, small_s, 3, [0], torch.float32)
    for variant in VARIANTS:
        unet, compute = prepare(lambda: golden_unet(g), variant)
        out = sampler.sample(unet, **{k: v.to(compute) for k, v in inputs.items()}, settings=s, dtype=compute).float()
        ref = out if variant == "fp32" else ref
        call = _one_step(unet, inputs, s, 3, [0], compute).float()
        su, sc = prepare(small, variant)
        small_call = _one_step(su, small_in, small_s, 3, [0], sc).float()
        row = dict(variant=variant, weight_mb=round(lowvram.weight_bytes(unet) / 2**20, 3),
                   latents_vs_fp32=stats(out, ref), latents_vs_fp64=stats(out, ref64),
                   golden_call_vs_fp32=stats(call, call_ref), small_call_vs_fp32=stats(small_call, small_ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| weights, compute | golden latents vs fp32: max / mean abs | one golden UNet call: rel | one small-UNet "
          "call (128 px): rel |\n|---|---|---|---|")
    for r in rows:
        lv, gc_, sc_ = r["latents_vs_fp32"], r["golden_call_vs_fp32"], r["small_call_vs_fp32"]
        print(f"| {r['variant']} | {lv['max_abs']:.3g} / {lv['mean_abs']:.3g} | {gc_['rel']:.2e} | {sc_['rel']:.2e} |")
    floor = stats(ref, ref64)
    print(f"(fp32 vs fp64 floor of the golden latents: max {floor['max_abs']:.3g} / mean {floor['mean_abs']:.3g}; "
          f"latents up to {ref64.abs().max().item():.3g})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
