"""The golden harness reads every field of a case (tests/_golden.py), and fails loudly on the rest."""

from __future__ import annotations

import copy

import pytest
import torch

from sonic_core import audio as A
from tests._golden import (Golden, GoldenFieldError, assert_close_rel, assert_planted_fails, case_settings,
                           derive_frame_cap_case)


def test_public_case_settings_are_read_from_its_fields(golden):
    c = golden.case
    args, over = golden.meta["process_args"], golden.meta["config_overrides"]
    assert (c.min_resolution, c.steps, c.motion_scale) == (
        args["min_resolution"], args["inference_steps"], args["dynamic_scale"])
    assert (c.frames_per_window, c.overlap, c.shift_offset, c.decode_chunk_size) == (
        over["n_sample_frames"], over["overlap"], over["shift_offset"], over["decode_chunk_size"])
    assert c.frame_cap == over.get("frame_num", 10000) and c.max_seconds * 25 == pytest.approx(c.frame_cap)
    assert c.area == over.get("area", 1.1) and c.fps_conditioning == over.get("fps", 12.5)


@pytest.mark.parametrize("section, field", [("config_overrides", "motion_frames"),
                                            ("process_args", "crop"),
                                            ("effective_pipeline_kwargs", "num_frames")])
def test_unknown_field_fails_loudly_and_names_it(golden, section, field):
    meta = copy.deepcopy(golden.meta)
    meta.setdefault(section, {})[field] = 1
    with pytest.raises(GoldenFieldError, match=field):
        case_settings(meta)


def test_fields_without_a_mapping_fail_instead_of_running_with_a_default(golden):
    meta = copy.deepcopy(golden.meta)
    meta["config_overrides"]["step"] = 3
    with pytest.raises(GoldenFieldError, match="step=3"):
        case_settings(meta)
    meta = copy.deepcopy(golden.meta)
    meta["config_overrides"]["weight_dtype"] = "fp16"
    with pytest.raises(GoldenFieldError, match="float32"):
        case_settings(meta)
    meta = copy.deepcopy(golden.meta)
    meta["config_overrides"]["frame_num"] = "all"
    with pytest.raises(GoldenFieldError, match="frame_num"):
        case_settings(meta)


def test_effective_kwargs_must_agree_with_the_fields(golden):
    meta = copy.deepcopy(golden.meta)
    meta["config_overrides"]["shift_offset"] = meta["effective_pipeline_kwargs"]["shift_offset"] + 1
    with pytest.raises(GoldenFieldError, match="shift_offset"):
        case_settings(meta)


def test_process_args_win_over_config_overrides_like_the_official_code(golden):
    meta = copy.deepcopy(golden.meta)
    meta["config_overrides"]["num_inference_steps"] = 99  # process(inference_steps=...) replaces it
    meta["process_args"]["seed"] = 0  # official: `if seed:`, so 0 keeps the case's seed
    c = case_settings(meta)
    assert c.steps == golden.meta["process_args"]["inference_steps"] and c.seed == golden.case.seed


def test_frame_cap_case_needs_the_cap(golden, tmp_path, model_dir, monkeypatch):
    """The derived frame-cap case (longer audio, frame_num = the original audio_len) through the
    audio node: with the case's max_seconds it gives the original tokens; without, more frames."""
    from nodes import runtime
    from nodes.nodes_audio import SonicWhisperAudioEncode
    from nodes.nodes_loader import SonicLoader

    capped = Golden(derive_frame_cap_case(golden, tmp_path / "capped"))
    assert capped.case.frame_cap == golden.scalars["audio_len"]
    root, names = model_dir
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    (models,) = SonicLoader().load(**names, dtype="fp32")
    wav = {"waveform": capped.t("input.waveform")[None, None], "sample_rate": 16000}
    (out,) = SonicWhisperAudioEncode().encode(models, wav, capped.case.max_seconds)
    assert out.audio_len == golden.scalars["audio_len"]
    # official float32 tokens: measured 3.3e-7 relative (AVX2 and default kernels, 1 thread), 30x margin
    assert_close_rel(out.cond_tokens, golden.t("tokens.cond"), 1e-5, "capped tokens")
    if out.cond_tokens.shape[0] > 1:  # planted bug: tokens a frame off
        assert_planted_fails(out.cond_tokens.roll(1, 0), golden.t("tokens.cond"), 1e-5, "tokens a frame off")
    (uncapped,) = SonicWhisperAudioEncode().encode(models, wav, 0.0)
    assert uncapped.audio_len > out.audio_len, "the derived case must need its cap"
    assert A.frame_counts(capped.t("input.waveform").numel(), capped.case.max_seconds)[0] == out.audio_len
    assert torch.equal(capped.t("input.waveform")[: golden.t("input.waveform").numel()],
                       golden.t("input.waveform"))  # a copy plus zeros


def _other_settings(c) -> dict:
    """Self-consistency settings unlike case ``c``'s own, each valid for it."""
    out = {"overlap": (c.overlap + 1) % c.frames_per_window, "shift_offset": 0 if c.shift_offset else 1}
    i2i = 0.75 if c.i2i_strength == 1.0 else 1.0
    if int(c.steps * i2i) >= 1:
        out["i2i_noise_strength"] = i2i
    return out


def test_derived_variant_drops_the_outputs_its_settings_change(golden, tmp_path):
    """A variant (tests/_golden.py VARIANTS) holds its new settings and only official outputs that
    still hold for them: a test asking for another one skips (parity), never compares a stale one."""
    from tests._golden import derive_variant

    other = _other_settings(golden.case)
    v = Golden(derive_variant(golden, tmp_path / "v", other, frame_cap=True))
    c = v.case
    assert (c.overlap, c.shift_offset) == (other["overlap"], other["shift_offset"])
    assert c.i2i_strength == other.get("i2i_noise_strength", golden.case.i2i_strength)
    assert c.frame_cap == golden.scalars["audio_len"] and c.steps == golden.case.steps
    for name in ("pipe.latents_final", "win.s0.b0.unet_out", "out.video"):
        assert not v.has(name) and "config_overrides." in v.stale_reason(name)
        with pytest.raises(pytest.skip.Exception, match=name):
            v.t(name)
    with pytest.raises(pytest.skip.Exception, match="scalars.windows"):
        v.windows
    for name in ("input.latents_noise", "pipe.image_latents", "tokens.cond", "pipe.sigmas"):
        assert v.has(name) and torch.equal(v.t(name), golden.t(name)), name
    assert v.scalars["num_frames"] == golden.scalars["num_frames"]
    # one setting alone drops only what it changes: overlap keeps the schedule
    o = Golden(derive_variant(golden, tmp_path / "o", {"overlap": other["overlap"]}))
    assert o.has("pipe.timesteps") == golden.has("pipe.timesteps") and not o.has("pipe.latents_final")


@pytest.mark.parametrize("settings, match", [
    ({"n_sample_frames": 5}, "n_sample_frames"),  # no rule for which outputs it changes
    ({"overlap": 4}, "overlap=4"),  # not below the 4-frame window
    ({"i2i_noise_strength": 0.2}, "i2i_noise_strength=0.2 with steps=3 runs no step"),
])
def test_derived_variant_refuses_settings_no_test_can_honour(golden, tmp_path, settings, match):
    from tests._golden import derive_variant

    if golden.case.frames_per_window != 4 or golden.case.steps != 3:
        pytest.skip("the values are chosen for the public case (a 4-frame window, 3 steps)")
    with pytest.raises(ValueError, match=match):
        derive_variant(golden, tmp_path / "bad", settings)
    assert not list(tmp_path.iterdir()), "nothing half-written"
