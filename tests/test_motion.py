"""Motion buckets (sonic_core.motion, SonicMotionBucketPredict): SPEC §4.5, §6."""

from __future__ import annotations

import pytest
import torch

from sonic_core import motion
from sonic_core.audio import SonicAudio
from sonic_core.models import SonicModels, svd
from sonic_core.models.audio_proj import Audio2BucketModel
from tests._golden import assert_close_rel, assert_planted_fails, assert_same_math, with_weight_off

# Buckets and embeddings against the official float32 outputs. Measured (AMD EPYC, AVX2 and ATen default kernels with 1 thread):
# buckets 1.4e-7, CLIP embedding 2.4e-7 relative (40x margin); the planted 1 % weight misses by >10x.
RTOL = 1e-5


def _a2b(g):
    m = Audio2BucketModel(**g.models["audio2bucket"])
    m.load_state_dict(g.weights("audio2bucket"), strict=True)
    return m.eval()


def _audio(g) -> SonicAudio:
    f = g.scalars["num_frames"]
    return SonicAudio(
        token_features=g.t("audio.audio_prompts")[0],
        bucket_features=g.t("audio.last_audio_prompts")[0],
        cond_tokens=g.t("tokens.cond"),
        uncond_tokens=g.t("tokens.uncond")[0],
        num_frames=f,
        audio_len=g.scalars["audio_len"],
        fps=12.5,
        waveform=g.t("input.waveform")[None, None],
        sample_rate=16000,
    )


def _raw_buckets(g):
    return g.t("a2b.motion_buckets").reshape(-1, 2)  # [F,1,2,1] -> [F,2], raw*16+16 before the scale


def test_predict_motion_parity(golden):
    scale = golden.case.motion_scale
    m = motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds"), scale, scale)
    f = golden.scalars["num_frames"]
    want = golden.t("pipe.motion_buckets_scaled").reshape(f, 2)
    assert_close_rel(m.buckets, want, RTOL, "scaled buckets")
    bad = motion.predict_motion(with_weight_off(_a2b(golden)), _audio(golden), golden.t("clip.image_embeds"),
                                scale, scale)
    assert_planted_fails(bad.buckets, want, RTOL, "audio2bucket, a weight 1 % off")


def test_predict_motion_batches_equal(golden):
    a = motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds"))
    b = motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds"), batch_frames=3)
    assert_same_math(b.buckets, a.buckets, "batched audio2bucket")  # GEMM blocking may differ
    assert_close_rel(a.buckets, _raw_buckets(golden), RTOL, "buckets at scale 1")


def test_separate_scales_and_fixed_values(golden):
    raw = _raw_buckets(golden)
    m = motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds"), 2.0, 0.5)
    assert_close_rel(m.buckets[:, 0], raw[:, 0] * 2.0, RTOL, "head x2")
    assert_close_rel(m.buckets[:, 1], raw[:, 1] * 0.5, RTOL, "expression x0.5")
    same = motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds"), 1.5, 1.5)
    assert_close_rel(same.buckets, raw * 1.5, RTOL, "official dynamic_scale 1.5")
    fixed = motion.predict_motion(
        _a2b(golden), _audio(golden), golden.t("clip.image_embeds"), 2.0, 2.0, fixed_head=40.0
    )
    assert torch.all(fixed.buckets[:, 0] == 40.0)
    assert_close_rel(fixed.buckets[:, 1], raw[:, 1] * 2.0, RTOL, "expression kept")


def test_predict_motion_rejects_bad_embeds(golden):
    with pytest.raises(ValueError, match="image_embeds"):
        motion.predict_motion(_a2b(golden), _audio(golden), golden.t("clip.image_embeds")[0])


def test_node_embeds_working_size_image(golden):
    """The node's CLIP embedding is the official one (clip of the working-size image)."""
    from nodes.nodes_motion import SonicMotionBucketPredict

    enc = svd.build_image_encoder(golden.models["image_encoder"])
    enc.load_state_dict(golden.weights("image_encoder"), strict=False)
    clip = svd.SVDImageEncoder(enc)
    models = SonicModels(
        unet=torch.nn.Identity(),
        audio2token=torch.nn.Identity(),
        audio2bucket=_a2b(golden),
        whisper=torch.nn.Identity(),
        feature_extractor=None,
    )
    image = golden.t("input.image_rgb_u8").to(torch.float32)[None] / 255.0  # [1,H0,W0,3]
    min_res = golden.case.min_resolution
    emb = motion.reference_embeds(clip, image, min_res)
    assert_close_rel(emb, golden.t("clip.image_embeds"), RTOL, "working-size CLIP embedding")
    (m,) = SonicMotionBucketPredict().predict(
        models, _audio(golden), clip, image, 1.0, 1.0, min_res, -1.0, 60.0
    )
    assert_close_rel(m.buckets[:, 0], _raw_buckets(golden)[:, 0], RTOL, "node head buckets")
    assert torch.all(m.buckets[:, 1] == 60.0)
    with pytest.raises(ValueError, match="head_motion_scale"):
        SonicMotionBucketPredict().predict(models, _audio(golden), clip, image, -1.0, 1.0)
