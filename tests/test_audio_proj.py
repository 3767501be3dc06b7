"""audio2token / audio2bucket: official key layout, input layouts, golden parity (SPEC §4.4, §4.5)."""

from __future__ import annotations

import pytest
import torch

from sonic_core.models.audio_proj import Audio2BucketModel, AudioProjModel
from sonic_core.weights import check_keys
from tests._golden import assert_close_rel, assert_planted_fails, load_json, with_weight_off

# Parity with the official float32 outputs (SPEC §14). Measured (AMD EPYC, AVX2 and ATen default kernels with 1 thread): audio2token
# 3.2e-7, audio2bucket 2.3-3.4e-7 relative, so 30x margin; the planted 1 % weights below miss by >10x.
RTOL = 1e-5


def _meta_shapes(model_cls) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = model_cls()  # official defaults from sonic_core.config
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_cls, manifest", [(AudioProjModel, "audio2token.json"),
                                                  (Audio2BucketModel, "audio2bucket.json")])
def test_full_size_matches_official_manifest(model_cls, manifest):
    m = load_json("fixtures", "manifests", manifest)
    shapes = _meta_shapes(model_cls)
    assert shapes == m["keys"]  # same keys, same shapes, nothing extra
    assert sum(torch.Size(s).numel() for s in shapes.values()) == m["_meta"]["num_params"]
    check_keys(m["keys"], {k: torch.empty(s, device="meta") for k, s in shapes.items()}, manifest)


def _a2t(golden) -> AudioProjModel:
    model = AudioProjModel(**golden.models["audio2token"]).eval()
    check_keys(model, golden.weights("audio2token"), "golden audio2token")
    model.load_state_dict(golden.weights("audio2token"), strict=True)
    return model


def _a2b(golden) -> Audio2BucketModel:
    model = Audio2BucketModel(**golden.models["audio2bucket"]).eval()
    check_keys(model, golden.weights("audio2bucket"), "golden audio2bucket")
    model.load_state_dict(golden.weights("audio2bucket"), strict=True)
    return model


@torch.no_grad()
def test_audio2token_parity(golden):
    model = _a2t(golden)
    windows = golden.t("a2t.inputs_cond")  # official layout [F, 1, seq, blocks, ch]
    cond = golden.t("tokens.cond")
    assert_close_rel(model(windows), cond, RTOL, "audio2token cond tokens")
    uncond = golden.t("tokens.uncond")
    assert_close_rel(model(torch.zeros_like(windows)), uncond, RTOL, "audio2token uncond tokens")
    assert_close_rel(model.uncond_tokens(uncond.shape[0]), uncond, RTOL, "uncond_tokens()")
    assert_planted_fails(with_weight_off(model)(windows), cond, RTOL, "audio2token, a weight 1 % off")
    # our layout without the singleton axis gives the same tokens
    # by construction: both reshape to the same [N, 19200] view of the same storage, same GEMM
    assert torch.equal(model(windows.flatten(0, 1)), model(windows))


@torch.no_grad()
def test_audio2bucket_parity(golden):
    model = _a2b(golden)
    windows, embeds, raw = golden.t("a2b.inputs"), golden.t("clip.image_embeds"), golden.t("a2b.raw_out")
    out = model(windows, embeds)
    assert out.shape == (windows.shape[0], model.context_tokens * model.output_dim)
    assert_close_rel(out.reshape(raw.shape), raw, RTOL, "audio2bucket raw output")
    bad = with_weight_off(model)(windows, embeds)
    assert_planted_fails(bad.reshape(raw.shape), raw, RTOL, "audio2bucket, a weight 1 % off")
    # one embedding row per window gives the same result as a broadcast single row
    per_row = embeds.reshape(1, -1).expand(windows.shape[0], -1)
    # by construction: torch.cat builds the same contiguous matrix from either expanded view
    assert torch.equal(model(windows.flatten(0, 1), per_row), out)


def test_audio2token_rejects_wrong_window_shape():
    model = AudioProjModel(seq_len=4, blocks=2, channels=3, intermediate_dim=8, output_dim=6,
                           context_tokens=2)
    assert model(torch.randn(5, 4, 2, 3)).shape == (5, 2, 6)
    with pytest.raises(ValueError, match=r"audio2token.*\[N, 4, 2, 3\].*\(5, 4, 3, 2\)"):
        model(torch.randn(5, 4, 3, 2))
    with pytest.raises(ValueError, match="audio2token"):
        model(torch.randn(4, 2, 3))  # no batch axis


def test_audio2bucket_rejects_bad_image_embeds():
    model = Audio2BucketModel(seq_len=6, blocks=1, channels=3, clip_channels=5, intermediate_dim=8,
                              output_dim=1, context_tokens=2)
    windows = torch.randn(4, 6, 1, 3)
    assert model(windows, torch.randn(5)).shape == (4, 2)
    with pytest.raises(ValueError, match=r"image_embeds.*\[1, 5\] or \[4, 5\].*\(3, 5\)"):
        model(windows, torch.randn(3, 5))
    with pytest.raises(ValueError, match="image_embeds"):
        model(windows, torch.randn(1, 7))


def test_audio_proj_runs_in_weight_dtype():
    model = AudioProjModel(seq_len=2, blocks=1, channels=3, intermediate_dim=4, output_dim=4,
                           context_tokens=1)
    model = model.to(torch.float64)
    assert model(torch.randn(2, 2, 1, 3, dtype=torch.float32)).dtype == torch.float64
