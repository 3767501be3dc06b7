"""Low-VRAM modes (issue 15): guidance rows 1 == 3, SDPA on every attention path, fp8 weight
storage, chunk sizes planned from free memory, and the meta-device memory counter of the bench."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sonic_core import lowvram, sampler
from sonic_core.config import SAMPLER_DEFAULTS
from sonic_core.models.unet import build_sonic_unet
from sonic_core.selftest import TINY_UNET
from tests._golden import NOISE_FACTOR, assert_same_math, rel_err
from tests.test_sampler import fewest_steps, golden_inputs, golden_settings, golden_unet

BENCH = Path(__file__).resolve().parent.parent / "bench"
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sonic_unet(dict(TINY_UNET)).eval().requires_grad_(False)


def _tiny_inputs(frames: int, side: int, dim: int, seed: int = 1) -> dict:
    """The sampler's inputs for a random clip (what the selftest's models take)."""
    g = torch.Generator().manual_seed(seed)
    lat = side // 8
    return dict(
        image_latents=torch.randn(1, 4, lat, lat, generator=g),
        ref_latents=torch.randn(1, 4, lat, lat, generator=g) * 0.18215,
        clip_embeds=torch.randn(1, dim, generator=g),
        cond_tokens=torch.randn(frames, 4, dim, generator=g),
        uncond_tokens=torch.randn(4, dim, generator=g),
        buckets=16 + torch.rand(frames, 2, generator=g) * 8,
        face_mask=(torch.rand(1, 1, side, side, generator=g) > 0.5).float(),
        noise=torch.randn(frames, 4, lat, lat, generator=g),
    )


def _one_step(unet, inputs: dict, settings, rows: int, wins: list[int], dtype) -> torch.Tensor:
    """``_guided_velocity`` of the windows starting at ``wins`` (sigma_max latents)."""
    x = {k: v.to(dtype) for k, v in inputs.items()}
    noise = x["noise"].reshape(-1, *x["noise"].shape[-3:])  # [F,4,h,w]
    f, w = noise.shape[0], settings.frames_per_window
    latents = x["ref_latents"] + noise * 700.0  # [F,4,h,w]
    chunk = [[(s + j) % f for j in range(w)] for s in wins]
    g1, g2 = torch.tensor(2.0, dtype=dtype), torch.tensor(7.5, dtype=dtype)
    with torch.no_grad():
        return sampler._guided_velocity(
            unet, latents, chunk, torch.tensor(1.6), torch.tensor(700.0), x["image_latents"],
            x["clip_embeds"].reshape(1, 1, -1), x["cond_tokens"], x["uncond_tokens"], x["buckets"],
            x["face_mask"], g1, g2, dataclasses.replace(settings, guidance_rows=rows))  # [nb,W,4,h,w]


def _rows_agree(unet, inputs, settings, wins) -> None:
    """Rows 1 == rows 3 for one guided step: float64 to 1e-9, float32 within same_math_tol of the
    float32 round-off floor measured on the same inputs (float32 vs float64 of rows 3)."""
    u64 = unet.double()
    ref64 = _one_step(u64, inputs, settings, 3, wins, torch.float64)
    one64 = _one_step(u64, inputs, settings, 1, wins, torch.float64)
    assert rel_err(one64, ref64) < 1e-9, f"float64 rows 1 vs 3: {rel_err(one64, ref64):.2e}"
    u32 = unet.float()
    ref = _one_step(u32, inputs, settings, 3, wins, torch.float32)
    one = _one_step(u32, inputs, settings, 1, wins, torch.float32)
    floor = rel_err(ref, ref64)
    assert_same_math(one, ref, f"rows 1 vs rows 3, windows {wins}", floor=floor)


# ----------------------------------------------------------------------------------------------
# guidance rows 1 == 3
# ----------------------------------------------------------------------------------------------
def test_rows1_equals_rows3_one_step_golden(golden):
    _rows_agree(golden_unet(golden), golden_inputs(golden), golden_settings(golden), [0, 3])  # 2 windows a call


def test_rows1_equals_rows3_sampler_golden(golden):
    """The sampler on the golden case, within NOISE_FACTOR x the case's own float32 round-off floor
    (its tiny UNet amplifies rounding; float64 equality is checked per step above)."""
    s = golden_settings(golden)
    s = dataclasses.replace(s, steps=fewest_steps(s))  # one step (at the case's i2i_strength): every window

    def run(dtype, rows, wb):
        inputs = {k: v.to(dtype) for k, v in golden_inputs(golden).items()}
        return sampler.sample(golden_unet(golden).to(dtype), **inputs, dtype=dtype, window_batch=wb,
                              settings=dataclasses.replace(s, guidance_rows=rows))

    ref, one = run(torch.float32, 3, 1), run(torch.float32, 1, 2)
    floor = rel_err(ref, run(torch.float64, 3, 1))
    err = rel_err(one, ref)
    assert err <= NOISE_FACTOR * floor, f"rows 1 x 2 windows vs rows 3: {err:.2e}, floor {floor:.2e}"


def test_rows1_equals_rows3_selftest_models():
    """The selftest's tiny architecture with random weights (no ../shared needed)."""
    settings = dataclasses.replace(SAMPLER_DEFAULTS, frames_per_window=4)
    inputs = _tiny_inputs(frames=8, side=64, dim=TINY_UNET["cross_attention_dim"])
    _rows_agree(_tiny_unet(), inputs, settings, [0, 4])


def test_rows1_runs_three_calls_of_one_row_per_window():
    unet = _tiny_unet()
    calls = []
    hook = unet.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape[:2])))
    settings = dataclasses.replace(SAMPLER_DEFAULTS, frames_per_window=8)
    inputs = _tiny_inputs(frames=12, side=64, dim=TINY_UNET["cross_attention_dim"])
    _one_step(unet, inputs, settings, 1, [0, 8], torch.float32)
    assert calls == [(2, 8)] * 3  # 2 windows x 1 row, three times
    calls.clear()
    _one_step(unet, inputs, settings, 3, [0, 8], torch.float32)
    assert calls == [(6, 8)]
    hook.remove()
    with pytest.raises(ValueError, match="guidance_rows=2"):
        sampler.validate(dataclasses.replace(settings, guidance_rows=2), 12)


# ----------------------------------------------------------------------------------------------
# every attention path runs F.scaled_dot_product_attention (a fused kernel, no score matrix)
# ----------------------------------------------------------------------------------------------
class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = None
        self.ops: list[tuple[str | None, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((self.where, func.__name__))
        return func(*args, **(kwargs or {}))


def test_every_attention_path_uses_sdpa():
    from diffusers.models.attention_processor import Attention

    from sonic_core.models.unet import SonicAudioAttnProcessor

    unet = _tiny_unet()
    attns = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    audio = {n for n, m in attns.items() if isinstance(m.processor, SonicAudioAttnProcessor)}
    assert audio and any(".temporal_transformer_blocks." in n for n in audio)
    log = _OpLog()
    hooks = []
    for name, m in attns.items():
        hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: setattr(log, "where", name)))
        hooks.append(m.register_forward_hook(lambda m, a, o: setattr(log, "where", None)))
    rows, w, lat, dim = 3, 8, 8, TINY_UNET["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, w, 8, lat, lat, generator=g)
    clip = torch.randn(rows, 2, dim, generator=g)  # two CLIP tokens: the CLIP branch attends too
    tokens = torch.randn(rows, w, 4, dim, generator=g)
    ids = torch.tensor([[12.5, 20.0, 22.0]] * rows)
    mask = (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float()
    with log, torch.no_grad():
        unet(sample, torch.tensor(1.0), clip, ids, audio_tokens=tokens, face_mask=mask)
    for h in hooks:
        h.remove()
    names = {op for _, op in log.ops}
    manual = sorted(op for op in names if "softmax" in op)  # every unfused attention has a softmax
    assert not manual, f"a manual softmax(QK^T) path ran: {manual}"
    sdpa = [(where, op) for where, op in log.ops if "scaled_dot_product" in op]
    assert sdpa and all("math" not in op for _, op in sdpa), sorted({op for _, op in sdpa})
    per_layer = {n: sum(1 for where, _ in sdpa if where == n) for n in attns}
    for name, count in per_layer.items():
        # self-attention: 1; audio cross-attention: CLIP branch + audio branch, spatial and temporal
        assert count == (2 if name in audio else 1), f"{name}: {count} SDPA calls"


def test_single_token_context_needs_no_attention():
    """One CLIP token: softmax over one key is exactly 1, so the branch is to_v(context) (no kernel)."""
    from sonic_core.models.unet import _attend

    attn = next(m for n, m in _tiny_unet().named_modules() if n.endswith("attn2"))
    q = torch.randn(2, 5, attn.to_q.out_features)
    ctx = torch.randn(2, 1, attn.to_k.in_features)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, 5, attn.heads, -1).transpose(1, 2), attn.to_k(ctx).view(2, 1, attn.heads, -1).transpose(1, 2),
        attn.to_v(ctx).view(2, 1, attn.heads, -1).transpose(1, 2)).transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(_attend(attn, q, attn.to_k, attn.to_v, ctx), ref)


# ----------------------------------------------------------------------------------------------
# fp8 weight storage
# ----------------------------------------------------------------------------------------------
def test_fp8_weights_are_float8_in_memory_and_run():
    unet = _tiny_unet()
    keys = set(unet.state_dict())
    before = lowvram.weight_bytes(unet)
    info = lowvram.store_weights_fp8(unet, torch.float32)
    assert lowvram.is_fp8(unet) and info["layers"] > 100
    convs = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
    for name, m in unet.named_modules():
        if isinstance(m, convs):
            assert m._parameters["weight"].dtype == torch.float8_e4m3fn, name
            assert m.weight.dtype == torch.float32  # upcast on access
    assert set(unet.state_dict()) == keys  # checkpoint keys unchanged (the scales are not saved)
    after = lowvram.weight_bytes(unet)
    assert after < 0.4 * before  # fp32 -> fp8 plus per-channel scales, biases and norms
    stored = sum(p.numel() for p in unet.parameters() if p.dtype == torch.float8_e4m3fn)
    assert stored > 0.95 * sum(p.numel() for p in unet.parameters())
    settings = dataclasses.replace(SAMPLER_DEFAULTS, frames_per_window=8)
    inputs = _tiny_inputs(frames=8, side=64, dim=TINY_UNET["cross_attention_dim"])
    assert torch.isfinite(_one_step(unet, inputs, settings, 3, [0], torch.float32)).all()
    # accuracy on a UNet whose bottom level is not 1x1 (the 4-level tiny one amplifies any rounding:
    # bf16 is already 11 % off there): one raw call, fp8 (3 mantissa bits) ~10 %, bf16 ~2 %
    from tests.test_sampler import TINY_UNET as TWO_LEVELS

    torch.manual_seed(0)
    two = build_sonic_unet(dict(TWO_LEVELS)).eval().requires_grad_(False)
    two8 = build_sonic_unet(dict(TWO_LEVELS)).eval().requires_grad_(False)
    two8.load_state_dict(two.state_dict())
    lowvram.store_weights_fp8(two8, torch.float32)
    g = torch.Generator().manual_seed(0)
    dim = TWO_LEVELS["cross_attention_dim"]
    args = (torch.randn(3, 8, 8, 8, 8, generator=g), torch.tensor(1.0), torch.randn(3, 1, dim, generator=g),
            torch.tensor([[12.5, 20.0, 22.0]] * 3))
    kw = dict(audio_tokens=torch.randn(3, 8, 4, dim, generator=g), face_mask=torch.ones(1, 1, 64, 64))
    with torch.no_grad():
        err = rel_err(two8(*args, **kw), two(*args, **kw))
    assert 1e-4 < err < 0.25, f"fp8 vs fp32 weights: {err:.3e}"  # really rounded, still the same model
    unet.to(torch.device("cpu"))  # moving keeps fp8 storage and the scales
    assert unet.conv_in._parameters["weight"].dtype == torch.float8_e4m3fn
    assert unet.conv_in.weight_scale.dtype == torch.float32


def test_fp8_quantize_is_per_channel_and_exact_at_the_extremes():
    w = torch.tensor([[1e-3, -2e-3, 4e-3], [100.0, -50.0, 0.0], [0.0, 0.0, 0.0]])
    values, scale = lowvram.quantize_fp8(w)
    back = values.float() * scale
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert torch.equal(back[:, [2]][:1], w[:1, [2]]) and back[1, 0] == 100.0  # each row's max is exact
    assert (back - w).abs().max(dim=1).values[0] < 2e-4  # the small row keeps 3 mantissa bits
    assert torch.equal(back[2], w[2])


def test_load_unet_with_fp8_weight_dtype(tmp_path):
    from sonic_core.weights import load_unet

    unet = _tiny_unet()
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    (tmp_path / "unet.json").write_text(json.dumps(TINY_UNET))
    loaded = load_unet(tmp_path / "unet.pth", torch.bfloat16, "cpu", weight_dtype=torch.float8_e4m3fn)
    assert lowvram.is_fp8(loaded)
    assert loaded.conv_in.weight.dtype == torch.bfloat16
    assert loaded.conv_in._parameters["weight"].dtype == torch.float8_e4m3fn
    plain = load_unet(tmp_path / "unet.pth", torch.bfloat16, "cpu")
    assert not lowvram.is_fp8(plain)


def test_loader_node_weight_dtype(model_dir, monkeypatch):
    from nodes import runtime
    from nodes.nodes_loader import SonicLoader

    root, names = model_dir
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    spec = SonicLoader.INPUT_TYPES()
    choices, opts = spec["optional"]["weight_dtype"]
    assert choices == ["default", "fp8_e4m3fn"] and opts["default"] == "default" and opts["tooltip"]
    (models,) = SonicLoader().load(**names, dtype="fp32", weight_dtype="fp8_e4m3fn")
    assert lowvram.is_fp8(models.unet) and models.dtype == torch.float32
    (plain,) = SonicLoader().load(**names, dtype="fp32")  # the default: not the fp8 models reused
    assert not lowvram.is_fp8(plain.unet)
    with pytest.raises(ValueError, match="weight_dtype 'fp4'"):
        SonicLoader().load(**names, dtype="fp32", weight_dtype="fp4")


# ----------------------------------------------------------------------------------------------
# sizes planned from free memory
# ----------------------------------------------------------------------------------------------
def test_guidance_rows_and_window_batch_from_free_memory():
    lat, w, f16 = 64, 25, torch.float16  # 512x512, 25-frame windows
    assert sampler.plan_batching(None, lat, lat, w, f16, 5) == (1, 3)  # CPU: official rows, one window
    # an 8 GB card with the fp16 UNet loaded (~4.5 GB free): one row per call
    assert sampler.plan_batching(int(4.5 * GIB), lat, lat, w, f16, 5) == (1, 1)
    assert sampler.plan_batching(int(9 * GIB), lat, lat, w, f16, 5) == (1, 3)  # a 12 GB card
    big_batch, big_rows = sampler.plan_batching(80 * GIB, lat, lat, w, f16, 5)
    assert big_rows == 3 and big_batch == 5
    assert sampler.plan_batching(int(4.5 * GIB), lat, lat, w, f16, 5, window_batch=2, guidance_rows=0)[1] == 1
    assert sampler.plan_batching(80 * GIB, lat, lat, w, f16, 5, guidance_rows=1)[1] == 1  # user's choice
    one = sampler.auto_window_batch(int(12 * GIB), lat, lat, w, f16, 9, guidance_rows=1)
    three = sampler.auto_window_batch(int(12 * GIB), lat, lat, w, f16, 9, guidance_rows=3)
    assert one >= 3 * three - 2 and three >= 1
    with pytest.raises(ValueError, match="guidance_rows=2"):
        sampler.plan_batching(None, lat, lat, w, f16, 5, guidance_rows=2)


def test_planning_leaves_room_for_the_clips_own_state():
    """A ten-minute clip's latents and audio tokens sit on the device during sampling (0.74 GB
    at 512x512 in fp16, plus under one window of shared frames): the planner takes them off the
    free memory before sizing the calls."""
    lat, w, f16, frames = 64, 25, torch.float16, 7500  # 10 min at 12.5 fps, 512x512
    state = sampler.clip_state_bytes(frames, lat, lat, (frames, 32, 1024), f16)
    assert state == (frames * (4 * lat * lat + 32 * 1024) + w * 4 * lat * lat) * 2  # 738 MB
    free = int(7.5 * GIB)  # fits one 3-row call of a short clip, not next to 10 minutes of state
    short = sampler.clip_state_bytes(250, lat, lat, (250, 32, 1024), f16)
    assert sampler.plan_batching(free, lat, lat, w, f16, 5, clip_bytes=short) == (1, 3)
    assert sampler.plan_batching(free, lat, lat, w, f16, 300, clip_bytes=state)[1] == 1  # then 2 one-row windows fit
    assert sampler.plan_batching(None, lat, lat, w, f16, 300, clip_bytes=state) == (1, 3)  # CPU: unchanged


def test_decode_and_rife_chunks_from_free_memory(caplog):
    assert lowvram.auto_decode_chunk(None, 512, 512, torch.float16) == 8  # CPU: the official chunk
    assert lowvram.auto_decode_chunk(80 * GIB, 512, 512, torch.float16) == 8  # never above it
    small = lowvram.auto_decode_chunk(2 * GIB, 512, 512, torch.float16)
    assert 1 <= small < 8 and "changes the video slightly" in caplog.text
    assert lowvram.auto_decode_chunk(2 * GIB, 512, 512, torch.float32) <= small
    assert lowvram.auto_decode_chunk(1, 512, 512, torch.float16) == 1
    assert lowvram.auto_rife_batch(None, 512, 512) == 4
    assert lowvram.auto_rife_batch(80 * GIB, 512, 512) == 16
    assert 1 <= lowvram.auto_rife_batch(200 * 2**20, 512, 512) < 4
    assert lowvram.auto_rife_batch(1, 512, 512) == 1


def test_sampler_node_guidance_rows_input(monkeypatch):
    from nodes import nodes_sampler
    from nodes.runtime import core

    spec = nodes_sampler.SonicSampler.INPUT_TYPES()
    choices, opts = spec["optional"]["guidance_rows"]
    assert choices == ["auto", "3", "1"] and opts["default"] == "auto" and opts["tooltip"]
    seen = {}

    def fake_generate(unet, *a, settings, window_batch, **kw):
        seen.update(rows=settings.guidance_rows, window_batch=window_batch)
        return torch.zeros(4, 4, 8, 8)

    monkeypatch.setattr(core("sampler"), "generate", fake_generate)
    anchor = torch.nn.Linear(1, 1)
    model = SimpleNamespace(load=lambda name: anchor, dtype=torch.float32)
    audio = SimpleNamespace(cond_tokens=torch.zeros(4, 4, 32), num_frames=4, fps=12.5)
    motion = SimpleNamespace(buckets=torch.zeros(4, 2))
    image = torch.zeros(1, 64, 64, 3)
    run = lambda **kw: nodes_sampler.SonicSampler().sample(  # noqa: E731
        model, None, None, image, torch.ones(1, 64, 64), audio, motion, steps=1, min_resolution=64,
        frames_per_window=4, **kw)
    run()  # a saved workflow without the input: auto (CPU: the official 3 rows)
    assert seen == {"rows": 3, "window_batch": 1}
    run(guidance_rows="1", window_batch=2)
    assert seen == {"rows": 1, "window_batch": 2}
    with pytest.raises(ValueError, match="guidance_rows='2'"):
        run(guidance_rows="2")


# ----------------------------------------------------------------------------------------------
# the bench's memory counter against a real CPU run
# ----------------------------------------------------------------------------------------------
def test_meta_counter_matches_cpu_allocator():
    sys.path.insert(0, str(BENCH))
    try:
        import _memcount as mc
    finally:
        sys.path.remove(str(BENCH))
    settings = dataclasses.replace(SAMPLER_DEFAULTS, frames_per_window=8)
    dim = TINY_UNET["cross_attention_dim"]
    peaks = {}
    for rows in (3, 1):
        with torch.device("meta"):
            meta = build_sonic_unet(dict(TINY_UNET))
        meta = meta.to("meta").eval()
        xm = {k: torch.empty_like(v, device="meta") for k, v in _tiny_inputs(8, 64, dim).items()}
        counted, _ = mc.meta_peak_bytes(lambda: _one_step(meta, xm, settings, rows, [0], torch.float32),
                                        mc.module_tensors(meta) + list(xm.values()))
        unet, x = _tiny_unet(), _tiny_inputs(8, 64, dim)
        real = mc.cpu_peak_bytes(lambda: _one_step(unet, x, settings, rows, [0], torch.float32))
        assert counted == pytest.approx(real, rel=0.02), (rows, counted, real)
        peaks[rows] = counted
    assert peaks[1] < 0.45 * peaks[3]


def test_rife_batch_zero_plans_from_free_memory(tmp_path, monkeypatch):
    from nodes import runtime
    from nodes.nodes_video import SonicFrameInterpolate, rife_batch
    from tests.test_rife import _save_pkl, _tiny_rife

    (tmp_path / "RIFE").mkdir()
    _save_pkl(_tiny_rife(4).state_dict(), tmp_path / "RIFE" / "flownet.pkl")
    monkeypatch.setenv(runtime.MODELS_ENV, str(tmp_path))
    spec = SonicFrameInterpolate.INPUT_TYPES()["required"]["batch_size"][1]
    assert spec["min"] == 0 and "0 = as many as" in spec["tooltip"]
    frames = torch.rand(4, 32, 32, 3)
    node = SonicFrameInterpolate()
    auto, _ = node.interpolate(frames, "RIFE/flownet.pkl", 2, 12.5, 0)
    fixed, _ = node.interpolate(frames, "RIFE/flownet.pkl", 2, 12.5, 1)
    assert_same_math(auto, fixed, "RIFE batch 0 (auto) vs 1")
    rife = _tiny_rife(4)
    assert rife_batch(0, rife, 512, 512) == 4  # CPU: the default batch
    assert rife_batch(3, rife, 512, 512) == 3
    monkeypatch.setattr(runtime, "free_memory", lambda device: 80 * GIB)
    assert rife_batch(0, rife, 512, 512) == 16
