"""fp16 and bf16 IMAGE, MASK and LATENT inputs (ComfyUI's --fp16-intermediates hands nodes half
tensors): every node that takes one runs on the selftest's tiny models and gives what it gives for
the same values in float32, within the rounding of the half input."""

from __future__ import annotations

import av
import pytest
import torch

from nodes.nodes_face import SonicFaceMaskDetect
from nodes.nodes_long import SonicLatentSegment, SonicLatentToVideo
from nodes.nodes_motion import SonicMotionBucketPredict
from nodes.nodes_paste import SonicPasteBack
from nodes.nodes_sampler import SonicSampler
from nodes.nodes_video import SonicFrameInterpolate, SonicVideoCombine
from tests._node_chain import NODE_SETTINGS, chain, tiny  # noqa: F401 (fixtures)

HALF = [torch.float16, torch.bfloat16]
IDS = ["fp16", "bf16"]
# The float32 reference gets the same rounded input values, so what differs is the nodes' own float math
# and, where a node hands its result back in the input's dtype (RIFE), one rounding of that result.
RIFE = "RIFE/flownet.pkl"
LATENT_FRAMES = 4  # generated frames of the latent tests


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in ``dtype``, the same values in float32)."""
    half = x.to(dtype)
    return half, half.float()


@pytest.fixture()
def env(tiny, monkeypatch, tmp_path):  # noqa: F811
    models_dir, _image, _voice = tiny
    monkeypatch.setenv("SONIC_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("SONIC_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("SONIC_RESUME_DIR", str(tmp_path / "resume"))
    return tmp_path


def _detect(image, mask):
    return SonicFaceMaskDetect().detect(image, "none", True, 0.5, 1.1, 0.5, "error", mask=mask)


def _assert_close(got, want, what, dtype):
    """Equal up to one rounding to ``dtype`` (its machine epsilon, relative to the values' scale)."""
    assert torch.isfinite(got.float()).all(), what
    assert got.shape == want.shape, what
    tol = torch.finfo(dtype).eps * max(1.0, float(want.float().abs().max()))
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol, f"{what}: {err} > {tol}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_face_motion_and_sampler_take_half_images_and_masks(chain, env, dtype):  # noqa: F811
    image, image32 = _rounded(chain["image"], dtype)
    mask, mask32 = _rounded(chain["face_mask"], dtype)
    got, want = _detect(image, mask), _detect(image32, mask32)
    _assert_close(got[0], want[0], "face crop", dtype)
    _assert_close(got[1], want[1], "face mask", dtype)
    assert got[2].crop_xyxy == want[2].crop_xyxy
    motion = SonicMotionBucketPredict()
    args = (chain["sonic_model"], chain["sonic_audio"], chain["clip_vision"])
    m_half = motion.predict(*args, got[0], 1.0, 1.0, 64)[0]
    m_32 = motion.predict(*args, want[0], 1.0, 1.0, 64)[0]
    _assert_close(m_half.buckets, m_32.buckets, "motion buckets", dtype)
    inputs = {**chain, "image": got[0], "face_mask": got[1], "sonic_motion": m_32}
    settings = dict(NODE_SETTINGS, steps=1)
    latent, _fps = SonicSampler().sample(**inputs, **settings)
    latent32, _ = SonicSampler().sample(**{**inputs, "image": want[0], "face_mask": want[1]}, **settings)
    _assert_close(latent["samples"], latent32["samples"], "sampler latents", dtype)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_frames_nodes_take_half_images(chain, env, dtype):  # noqa: F811
    frames, frames32 = _rounded(torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(3)), dtype)
    node = SonicFrameInterpolate()
    got, want = node.interpolate(frames, RIFE, 2, 12.5, 2)[0], node.interpolate(frames32, RIFE, 2, 12.5, 2)[0]
    _assert_close(got, want, "RIFE frames", dtype)
    out = SonicVideoCombine().combine(frames, 12.5, "Sonic/half", "h264-mp4", 18, "yuv420p")
    path = out["result"][0]
    with av.open(path) as f:
        assert sum(1 for _ in f.decode(video=0)) == 3
    photo, photo32 = _rounded(chain["image"], dtype)
    mask = chain["face_mask"]
    crop, _mask, box = _detect(photo32, mask)[:3]
    crops, crops32 = _rounded(crop.expand(2, -1, -1, -1), dtype)
    pasted = SonicPasteBack().paste(crops, photo, box)[0]
    _assert_close(pasted, SonicPasteBack().paste(crops32, photo32, box)[0], "paste back", dtype)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_latent_nodes_take_half_latents(chain, env, dtype):  # noqa: F811
    latent = {"samples": torch.randn(LATENT_FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(4))}
    samples, samples32 = _rounded(latent["samples"], dtype)  # [F, 4, h, w]: the sampler's at 64 px
    vae = chain["vae"]
    seg = SonicLatentSegment()
    got = seg.decode({**latent, "samples": samples}, vae, 8, 0)[0]
    want = seg.decode({**latent, "samples": samples32}, vae, 8, 0)[0]
    _assert_close(got, want, "segment frames", dtype)
    photo, photo32 = _rounded(chain["image"], dtype)
    box = _detect(photo32, chain["face_mask"])[2]
    out = SonicLatentToVideo().save({**latent, "samples": samples}, vae, 12.5, RIFE, 2, "Sonic/half_latent",
                                    photo=photo, face_box=box)
    with av.open(out["result"][0]) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 2 * samples.shape[0] - 1
    assert frames[0].shape[:2] == tuple(photo.shape[1:3])
