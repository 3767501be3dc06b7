"""Long clips in ComfyUI (issue 14): Latent To Video streams, Latent Segment + Video Combine append
segments to one file, and both give the one-pass frames (decode -> RIFE), seams included.

The node classes run here without ComfyUI; tests/test_comfyui_real.py queues the segment workflow
in a real ComfyUI, where Video Combine queues the next segment itself.
"""

from __future__ import annotations

import logging
import os

import av
import numpy as np
import pytest
import torch

from nodes import nodes_long, nodes_video
from sonic_core import interpolate, stream, video
from sonic_core.models import svd
from sonic_core.selftest import TINY_VAE
from tests._golden import assert_same_math, rel_err, same_math_tol
from tests.test_rife import _tiny_rife

FRAMES = 21  # latents: 3 segments of 8 at chunk 4 (8, 8, 5), the last decode chunk short
CHUNK = 4
SEGMENT = 7  # rounded up to 8 = two whole chunks
SR = 16000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    model = svd.build_vae(TINY_VAE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rife = _tiny_rife(seed=2)
    root = tmp_path_factory.mktemp("models")
    (root / "RIFE").mkdir()
    torch.save({f"module.{k}": v for k, v in rife.state_dict().items()}, root / "RIFE" / "flownet.pkl")
    latents = torch.randn(FRAMES, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # [F,4,h,w]
    return svd.SVDVAE(model, decode_chunk_size=CHUNK), rife, latents, root


@pytest.fixture
def env(models, tmp_path, monkeypatch):
    vae, rife, latents, root = models
    monkeypatch.setenv("SONIC_MODELS_DIR", str(root))
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setenv("SONIC_OUTPUT_DIR", str(out))
    written = []  # every frame handed to an encoder, in order
    real_write = video.VideoWriter.write

    def recording_write(self, frames, callback=None):
        if isinstance(frames, torch.Tensor):
            written.append(frames.clone())
            return real_write(self, frames, callback)
        seen = []  # a stream: recorded as it is consumed, still one frame at a time

        def tap():
            for f in frames:
                seen.append(f.clone())
                yield f
        try:
            return real_write(self, tap(), callback)
        finally:
            written.append(torch.stack(seen))

    monkeypatch.setattr(video.VideoWriter, "write", recording_write)
    return vae, rife, latents, out, written


def _audio(seconds: float) -> dict:
    t = torch.arange(int(seconds * SR)) / SR
    return {"waveform": (0.3 * torch.sin(2 * torch.pi * 220 * t))[None, None], "sample_rate": SR}


def _one_pass(vae, rife, latents, multiplier=2):
    return interpolate.interpolate(rife, vae.decode(latents), multiplier, 4)  # [N,H,W,3]


def _decoded(path: str) -> tuple[int, float]:
    with av.open(path) as c:
        n = sum(1 for _ in c.decode(video=0))
    with av.open(path) as c:
        a = c.streams.audio[0]
        seconds = float(sum(f.samples for f in c.decode(audio=0))) / a.rate
    return n, seconds


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _run_segments(vae, latents, audio, multiplier=2, start=0, stop=None, prefix="Sonic/long"):
    seg_node, rife_node, combine = nodes_long.SonicLatentSegment(), nodes_video.SonicFrameInterpolate(), \
        nodes_video.SonicVideoCombine()
    out, k = None, start
    while True:
        images, info = seg_node.decode({"samples": latents}, vae, SEGMENT, k, CHUNK, unique_id="7")
        frames, fps = rife_node.interpolate(images, "RIFE/flownet.pkl", multiplier, 12.5, 4)
        out = combine.combine(frames, fps, prefix, audio=audio, segment=info)
        k += 1
        if info.segment.last or (stop is not None and k >= stop):
            return out, info


def test_plan_segments_whole_chunks():
    plan = stream.plan_segments(FRAMES, SEGMENT, CHUNK)
    assert [(s.start, s.stop, s.leading) for s in plan] == [(0, 8, 0), (8, 16, 1), (16, 21, 1)]
    assert [s.last for s in plan] == [False, False, True]
    assert stream.segment_length(1, 8) == 8 and stream.segment_length(96, 8) == 96
    with pytest.raises(ValueError, match="segment_frames 0"):
        stream.plan_segments(FRAMES, 0, CHUNK)


def test_segments_give_the_one_pass_video(env):
    vae, rife, latents, out, written = env
    audio = _audio(2.0)
    result, info = _run_segments(vae, latents, audio)
    path = result["result"][0]
    assert result["ui"]["images"][0]["filename"] == os.path.basename(path)
    want = _one_pass(vae, rife, latents)  # [2F-1,H,W,3]
    got = torch.cat(written)
    assert [w.shape[0] for w in written] == [15, 16, 10]  # 2*8-1, then 2*8 and 2*5 after the leading frame
    assert got.shape == want.shape
    # same arithmetic on the same frames (RIFE batches are cut differently at segment borders)
    assert_same_math(got, want, "segments vs one pass")
    # the seams: the pair straddling each segment border equals its one-pass interpolation
    for border in (2 * 8 - 1, 2 * 16 - 1):
        assert_same_math(got[border - 1:border + 2], want[border - 1:border + 2], f"seam at {border}")
    # planted bug: keeping the leading frame would duplicate one frame per seam and shift the rest
    kept = torch.cat([written[0], _leading_kept(vae, rife, latents)])
    assert kept.shape[0] != want.shape[0] or rel_err(kept, want) > 100 * same_math_tol()
    n, seconds = _decoded(path)
    assert n == 2 * FRAMES - 1
    assert abs(seconds - n / 25.0) < 0.05, "the audio follows the video across segments"
    assert _files(out) == [os.path.relpath(path, out)], "one file, no temp file left"


def _leading_kept(vae, rife, latents):
    parts = []
    for seg in stream.plan_segments(FRAMES, SEGMENT, CHUNK)[1:]:
        parts.append(interpolate.interpolate(rife, stream.decode_segment(vae, latents, seg, CHUNK), 2, 4))
    return torch.cat(parts)


def test_segments_x4_and_comfyui_style_vae(env):
    """A VAE with ComfyUI's call (``decode(samples)``, decoding all it is given as one temporal
    batch) is handed one chunk per call, so its frames match the SVD VAE's chunked decode."""
    vae, rife, latents, out, written = env

    class ComfyStyleVAE:
        def __init__(self):
            self.calls = []

        def decode(self, samples_in):
            self.calls.append(samples_in.shape[0])
            return vae.decode(samples_in, chunk_size=samples_in.shape[0])

    comfy_vae = ComfyStyleVAE()
    _run_segments(comfy_vae, latents, None, multiplier=4)
    assert max(comfy_vae.calls) == CHUNK, "never more than one decoder chunk per call"
    assert_same_math(torch.cat(written), _one_pass(vae, rife, latents, 4), "x4 segments vs one pass")


def test_segment_order_restart_and_cancel_leave_no_file(env):
    vae, rife, latents, out, written = env
    seg_node = nodes_long.SonicLatentSegment()
    combine = nodes_video.SonicVideoCombine()
    images, info = seg_node.decode({"samples": latents}, vae, SEGMENT, 1, CHUNK, unique_id="7")
    with pytest.raises(ValueError, match="segment 2 of 3 arrived.*segment_index to 0"):
        combine.combine(images, 12.5, "Sonic/order", segment=info)
    with pytest.raises(ValueError, match="segment_index 3 is past the last segment: this clip has 3"):
        seg_node.decode({"samples": latents}, vae, SEGMENT, 3, CHUNK)
    # two segments, then the user queues again: segment 0 starts a new file, the old one is removed
    _run_segments(vae, latents, None, stop=2, prefix="Sonic/again")
    assert len(nodes_video._live) == 1
    result, _ = _run_segments(vae, latents, None, prefix="Sonic/again")
    assert not nodes_video._live
    assert _files(out) == [os.path.relpath(result["result"][0], out)]
    # a cancel in the middle of a segment removes the unfinished file
    images, info = seg_node.decode({"samples": latents}, vae, SEGMENT, 0, CHUNK, unique_id="7")
    combine.combine(images, 12.5, "Sonic/cancel", segment=info)
    images, info = seg_node.decode({"samples": latents}, vae, SEGMENT, 1, CHUNK, unique_id="7")
    from nodes import runtime

    calls = {"n": 0}
    real = runtime.check_interrupt

    def cancel_after_3():
        calls["n"] += 1
        if calls["n"] > 3:
            raise runtime.InterruptProcessingException("cancelled")
        real()

    import unittest.mock as mock

    with mock.patch.object(runtime, "check_interrupt", cancel_after_3):
        with pytest.raises(runtime.InterruptProcessingException):
            combine.combine(images, 12.5, "Sonic/cancel", segment=info)
    assert not nodes_video._live
    assert _files(out) == [os.path.relpath(result["result"][0], out)], "the cancelled clip left nothing"


def test_latent_to_video_streams_the_one_pass_frames(env):
    vae, rife, latents, out, written = env

    class CountingVAE:
        calls: list = []

        def decode(self, samples_in):
            self.calls.append(samples_in.shape[0])
            return vae.decode(samples_in, chunk_size=samples_in.shape[0])

    counting = CountingVAE()
    node = nodes_long.SonicLatentToVideo()
    result = node.save({"samples": latents}, counting, 12.5, "RIFE/flownet.pkl", 2, "Sonic/stream",
                       audio=_audio(1.0), decode_chunk_size=CHUNK)
    path = result["result"][0]
    assert max(counting.calls) == CHUNK, "decoded one chunk at a time"
    got = torch.cat(written)
    assert_same_math(got, _one_pass(vae, rife, latents), "Latent To Video vs one pass")
    n, seconds = _decoded(path)
    assert n == 2 * FRAMES - 1 and abs(seconds - n / 25.0) < 0.05  # 1 s of audio padded to the video
    # without RIFE: the decoded frames at the generated rate
    written.clear()
    result = node.save({"samples": latents}, vae, 12.5, "none", 2, "Sonic/plain", decode_chunk_size=0)
    assert_same_math(torch.cat(written), vae.decode(latents), "no RIFE")
    with av.open(result["result"][0]) as c:
        assert c.streams.video[0].average_rate == 12.5


def test_latent_nodes_refuse_bad_input_before_decoding(env):
    vae, rife, latents, out, written = env
    node = nodes_long.SonicLatentToVideo()
    with pytest.raises(ValueError, match="expected the Sonic Sampler's LATENT"):
        node.save({"samples": latents[0]}, vae, 12.5, "none", 2, "Sonic/x")
    with pytest.raises(ValueError, match="crf 99 is out of range"):
        node.save({"samples": latents}, vae, 12.5, "none", 2, "Sonic/x", crf=99)
    with pytest.raises(ValueError, match="connect Latent Segment"):
        nodes_video.SonicVideoCombine().combine(torch.zeros(2, 8, 8, 3), 25.0, "Sonic/x", segment="seg")
    assert not written and _files(out) == []
    assert np.isfinite(float(latents.sum()))


@pytest.mark.parametrize("mode", ["classic", "lru", "ram", "none"])
def test_latent_segment_under_each_cache_mode(env, monkeypatch, caplog, mode):
    """Classic and --cache-lru keep the sampler's output: segments run as they are. --cache-ram may
    drop it and --cache-none always does: allowed when the sampler kept its result on disk (its
    LATENT names the file: the sampler reruns, returns it, no sampling), else --cache-ram warns
    and --cache-none refuses before decoding."""
    from nodes import runtime

    vae, _rife, latents, _out, _written = env
    monkeypatch.setattr(runtime, "cache_mode", lambda: mode)
    node = nodes_long.SonicLatentSegment()
    kept = {"samples": latents, runtime.KEPT_RESULT_KEY: "/states/sonic-result-x.safetensors"}
    caplog.set_level(logging.INFO, logger=nodes_long.log.name)
    images, seg = node.decode(kept, vae, SEGMENT, 0)
    assert images.shape[0] == 8 and seg.segment.index == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "cache" in r.getMessage()]
    if mode in ("ram", "none"):
        assert said == [f"Latent Segment: ComfyUI runs with {runtime.CACHE_MODE_NAMES[mode]}; the nodes before "
                        "this one may run "
                        f"again for each of the {-(-FRAMES // 8)} segments, but the sampler returns its kept "
                        "result /states/sonic-result-x.safetensors without sampling"]
    else:
        assert said == []
    caplog.clear()
    plain = {"samples": latents}  # SONIC_KEEP_MB=0, a result over the cap, or an unwritable folder
    if mode == "none":
        with pytest.raises(ValueError, match=r"--cache-none, .* did not keep its result on disk .* raise "
                                             r"SONIC_KEEP_MB"):
            node.decode(plain, vae, SEGMENT, 0)
        return
    node.decode(plain, vae, SEGMENT, 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (warned[0].startswith("Latent Segment: ComfyUI runs with the RAM-pressure cache (--cache-ram; "
                                 "ComfyUI 0.33's default), which may drop") if mode == "ram"
            else warned == []), warned
