"""Numbers past the nodes' limits, NaN in node inputs, latents of another model, one-frame clips with
RIFE, integer PCM and hour-long audio with a cap (issue 22, items 9, 10, 16-20).

One table, ``config.LIMITS``, gives every node number its range and default; the CLI checks each of its
numbers against the range of the node input it stands for. Each refusal: a message naming the value and
what to do, exit 2 (CLI) or ValueError (node), nothing on disk, and no model loaded before it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tracemalloc
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, nodes_long, nodes_video
from nodes.nodes_audio import SonicWhisperAudioEncode
from nodes.nodes_sampler import SonicSampler
from sonic_core import audio as audio_mod
from sonic_core import cli, config, face, pipeline, preflight, selftest, weights
from sonic_core.config import LIMITS
from tests.test_audio import sonic_model  # noqa: F401  (fixture: tiny models through the loader node)

# every INT / FLOAT input of every node -> its config.LIMITS entry (a new number must be added here)
NODE_LIMITS = {
    ("SonicSampler", "seed"): "seed", ("SonicSampler", "steps"): "steps",
    ("SonicSampler", "min_resolution"): "min_resolution",
    ("SonicSampler", "min_appearance_guidance"): "min_appearance_guidance",
    ("SonicSampler", "max_appearance_guidance"): "max_appearance_guidance",
    ("SonicSampler", "min_audio_guidance"): "min_audio_guidance",
    ("SonicSampler", "max_audio_guidance"): "max_audio_guidance",
    ("SonicSampler", "frames_per_window"): "frames_per_window", ("SonicSampler", "overlap"): "overlap",
    ("SonicSampler", "shift_offset"): "shift_offset", ("SonicSampler", "i2i_strength"): "i2i_strength",
    ("SonicSampler", "noise_aug"): "noise_aug", ("SonicSampler", "fps_conditioning"): "fps_conditioning",
    ("SonicSampler", "audio_scale"): "audio_scale", ("SonicSampler", "window_batch"): "window_batch",
    ("SonicWhisperAudioEncode", "max_seconds"): "max_seconds",
    ("SonicMotionBucketPredict", "head_motion_scale"): "motion_scale",
    ("SonicMotionBucketPredict", "expression_scale"): "motion_scale",
    ("SonicMotionBucketPredict", "min_resolution"): "min_resolution",
    ("SonicMotionBucketPredict", "fixed_head_bucket"): "fixed_bucket",
    ("SonicMotionBucketPredict", "fixed_expression_bucket"): "fixed_bucket",
    ("SonicFaceMaskDetect", "expand_ratio"): "expand_ratio", ("SonicFaceMaskDetect", "mask_area"): "mask_area",
    ("SonicFaceMaskDetect", "confidence"): "confidence", ("SonicFaceMaskDetect", "face_index"): "face_index",
    ("SonicSVDLoader", "decode_chunk_size"): "decode_chunk_size",
    ("SonicFrameInterpolate", "multiplier"): "rife_multiplier",
    ("SonicFrameInterpolate", "frame_rate"): "frame_rate", ("SonicFrameInterpolate", "batch_size"): "rife_batch",
    ("SonicVideoCombine", "frame_rate"): "frame_rate", ("SonicVideoCombine", "crf"): "crf",
    ("SonicLatentToVideo", "fps"): "frame_rate", ("SonicLatentToVideo", "multiplier"): "rife_multiplier",
    ("SonicLatentToVideo", "crf"): "crf", ("SonicLatentToVideo", "decode_chunk_size"): "decode_chunk_or_auto",
    ("SonicLatentToVideo", "rife_batch_size"): "rife_batch",
    ("SonicLatentSegment", "segment_frames"): "segment_frames",
    ("SonicLatentSegment", "segment_index"): "segment_index",
    ("SonicLatentSegment", "decode_chunk_size"): "decode_chunk_or_auto",
    ("SonicPasteBack", "feather"): "paste_feather", ("SonicLatentToVideo", "paste_feather"): "paste_feather",
}
DEFAULT_DIFFERS = {("SonicVideoCombine", "frame_rate"): config.OUTPUT_FPS}  # 25 fps after RIFE, not 12.5
CLI_DEFAULT_DIFFERS = {"--window-batch": 1}  # one window per call unless asked (0 = auto, the node's default)


def _numbers(inputs_of: dict) -> dict:
    """{(node, input): options} of every INT / FLOAT input of ``{node: INPUT_TYPES()}``."""
    out = {}
    for node, inputs in inputs_of.items():
        for section in ("required", "optional"):
            for name, entry in inputs.get(section, {}).items():
                if entry[0] in ("INT", "FLOAT"):
                    out[(node, name)] = (entry[0], entry[1])
    return out


def limit_mismatches(inputs_of: dict) -> list[str]:
    """Every node number whose type, min, max or default differs from its config.LIMITS entry."""
    problems = []
    numbers = _numbers(inputs_of)
    for key, (kind, opts) in numbers.items():
        if key not in NODE_LIMITS:
            problems.append(f"{key}: no config.LIMITS entry")
            continue
        limit = LIMITS[NODE_LIMITS[key]]
        want = {"min": limit.lo, "max": limit.hi, "default": DEFAULT_DIFFERS.get(key, limit.default)}
        for field, value in want.items():
            if opts.get(field) != value:
                problems.append(f"{key}: {field} {opts.get(field)!r} != {value!r}")
        if kind != ("INT" if limit.integer else "FLOAT"):
            problems.append(f"{key}: {kind} but the limit is {'integer' if limit.integer else 'float'}")
    problems += [f"{key}: listed but not a node number" for key in NODE_LIMITS if key not in numbers]
    return problems


def _cli_numbers() -> dict:
    """{flag: argparse action} of every int / float option of ``animate``."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    animate = sub.choices["animate"]
    return {a.option_strings[-1]: a for a in animate._actions if a.type in (int, float)}


# ----------------------------------------------------------------------------------------------
# One table
# ----------------------------------------------------------------------------------------------
def test_every_node_number_has_its_limit():
    assert limit_mismatches({k: c.INPUT_TYPES() for k, c in NODE_CLASS_MAPPINGS.items()}) == []


def test_the_mapping_check_can_fail():
    """A planted widget range, an unlisted number and a missing one are all reported."""
    inputs = {k: c.INPUT_TYPES() for k, c in NODE_CLASS_MAPPINGS.items()}
    inputs["SonicSampler"]["required"]["steps"][1]["max"] = 10**9  # the CLI once allowed this
    inputs["SonicSampler"]["required"]["new_number"] = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})
    del inputs["SonicVideoCombine"]["required"]["crf"]
    problems = limit_mismatches(inputs)
    assert any("'steps'" in p and "max 1000000000 != 1000" in p for p in problems), problems
    assert any("new_number" in p and "no config.LIMITS" in p for p in problems), problems
    assert any("'SonicVideoCombine', 'crf'" in p and "not a node number" in p for p in problems), problems


def test_every_cli_number_maps_to_a_limit_and_back():
    flags = _cli_numbers()
    with_flag = {limit.flag: key for key, limit in LIMITS.items() if limit.flag}
    assert sorted(flags) == sorted(with_flag), "a CLI number without a limit, or a limit without its flag"
    node_keys = set(NODE_LIMITS.values())
    for flag, action in flags.items():
        limit = LIMITS[with_flag[flag]]
        assert action.type is (int if limit.integer else float), flag
        assert action.default == CLI_DEFAULT_DIFFERS.get(flag, limit.default), flag
        assert limit.lo <= action.default <= limit.hi, flag
        if flag != "--dist-timeout":  # the one CLI-only number
            assert with_flag[flag] in node_keys, f"{flag} stands for no node input"
    # the CLI's fields and the limits preflight checks them against
    assert {LIMITS[k].flag for k in preflight.SETTING_LIMITS.values() if LIMITS[k].flag} | {"--dist-timeout"} \
        == set(flags)


def _edge_values(limit) -> tuple[list, list]:
    """(refused, accepted) text values of a flag: just past each end, NaN, inf; both ends."""
    step = 1 if limit.integer else max(abs(limit.hi) * 1e-3, 1e-3)
    past = [limit.lo - step, limit.hi + step]
    refused = [str(int(v)) if limit.integer else repr(float(v)) for v in past]
    if not limit.integer:
        refused += ["nan", "inf", "-inf", "1e30"]
    accepted = [str(limit.lo), str(limit.hi)] if limit.integer else [repr(float(limit.lo)), repr(float(limit.hi))]
    return refused, accepted


@pytest.mark.parametrize("key", sorted(k for k, v in LIMITS.items() if v.flag))
def test_every_cli_number_is_held_to_the_node_range(key):
    """Each flag, planted just past either end of its node's range (and NaN / inf), is refused by
    the same check the CLI runs; both ends are accepted."""
    limit = LIMITS[key]
    refused, accepted = _edge_values(limit)
    parser = cli.build_parser()
    base = ["animate", "i.png", "a.wav", "-o", "o.mp4"]
    for text in refused:
        args = parser.parse_args([*base, f"{limit.flag}={text}"])  # "=": argparse reads -inf as a value
        with pytest.raises(ValueError) as e:
            if key == "dist_timeout":
                limit.check(args.dist_timeout, limit.flag)
            else:
                preflight.check_settings(_settings(args), config.OUTPUT_FPS)
        msg = str(e.value)
        assert msg.startswith(f"{limit.flag} ") and "must be" in msg, msg
        lo = str(limit.lo) if limit.integer else f"{limit.lo:g}"
        assert f"from {lo} to" in msg, msg
    for text in accepted:
        args = parser.parse_args([*base, f"{limit.flag}={text}", "--no-interpolate"])
        if key == "dist_timeout":
            limit.check(args.dist_timeout, limit.flag)
        else:
            preflight.check_settings(_settings(args), config.GENERATED_FPS)


def _settings(args) -> pipeline.AnimateSettings:
    return pipeline.AnimateSettings(steps=args.steps, seed=args.seed, min_resolution=args.min_resolution,
                                    dynamic_scale=args.dynamic_scale, interpolate=not args.no_interpolate,
                                    max_seconds=args.max_seconds, window_batch=args.window_batch,
                                    paste_feather=args.paste_feather)


def test_limit_check_refuses_what_is_not_a_number():
    steps = LIMITS["steps"]
    for bad in (True, "25", None, 2.5, float("nan"), [25]):
        with pytest.raises(ValueError, match=r"steps .* must be a whole number from 1 to 1000"):
            steps.check(bad, "steps")
    assert steps.check(25.0, "steps") == 25 and isinstance(steps.check(np.int64(7), "steps"), int)
    assert LIMITS["audio_scale"].check(np.float32(0.5), "audio_scale") == 0.5


# ----------------------------------------------------------------------------------------------
# Items 16-18: the CLI, before anything loads
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("limit_inputs")
    return selftest.write_portrait(d / "p.png"), selftest.write_voice(d / "v.wav")


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: refusals must come first."""
    def loaded(*_a, **_k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(weights, "load_sonic_models", loaded)
    monkeypatch.setattr(face, "load_detector", loaded)


def _cli(capsys, tmp_path, image, voice, *extra, models: Path | None = None) -> tuple[int, str]:
    out = tmp_path / "out" / "o.mp4"
    models = models or tmp_path / "no_models"  # empty: a check made after loading would exit 3 instead
    code = cli.main(["-q", "animate", str(image), str(voice), "-o", str(out), "--models", str(models), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("args, pattern", [
    (["--steps", "1000000000"],  # item 16: the node caps steps at 1000; this run allocated 23 GB
     r"^error: --steps 1000000000 is out of range: must be a whole number from 1 to 1000 \(denoising steps"),
    (["--dynamic-scale", "1e30"],  # item 17: motion buckets of 1.4e31
     r"^error: --dynamic-scale 1e\+30 is out of range: must be a finite number from 0 to 10 \(0\.5 mild"),
    (["--seed", "-1"], r"^error: --seed -1 is out of range: must be a whole number from 0 to 18446744073709551615"),
    (["--window-batch", "65"], r"^error: --window-batch 65 is out of range: must be a whole number from 0 to 64"),
    (["--min-resolution", "8192"], r"^error: --min-resolution 8192 is out of range: .* from 64 to 4096"),
    (["--max-seconds", "1e9"], r"^error: --max-seconds 1000000000\.0 is out of range: .* from 0 to 36000"),
    (["--dist-timeout", "nan"], r"^error: --dist-timeout nan must be a finite number from 1 to 604800"),
    (["--dist-timeout", "0"], r"^error: --dist-timeout 0\.0 is out of range"),
])
def test_cli_numbers_past_the_node_limits(inputs, tmp_path, capsys, no_loading, args, pattern):
    code, err = _cli(capsys, tmp_path, *inputs, *args)
    assert code == 2 and re.search(pattern, err), err
    assert err.count("\n") == 1
    assert os.listdir(tmp_path) == []  # no output folder, no resume folder, no temp file


def test_one_frame_with_rife_is_refused_before_loading(inputs, tmp_path, capsys, no_loading):
    """Item 18: --max-seconds 0.08 (one frame) with RIFE on used to sample fully, then stop."""
    code, err = _cli(capsys, tmp_path, *inputs, "--max-seconds", "0.08")
    assert code == 2, err
    assert "gives 1 video frame(s)" in err and "needs at least 2" in err and "--no-interpolate" in err, err
    assert os.listdir(tmp_path) == []


def test_short_audio_file_with_rife_is_refused_before_loading(tmp_path, capsys, inputs, no_loading):
    """The same for a 0.1 s file without --max-seconds: known once the audio is read, before any model."""
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:  # 0.1 s of a 300 Hz sine, 16-bit mono 16 kHz, made here (no sox)
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(2 * np.pi * 300 * np.arange(1600) / 16000) * 8000).astype("<i2").tobytes())
    code, err = _cli(capsys, tmp_path, inputs[0], short)
    assert code == 2 and "gives 1 video frame(s)" in err and "--no-interpolate" in err, err
    assert sorted(os.listdir(tmp_path)) == ["short.wav"]


def test_one_frame_without_rife_passes_the_check(inputs, tmp_path, capsys):
    """--no-interpolate: no refusal for the frame count; this run then stops at the empty models folder."""
    code, err = _cli(capsys, tmp_path, *inputs, "--max-seconds", "0.08", "--no-interpolate")
    assert code == 3 and "weight file(s) missing" in err and "video frame" not in err, err


# ----------------------------------------------------------------------------------------------
# Item 19: node numbers, NaN included, before the UNet loads
# ----------------------------------------------------------------------------------------------
class _Unloadable:
    dtype = torch.float32

    def load(self, name):
        raise AssertionError(f"{name} was loaded before the refusal")


def _sampler_inputs(mask: torch.Tensor | None = None) -> dict:
    image = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64) if mask is None else mask
    return dict(sonic_model=_Unloadable(), vae=None, clip_vision=None, image=image, face_mask=mask,
                sonic_audio=SimpleNamespace(cond_tokens=torch.zeros(5, 2, 2), num_frames=5, fps=12.5),
                sonic_motion=SimpleNamespace(buckets=torch.zeros(5, 2)))


def _face_mask() -> torch.Tensor:
    m = torch.zeros(1, 64, 64)
    m[:, 16:48, 16:48] = 1.0
    return m


@pytest.mark.parametrize("name, value, pattern", [
    ("min_audio_guidance", float("nan"), r"min_audio_guidance nan must be a finite number from 0 to 100"),
    ("max_appearance_guidance", float("inf"), r"max_appearance_guidance inf must be a finite number"),
    ("fps_conditioning", float("nan"), r"fps_conditioning nan must be a finite number from 0 to 120 "
                                       r"\(official 12\.5\)"),
    ("audio_scale", -1.0, r"audio_scale -1\.0 is out of range: must be a finite number from 0 to 10"),
    ("steps", 10**9, r"steps 1000000000 is out of range: must be a whole number from 1 to 1000"),
    ("seed", -5, r"seed -5 is out of range"),
    ("window_batch", float("nan"), r"window_batch nan must be a whole number from 0 to 64"),
])
def test_sampler_refuses_nan_and_out_of_range_before_loading(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        SonicSampler().sample(**_sampler_inputs(_face_mask()), **{name: value})


def test_sampler_refuses_an_all_zero_face_mask_before_loading():
    """Decided: a refusal, not a warning. The mask multiplies the audio attention, so an empty one is
    exactly audio_scale 0 (nothing follows the speech); the deliberate case has that control."""
    with pytest.raises(ValueError) as e:
        SonicSampler().sample(**_sampler_inputs(torch.zeros(1, 64, 64)))
    msg = str(e.value)
    assert "face_mask (1, 64, 64) is all zero" in msg and "Face Mask Detect" in msg and "audio_scale to 0" in msg
    with pytest.raises(ValueError, match="NaN or inf"):
        SonicSampler().sample(**_sampler_inputs(torch.full((1, 64, 64), float("nan"))))
    with pytest.raises(AssertionError, match="unet was loaded"):  # a real mask passes every check
        SonicSampler().sample(**_sampler_inputs(_face_mask()))


def test_other_nodes_refuse_nan_before_heavy_work(tmp_path, monkeypatch):
    from nodes import runtime
    from nodes.nodes_face import SonicFaceMaskDetect
    from nodes.nodes_motion import SonicMotionBucketPredict

    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    audio = SimpleNamespace(bucket_windows=None)
    with pytest.raises(ValueError, match=r"fixed_head_bucket nan must be a finite number from -1 to 1024"):
        SonicMotionBucketPredict().predict(_Unloadable(), audio, None, None, fixed_head_bucket=float("nan"))
    with pytest.raises(ValueError, match=r"max_seconds nan must be a finite number"):
        SonicWhisperAudioEncode().encode(_Unloadable(), {"waveform": torch.zeros(1, 1, 16000),
                                                         "sample_rate": 16000}, float("nan"))
    with pytest.raises(ValueError, match=r"confidence nan must be a finite number from 0\.01 to 0\.99"):
        SonicFaceMaskDetect().detect(torch.rand(1, 64, 64, 3), "none", True, 0.5, 1.1, float("nan"), "error")
    with pytest.raises(ValueError, match=r"frame_rate nan must be a finite number from 0\.01 to 1000"):
        nodes_video.SonicFrameInterpolate().interpolate(torch.rand(2, 8, 8, 3), "missing.pkl", 2, float("nan"))
    with pytest.raises(ValueError, match=r"frame_rate inf must be a finite number"):
        nodes_video.SonicVideoCombine().combine(torch.rand(2, 8, 8, 3), float("inf"), "Sonic/x")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Item 20: a 16-channel LATENT, before any decode
# ----------------------------------------------------------------------------------------------
class _NoDecode:
    decode_chunk_size = 8
    latent_channels = config.LATENT_CHANNELS

    def decode(self, *_a, **_k):
        raise AssertionError("decoded before the refusal")


def test_sixteen_channel_latent_is_refused_before_decoding(tmp_path, monkeypatch):
    from nodes import runtime

    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    latent = {"samples": torch.randn(6, 16, 8, 8)}  # an SD3 / Flux / Wan latent
    for call, what in ((lambda: nodes_long.SonicLatentToVideo().save(latent, _NoDecode(), 12.5, "none", 2,
                                                                      "Sonic/x"), "Latent To Video"),
                       (lambda: nodes_long.SonicLatentSegment().decode(latent, _NoDecode(), 96, 0), "Latent Segment")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{what}: the LATENT has 16 channels (samples (6, 16, 8, 8))"), msg
        assert "Sonic / SVD-xt latents have 4" in msg and "SVD-xt VAE" in msg and "Sonic Sampler" in msg
    assert os.listdir(tmp_path) == []


def test_vae_decode_of_a_sixteen_channel_latent_names_the_channels():
    """ComfyUI's VAE Decode hands any latent to the SVD VAE: a sentence, not a conv error."""
    from sonic_core.models import svd
    from sonic_core.selftest import TINY_VAE

    vae = svd.SVDVAE(svd.build_vae(TINY_VAE).eval())
    with pytest.raises(ValueError, match=r"the latent has 16 channels .* decodes 4-channel latents: connect the "
                                         r"Sonic Sampler's latent"):
        vae.decode(torch.randn(2, 16, 4, 4))


def test_one_latent_with_rife_is_refused_before_rife_loads(tmp_path, monkeypatch):
    from nodes import runtime

    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    monkeypatch.setattr(nodes_long, "_load_rife", lambda name: pytest.fail("RIFE loaded before the refusal"))
    with pytest.raises(ValueError, match=r"RIFE needs at least 2 frames to interpolate, got 1: .*rife_model none"):
        nodes_long.SonicLatentToVideo().save({"samples": torch.randn(1, 4, 4, 4)}, _NoDecode(), 12.5,
                                             "RIFE/flownet.pkl", 2, "Sonic/x")
    monkeypatch.setattr(nodes_video, "_load_rife", lambda name: pytest.fail("RIFE loaded before the refusal"))
    with pytest.raises(ValueError, match=r"got 1: .*bypass Frame Interpolate"):
        nodes_video.SonicFrameInterpolate().interpolate(torch.rand(1, 8, 8, 3), "RIFE/flownet.pkl", 2, 12.5)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Item 10: integer PCM, one rule for every AUDIO input
# ----------------------------------------------------------------------------------------------
def _pcm(dtype: torch.dtype, n: int = 16000) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer PCM [1,1,n], the float waveform it stands for)."""
    x = 0.4 * torch.sin(torch.arange(n) / 16000 * 2 * math.pi * 220)[None, None]
    if dtype == torch.uint8:
        return (x * 128 + 128).round().to(torch.uint8), x
    scale = -float(torch.iinfo(dtype).min)
    return (x * scale).round().to(dtype), x


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8])
def test_whisper_audio_encode_takes_integer_pcm(sonic_model, dtype):  # noqa: F811
    pcm, x = _pcm(dtype)
    converted = audio_mod.float_waveform(pcm)
    assert converted.dtype == torch.float32
    assert float((converted - x).abs().max()) < 1 / 127  # one uint8 step: the coarsest of the three
    (from_int,) = SonicWhisperAudioEncode().encode(sonic_model, {"waveform": pcm, "sample_rate": 16000})
    (from_float,) = SonicWhisperAudioEncode().encode(sonic_model, {"waveform": converted, "sample_rate": 16000})
    assert from_int.waveform.dtype == torch.float32 and torch.equal(from_int.waveform, from_float.waveform)
    torch.testing.assert_close(from_int.cond_tokens, from_float.cond_tokens, rtol=0, atol=1e-6)  # same input


def test_video_combine_uses_the_same_rule(monkeypatch):
    """Video Combine / Latent To Video convert with audio.float_waveform, the rule Whisper Audio Encode uses."""
    from sonic_core import video

    calls = []
    real = audio_mod.float_waveform
    monkeypatch.setattr(audio_mod, "float_waveform", lambda w: calls.append(w.dtype) or real(w))
    pcm, _x = _pcm(torch.int16)
    wave, sr = video._audio_array((pcm[0], 16000))
    assert calls == [torch.int16] and wave.dtype == np.float32 and sr == 16000
    np.testing.assert_array_equal(wave, real(pcm)[0].numpy())
    with pytest.raises(ValueError, match="audio samples are bool"):
        audio_mod.float_waveform(torch.zeros(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Item 9: the cap applies while decoding
# ----------------------------------------------------------------------------------------------
LONG_SECONDS = 600  # 10 minutes, 48 kHz stereo
LONG_RATE = 48000


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed (apt-get install sox): no 10-minute file to cap")
    path = tmp_path_factory.mktemp("long_audio") / "ten_minutes.flac"
    subprocess.run(["sox", "-n", "-r", str(LONG_RATE), "-c", "2", "-b", "16", str(path), "synth", str(LONG_SECONDS),
                    "sine", "220", "sine", "330", "vol", "0.5"], check=True, timeout=300)
    return path


def test_capped_read_decodes_only_what_the_cap_needs(long_file, monkeypatch):
    converted = []
    real = audio_mod.pcm_to_float
    monkeypatch.setattr(audio_mod, "pcm_to_float", lambda a: converted.append(a.shape[-1]) or real(a))
    tracemalloc.start()
    try:
        wave, rate = pipeline.read_audio(long_file, max_seconds=2.0)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    needed = audio_mod.source_samples_needed(2.0, LONG_RATE)
    assert needed == (30 + config.DECODE_MARGIN_S) * LONG_RATE  # one whisper chunk and the margin
    assert rate == LONG_RATE and wave.shape == (1, 2, needed)
    assert sum(converted) == needed  # samples decoded and converted: 31 s of the 600
    whole = LONG_SECONDS * LONG_RATE * 2 * 4  # bytes of the whole file as float32 (230 MB)
    # measured: 24.0 MB (31 s of stereo float32 in chunks + their concatenation); the uncapped read
    # of this file peaks at 440 MB (the same for all 10 minutes)
    assert peak < 64 * 2**20 < whole / 3, peak


def test_capped_read_gives_the_values_of_the_whole_read(long_file):
    """The samples the capped run uses equal those of a whole read, up to the resampler: each of the
    needed whisper chunks still sees its full 30 s."""
    capped, rate = pipeline.read_audio(long_file, max_seconds=31.3)  # two chunks
    n = audio_mod.source_samples_needed(31.3, rate)
    assert capped.shape[-1] == n == (60 + config.DECODE_MARGIN_S) * rate
    head = _decode_head(long_file, n)  # [C, n] straight from PyAV, no cap logic
    np.testing.assert_array_equal(capped[0].numpy(), head)
    keep = 2 * config.N_SAMPLES_CHUNK  # 16 kHz samples of the two chunks
    a = audio_mod.to_mono_16k(capped, rate)[:keep]
    b = audio_mod.to_mono_16k(torch.from_numpy(_decode_head(long_file, n + 10 * rate))[None], rate)[:keep]
    # soxr's filter reaches a few ms: with the 1 s margin the two agree; measured max |a - b| = 0.0
    assert float(np.abs(a - b).max()) < 1e-6


def _decode_head(path, n: int) -> np.ndarray:
    import av

    chunks, held = [], 0
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.audio[0]):
            arr = frame.to_ndarray()  # [C,n] planar or [1,n*C] packed
            if not frame.format.is_planar:
                arr = arr.reshape(-1, len(frame.layout.channels)).T  # [C,n]
            chunks.append(audio_mod.pcm_to_float(arr))
            held += arr.shape[1]
            if held >= n:
                break
    return np.concatenate(chunks, axis=1)[:, :n]


def test_capped_read_does_not_warn_of_truncation(long_file, caplog):
    with caplog.at_level("INFO", logger="sonic_core"):
        pipeline.read_audio(long_file, max_seconds=2.0)
    assert "truncated" not in caplog.text and "read the first 31.0 s" in caplog.text


def test_run_estimate_counts_the_source_audio_it_holds(long_file):
    wave, rate = pipeline.read_audio(long_file, max_seconds=2.0)
    settings = pipeline.AnimateSettings(max_seconds=2.0, min_resolution=64)
    est = preflight.estimate_run((64, 64), wave.shape[-1], rate, settings, torch.float32, torch.device("cpu"),
                                 channels=wave.shape[1])
    assert est.parts["source audio (float32)"] == (wave.numel() * 4, "host")
    assert est.frames == 25  # 2 s at 12.5 fps


def test_steps_past_the_limit_from_a_real_process(inputs, tmp_path):
    """Item 16 through ``python -m sonic_core``: one line, exit 2, nothing written (the run that was
    accepted allocated 23 GB before the OOM killer ended it)."""
    import sys

    from tests._golden import REPO

    out = tmp_path / "o.mp4"
    run = subprocess.run([sys.executable, "-m", "sonic_core", "animate", str(inputs[0]), str(inputs[1]), "-o",
                          str(out), "--models", str(tmp_path / "none"), "--steps", "1000000000"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --steps 1000000000 is out of range: must be a whole number from 1 to 1000 (denoising steps; "
        "official 25)"], run.stderr
    assert os.listdir(tmp_path) == []
