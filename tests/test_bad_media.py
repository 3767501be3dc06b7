"""Hostile and careless media (issue 13): frames, images and audio that used to encode into a black
or distorted file, or ended in a raw library error. Each gets a clear error or a correct conversion
with a warning, and no file (final or temporary) is left behind by a refusal."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from nodes import runtime
from nodes.nodes_video import SonicVideoCombine
from sonic_core import config, video
from sonic_core.video import remove_stale_partials, save_video, write_video
from tests._golden import REPO


def _frames(n: int, h: int = 32, w: int = 32, level: float = 0.5) -> torch.Tensor:
    y = torch.linspace(0, 1, h).view(1, h, 1, 1)
    return (level * 0.5 + level * 0.5 * y).expand(n, h, w, 3).contiguous()  # [n,h,w,3] in 0..level


def _tone(peak: float, seconds: float = 1.0, sr: int = 48000) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return (peak * torch.sin(2 * math.pi * 440 * t))[None]  # [1,T]


def _decoded_audio(path: str) -> np.ndarray:
    with av.open(path) as c:
        chunks = [f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])]
    return np.concatenate(chunks)


def _decoded_first_frame(path: str) -> np.ndarray:
    with av.open(path) as c:
        return next(c.decode(c.streams.video[0])).to_ndarray(format="rgb24")


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def combine(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    node = SonicVideoCombine()
    return lambda images, audio=None, prefix="bad/clip", fmt="h264-mp4": node.combine(
        images, 25.0, prefix, fmt, 20, "yuv420p", audio=audio)["result"][0]


# ----------------------------------------------------------------------------------------------
# 2. temp files of a killed encode are removed later; live ones and other files never
# ----------------------------------------------------------------------------------------------
_SLOW_ENCODE = r"""
import sys, time, torch
from sonic_core.video import save_video
def frames():
    for i in range(100000):
        if i == 3:
            print("encoding", flush=True)
        time.sleep(0.02)
        yield torch.full((32, 32, 3), 0.5)
save_video(frames(), sys.argv[1], "clip", 25.0)
"""


def _start_slow_encode(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ENCODE, str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "encoding"
    return proc


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".partial." in p.name)


def test_killed_encode_partial_is_removed_later_but_live_and_foreign_files_stay(tmp_path):
    killed = _start_slow_encode(tmp_path)
    killed.send_signal(signal.SIGKILL)  # an OOM kill: no cleanup code runs
    killed.wait(30)
    (stale,) = _partials(tmp_path)
    assert stale.name.startswith(".clip.")  # what the killed encode left
    old = time.time() - config.PARTIAL_STALE_AGE_S - 60
    os.utime(stale, (old, old))

    live = _start_slow_encode(tmp_path)  # another process encoding into the same folder right now
    try:
        (live_file,) = [p for p in _partials(tmp_path) if p != stale]
        os.utime(live_file, (old, old))  # even an old-looking live file is kept: its writer holds the lock
        young = tmp_path / ".young.0123456789ab.partial.mp4"  # a killed encode, but only just
        young.write_bytes(b"x")
        foreign = [tmp_path / ".notes.partial.mp4", tmp_path / "clip.0123456789ab.partial.mp4",
                   tmp_path / ".clip.0123456789ab.partial.mov"]
        for p in foreign:
            p.write_bytes(b"not ours")
            os.utime(p, (old, old))
        target = tmp_path / "elsewhere.bin"
        target.write_bytes(b"keep")
        link = tmp_path / ".link.0123456789ab.partial.mp4"
        link.symlink_to(target)
        os.utime(link, (old, old), follow_symlinks=False)

        path, _, name = save_video(_frames(3), str(tmp_path), "next", 25.0)  # a later run cleans up
        assert not stale.exists()
        assert live_file.exists() and young.exists() and link.is_symlink() and target.read_bytes() == b"keep"
        assert all(p.exists() for p in foreign)
        assert _decoded_first_frame(path).shape == (32, 32, 3)
    finally:
        live.kill()
        live.wait(30)


def test_remove_stale_partials_in_a_missing_folder_does_nothing(tmp_path):
    assert remove_stale_partials(str(tmp_path / "absent")) == []


# ----------------------------------------------------------------------------------------------
# 5. integer PCM converted, loud float audio warned about, unsigned 8-bit WAV read without offset
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, scale, offset", [(torch.int16, 32768, 0), (torch.int32, 2**31, 0),
                                                   (torch.uint8, 128, 128)])
def test_integer_pcm_into_video_combine_keeps_its_level(combine, dtype, scale, offset):
    wave_i = (_tone(0.30) * scale + offset).round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    path = combine(_frames(25), {"waveform": wave_i.to(dtype)[None], "sample_rate": 48000})
    out = _decoded_audio(path)
    peak = float(np.abs(out[len(out) // 4: 3 * len(out) // 4]).max())
    assert 0.25 < peak < 0.35, f"{dtype}: a 0.30 peak came out at {peak:.3f}"
    assert abs(float(out.mean())) < 0.02  # no DC offset


def test_loud_float_audio_warns_with_its_peak(combine, caplog):
    with caplog.at_level(logging.WARNING, logger="sonic_core.video"):
        combine(_frames(25), {"waveform": _tone(1.7)[None], "sample_rate": 48000})
    assert "peaks at 1.700" in caplog.text and "clipped" in caplog.text


def _write_u8_wav(path: Path, peak: float, seconds: float = 1.0, sr: int = 16000) -> None:
    t = np.arange(int(seconds * sr)) / sr
    data = np.round(128 + 127 * peak * np.sin(2 * np.pi * 220 * t)).astype(np.uint8)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(1)
        f.setframerate(sr)
        f.writeframes(data.tobytes())


def test_cli_reads_unsigned_8bit_wav_without_dc_offset(tmp_path):
    from sonic_core.pipeline import read_audio

    _write_u8_wav(tmp_path / "u8.wav", 0.5)
    wave_t, sr = read_audio(tmp_path / "u8.wav")
    assert sr == 16000
    assert abs(float(wave_t.mean())) < 0.01, "unsigned 8-bit read with a DC offset"
    assert 0.45 < float(wave_t.abs().max()) < 0.55


# ----------------------------------------------------------------------------------------------
# 6. NaN frames / pixels, 0..255 and uint8 images, NaN motion scales, absurd sample rates
# ----------------------------------------------------------------------------------------------
def test_nan_frames_are_refused_and_nothing_is_written(combine, tmp_path):
    frames = _frames(5)
    frames[2, 3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"frame 2 has 1 NaN or infinite pixel.*bf16 or fp32"):
        combine(frames)
    assert _listing(tmp_path / "bad") == []
    frames[2] = float("inf")
    with pytest.raises(ValueError, match="frame 2"):
        write_video(frames, str(tmp_path / "x.mp4"), 25.0)
    assert not (tmp_path / "x.mp4").exists() and _listing(tmp_path) == ["bad"]


@pytest.mark.parametrize("kind", ["uint8", "float255"])
def test_0_255_frames_are_converted_with_a_warning(combine, caplog, kind):
    frames = _frames(4, level=1.0)  # 0.5..1.0
    images = (frames * 255).round().to(torch.uint8) if kind == "uint8" else frames * 255
    with caplog.at_level(logging.WARNING, logger="sonic_core.video"):
        path = combine(images)
    assert "0..255" in caplog.text and "divided by 255" in caplog.text
    got = _decoded_first_frame(path).astype(np.float32) / 255
    assert np.abs(got - frames[0].numpy()).mean() < 0.02  # the picture, not a white frame


def test_frames_far_beyond_255_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"values up to 1000.*0\.\.1"):
        write_video(_frames(2) * 2000, str(tmp_path / "x.mp4"), 25.0)
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 8. NaN audio into Video Combine: a clear error, not av.error.ArgumentError
# ----------------------------------------------------------------------------------------------
def test_nan_audio_into_video_combine(combine, tmp_path):
    audio = _tone(0.3)
    audio[0, 24000] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or infinite samples \(first at 0\.500 s\).*nothing was"):
        combine(_frames(25), {"waveform": audio[None], "sample_rate": 48000})
    assert _listing(tmp_path / "bad") == []


@pytest.mark.parametrize("rate", [1, 100, 3999])
def test_absurd_sample_rate_into_video_combine(combine, tmp_path, rate):
    with pytest.raises(ValueError, match=rf"sample_rate is {rate} Hz, below the 4000 Hz minimum"):
        combine(_frames(25), {"waveform": _tone(0.3, sr=300)[None], "sample_rate": rate})
    assert not (tmp_path / "bad").exists() or _listing(tmp_path / "bad") == []  # refused before any folder


# ----------------------------------------------------------------------------------------------
# 10. read-only output folder, a 300-character prefix, a 17000-pixel-wide frame
# ----------------------------------------------------------------------------------------------
def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere it has mode bits against; /sys refuses new files
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_read_only_output_folder_names_the_path(tmp_path):
    folder = _read_only_folder(tmp_path)
    with pytest.raises(OSError, match=rf"cannot write in the output folder {folder} .*writable"):
        save_video(_frames(2), str(folder), "clip", 25.0)
    with pytest.raises(OSError, match=rf"cannot (write in|create) the output folder {folder}"):
        save_video(_frames(2), str(folder), "sub/clip", 25.0)


def test_300_character_prefix_is_refused_before_encoding(combine, tmp_path):
    with pytest.raises(ValueError, match=r"300 bytes long.*255 bytes per name.*shorten it to at most 229"):
        combine(_frames(2), prefix="x" * 300)
    with pytest.raises(ValueError, match=r"folder name.*300 bytes"):
        combine(_frames(2), prefix="d" * 300 + "/clip")
    with pytest.raises(ValueError, match="output file name"):
        write_video(_frames(2), str(tmp_path / ("y" * 240 + ".mp4")), 25.0)
    assert _listing(tmp_path) == []  # no folder, no temp file
    path = combine(_frames(2), prefix="z" * 229)  # the longest name that fits is fine
    assert os.path.basename(path) == "z" * 229 + "_00001_.mp4"


def test_17000_pixel_wide_frame_names_the_limit(tmp_path):
    frames = torch.full((1, 16, 17000, 3), 0.5)
    with pytest.raises(ValueError, match=r"17000x16 px; libx264 \(mp4\) encodes at most 16384 px.*h265-mp4"):
        write_video(frames, str(tmp_path / "wide.mp4"), 25.0)
    assert _listing(tmp_path) == []
    assert video.FORMATS["vp9-webm"].max_side >= 17000


# ----------------------------------------------------------------------------------------------
# 7. truncated wav / mp3: a warning with the declared and the decoded duration
# ----------------------------------------------------------------------------------------------
def _speech(tmp_path: Path) -> Path:
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: no real speech")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Sonic turns one portrait and one voice into a talking "
                    "video. The audio drives the motion of the head."], check=True, capture_output=True)
    return path


def _to_mp3(src: Path, dst: Path) -> Path:
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        out = o.add_stream("libmp3lame", rate=i.streams.audio[0].rate, layout="mono")
        for frame in i.decode(audio=0):
            frame.pts = None
            for p in out.encode(frame):
                o.mux(p)
        for p in out.encode(None):
            o.mux(p)
    return dst


@pytest.mark.parametrize("kind", ["wav", "mp3"])
def test_truncated_audio_warns_with_declared_and_decoded_seconds(tmp_path, caplog, kind):
    from sonic_core.pipeline import read_audio

    full = _speech(tmp_path)
    if kind == "mp3":
        full = _to_mp3(full, tmp_path / "speech.mp3")
    whole, sr = read_audio(full)
    seconds = whole.shape[-1] / sr
    cut = tmp_path / f"cut.{kind}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="sonic_core.pipeline"):
        part, sr2 = read_audio(full)
        assert "truncated" not in caplog.text  # the complete file reads without a word
        part, sr2 = read_audio(cut)
    got = part.shape[-1] / sr2
    assert got < seconds / 2
    assert f"declares {seconds:.2f} s" in caplog.text and f"only {got:.2f} s could be decoded" in caplog.text
    assert "truncated" in caplog.text and str(cut) in caplog.text


# ----------------------------------------------------------------------------------------------
# 3. the working size is bounded before any allocation, in every path that computes it
# ----------------------------------------------------------------------------------------------
def test_working_size_bound_names_the_size_and_what_to_do():
    from sonic_core.image import working_size

    with pytest.raises(ValueError) as e:
        working_size(4000, 100, 512)
    msg = str(e.value)
    assert "4000x100 image gives a 20480x512 px working size (10.5 MP) at min_resolution 512" in msg
    assert f"{config.MAX_WORKING_SIDE} px per side" in msg and "crop the image" in msg
    assert "lower min_resolution to 64 or less" in msg
    with pytest.raises(ValueError, match=r"4096x4096 px working size.*lower min_resolution to 2048 or less"):
        working_size(1000, 1000, 4096)
    assert working_size(1000, 1000, 2048) == (2048, 2048)  # the limit itself runs
    assert working_size(1920, 1080, 512) == (896, 512)  # ordinary sizes are untouched


def test_working_size_is_refused_in_motion_and_sampler_before_allocating(monkeypatch):
    from types import SimpleNamespace

    from sonic_core import motion, sampler

    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("noise drawn"))
    image = torch.full((1, 100, 4000, 3), 0.5)
    with pytest.raises(ValueError, match="20480x512 px working size"):
        motion.reference_embeds(None, image, 512)  # never reaches the CLIP encoder
    with pytest.raises(ValueError, match="20480x512 px working size"):
        sampler.generate(torch.nn.Linear(1, 1), None, None, image, torch.ones(1, 100, 4000),
                         SimpleNamespace(num_frames=8), SimpleNamespace(buckets=torch.zeros(8, 2)))


# ----------------------------------------------------------------------------------------------
# 6 (continued). images and motion scales into the nodes
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def portrait(tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    from sonic_core import selftest
    from sonic_core.pipeline import read_image

    return read_image(selftest.write_portrait(tmp_path / "p.png"))  # [1,H,W,3] in 0..1, [1,H,W]


def test_nan_pixels_into_face_mask_detect(portrait):
    from nodes.nodes_face import SonicFaceMaskDetect

    image, mask = portrait
    image[0, 10, 10, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image has 1 NaN or infinite pixel values.*check the node"):
        SonicFaceMaskDetect().detect(image, "none", False, 0.5, 1.1, 0.5, "error", mask=mask)


@pytest.mark.parametrize("kind", ["uint8", "float255"])
def test_0_255_images_into_face_mask_detect_are_converted(portrait, caplog, kind):
    from nodes.nodes_face import SonicFaceMaskDetect

    image, mask = portrait
    hostile = (image * 255).round().to(torch.uint8) if kind == "uint8" else image * 255
    with caplog.at_level(logging.WARNING, logger="sonic_core.image"):
        out, face_mask, _box, _ = SonicFaceMaskDetect().detect(hostile, "none", False, 0.5, 1.1, 0.5, "error",
                                                            mask=mask)
    assert "divided by 255" in caplog.text
    assert out.dtype == torch.float32 and float(out.max()) <= 1.0
    assert float((out - image).abs().max()) < 1 / 255 + 1e-6  # the same picture, not a white one


@pytest.mark.parametrize("field", ["head", "expression", "fixed"])
def test_nan_motion_scales_are_refused(field):
    from types import SimpleNamespace

    from sonic_core.motion import predict_motion

    kwargs = {"head": {"head_scale": float("nan")}, "expression": {"expression_scale": float("inf")},
              "fixed": {"fixed_head": float("nan")}}[field]
    audio = SimpleNamespace(num_frames=4)
    with pytest.raises(ValueError, match=r"(head_scale|expression_scale|fixed_head) (nan|inf) must be a finite "):
        predict_motion(torch.nn.Linear(1, 1), audio, torch.zeros(1, 8), **kwargs)


def test_nan_scale_into_motion_node_names_the_widget():
    from types import SimpleNamespace

    from nodes.nodes_motion import SonicMotionBucketPredict

    with pytest.raises(ValueError, match=r"head_motion_scale nan must be a finite number from 0 to 10"):
        SonicMotionBucketPredict().predict(None, SimpleNamespace(bucket_windows=None), None, None,
                                           head_motion_scale=float("nan"))


@pytest.mark.parametrize("rate", [1, 300, 3999.5])
def test_absurd_sample_rate_into_whisper_encode(rate):
    from sonic_core import audio

    with pytest.raises(ValueError, match=rf"sample_rate is {rate:g} Hz, below the 4000 Hz minimum"):
        audio.check_waveform(torch.zeros(1, 300), rate)
    audio.check_waveform(torch.zeros(1, 8000), 8000)  # telephone audio is fine


def test_sigterm_during_a_cli_encode_leaves_no_temp_file(tmp_path):
    """docker stop sends SIGTERM: the CLI's handler turns it into SystemExit, so the temp file goes."""
    script = "import signal; from sonic_core import cli; signal.signal(signal.SIGTERM, cli._exit_on_sigterm)\n"
    proc = subprocess.Popen([sys.executable, "-c", script + _SLOW_ENCODE, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "encoding"
    assert _partials(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert _listing(tmp_path) == []


def test_sampler_node_refuses_the_working_size_before_loading_the_unet():
    from types import SimpleNamespace

    from nodes.nodes_sampler import SonicSampler

    class Untouchable:
        dtype = torch.float32

        def load(self, name):
            raise AssertionError("the UNet was loaded before the working size was checked")

    audio = SimpleNamespace(cond_tokens=None, num_frames=8, fps=12.5)
    with pytest.raises(ValueError, match="20480x512 px working size"):
        SonicSampler().sample(Untouchable(), None, None, torch.zeros(1, 100, 4000, 3), torch.ones(1, 100, 4000),
                              audio, SimpleNamespace(buckets=torch.zeros(8, 2)))
