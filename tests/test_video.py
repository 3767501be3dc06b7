"""Encoding with PyAV, decoded back: counts, rates, sizes, audio length, metadata, safe file names."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from nodes import runtime
from nodes.nodes_video import SonicVideoCombine
from tests._interrupt import cancel_during_next_job
from sonic_core.video import FORMATS, next_counter, save_video, split_prefix, write_video

SPEECH = ("Sonic turns one portrait and one voice into a talking video. The audio drives the motion "
          "of the head and the face, and the frames follow the sound from the first word to the last.")


def _frames(n: int, h: int, w: int) -> torch.Tensor:
    """Smooth moving colour ramps [n,h,w,3] in 0..1 (compress well, decode close to the input)."""
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1) / max(n, 1)
    channels = (0.2 + 0.6 * x * (1 - t) + 0.2 * t, 0.2 + 0.6 * y + 0 * t, 0.5 + 0.3 * (x - y) * t)
    return torch.stack([c.expand(n, h, w) for c in channels], -1)  # 3 x [n,h,w] -> [n,h,w,3]


def _tone(seconds: float, sr: int, channels: int) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return (0.3 * torch.sin(2 * math.pi * 440 * t)).repeat(channels, 1)  # [C,T]


def _probe(path: str) -> dict:
    """What a player sees: frames, rate, size, audio seconds, codecs, tags."""
    with av.open(path) as c:
        v = c.streams.video[0]
        info = {"rate": v.average_rate, "codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt,
                "metadata": {k.lower(): val for k, val in c.metadata.items()}}
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    info.update(frames=len(frames), height=frames[0].shape[0], width=frames[0].shape[1], first=frames[0])
    info["audio_seconds"] = info["audio_codec"] = info["audio_rate"] = None
    with av.open(path) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_codec"], samples, rate = a.codec_context.name, 0, None
            for f in c.decode(a):
                samples, rate = samples + f.samples, f.sample_rate
            info["audio_seconds"], info["audio_rate"] = samples / rate, rate
    return info


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("audio_seconds", [0.7, 3.0])
def test_video_roundtrip_each_format(tmp_path, fmt, audio_seconds):
    n, fps, h, w = 30, 25.0, 48, 64
    frames = _frames(n, h, w)
    audio = (_tone(audio_seconds, 44100, 2), 44100)  # shorter (padded) / longer (trimmed) than 1.2 s
    path, subfolder, name = save_video(frames, str(tmp_path), "Sonic/clip", fps, audio=audio, format=fmt)
    assert (subfolder, name) == ("Sonic", f"clip_00001_.{FORMATS[fmt].ext}")
    info = _probe(path)
    assert info["frames"] == n and info["rate"] == fps
    assert (info["height"], info["width"]) == (h, w)
    err = np.abs(info["first"].astype(np.float32) / 255 - frames[0].numpy()).mean()
    assert err < 0.01, f"{fmt}: mean abs pixel error {err:.4f}"
    if FORMATS[fmt].audio_codec is None:
        assert info["audio_seconds"] is None
    else:
        assert info["audio_codec"] == {"aac": "aac", "libopus": "opus"}[FORMATS[fmt].audio_codec]
        assert abs(info["audio_seconds"] - n / fps) <= 1 / fps, (fmt, info["audio_seconds"])


@pytest.mark.parametrize("fps", [12.5, 30.0])
def test_video_fractional_and_other_rates(tmp_path, fps):
    path = write_video(_frames(10, 32, 32), str(tmp_path / "a.mp4"), fps, audio=(_tone(2, 16000, 1), 16000))
    info = _probe(path)
    assert info["frames"] == 10 and float(info["rate"]) == fps
    assert abs(info["audio_seconds"] - 10 / fps) <= 1 / fps


def test_video_odd_sizes_padded_for_420_kept_for_444(tmp_path):
    frames = _frames(6, 45, 63)
    p420 = write_video(frames, str(tmp_path / "a.mp4"), 25.0, pix_fmt="yuv420p")
    p444 = write_video(frames, str(tmp_path / "b.mp4"), 25.0, pix_fmt="yuv444p")
    i420, i444 = _probe(p420), _probe(p444)
    assert (i420["height"], i420["width"], i420["pix_fmt"]) == (46, 64, "yuv420p")
    assert (i444["height"], i444["width"], i444["pix_fmt"]) == (45, 63, "yuv444p")
    # the padding repeats the edge: the extra row/column look like the last ones
    first = i420["first"].astype(np.float32) / 255
    assert np.abs(first[:45, :63] - frames[0].numpy()).mean() < 0.01
    assert np.abs(first[45] - first[44]).mean() < 0.02 and np.abs(first[:, 63] - first[:, 62]).mean() < 0.02


def test_video_10bit_and_hevc_tag(tmp_path):
    frames = _frames(5, 32, 32)
    path = write_video(frames, str(tmp_path / "a.mp4"), 25.0, format="h265-mp4", pix_fmt="yuv420p10le")
    info = _probe(path)
    assert info["codec"] == "hevc" and info["pix_fmt"] == "yuv420p10le" and info["frames"] == 5
    assert np.abs(info["first"].astype(np.float32) / 255 - frames[0].numpy()).mean() < 0.01
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.codec_tag == "hvc1"


def test_video_bad_arguments_are_named(tmp_path):
    frames = _frames(2, 16, 16)
    with pytest.raises(ValueError, match="pix_fmt 'yuv420p10le'"):
        write_video(frames, str(tmp_path / "a.webm"), 25.0, format="vp9-webm", pix_fmt="yuv420p10le")
    with pytest.raises(ValueError, match="crf 60"):
        write_video(frames, str(tmp_path / "a.mp4"), 25.0, crf=60)
    with pytest.raises(ValueError, match="format 'avi'"):
        write_video(frames, str(tmp_path / "a.avi"), 25.0, format="avi")
    with pytest.raises(ValueError, match="frame rate 0"):
        write_video(frames, str(tmp_path / "a.mp4"), 0)
    with pytest.raises(ValueError, match="empty"):
        write_video(torch.zeros(0, 16, 16, 3), str(tmp_path / "a.mp4"), 25.0)
    with pytest.raises(ValueError, match="all frames of a video must have one size"):
        write_video([frames[0], torch.zeros(18, 16, 3)], str(tmp_path / "a.mp4"), 25.0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("prefix", ["../../x", "a/../../x", "..", "/tmp/x", "\\\\server\\share\\x",
                                    "C:\\Users\\x", "C:x", "", "  ", "a/./../.."])
def test_video_prefix_cannot_leave_output_folder(tmp_path, prefix):
    out = tmp_path / "output"
    out.mkdir()
    with pytest.raises(ValueError, match="filename_prefix"):
        save_video(_frames(2, 16, 16), str(out), prefix, 25.0)
    assert list(tmp_path.rglob("*.mp4")) == [] and os.listdir(out) == []


def test_video_prefix_subfolders_and_counter(tmp_path):
    assert split_prefix("Sonic/clip") == ("Sonic", "clip")
    assert split_prefix("a\\b//c") == ("a/b", "c")
    frames = _frames(4, 16, 16)
    p1, _, n1 = save_video(frames, str(tmp_path), "Sonic/clip", 25.0)
    before = Path(p1).read_bytes()
    p2, _, n2 = save_video(_frames(6, 16, 16), str(tmp_path), "Sonic/clip", 25.0)
    assert (n1, n2) == ("clip_00001_.mp4", "clip_00002_.mp4") and p1 != p2
    assert Path(p1).read_bytes() == before  # the first run's file is untouched
    (tmp_path / "Sonic" / "clip_00041_.png").write_bytes(b"")  # ComfyUI shares the counter across types
    assert next_counter(str(tmp_path / "Sonic"), "clip") == 42
    assert save_video(frames, str(tmp_path), "Sonic/clip", 25.0)[2] == "clip_00042_.mp4"
    with pytest.raises(FileExistsError):
        write_video(frames, p1, 25.0)
    assert Path(p1).read_bytes() == before


def test_video_cancel_mid_encode_leaves_no_file(tmp_path):
    produced = []

    def frames():  # a generator: the encoder pulls one frame at a time
        for i, f in enumerate(_frames(40, 32, 32)):
            produced.append(i)
            yield f

    def callback(done, total):
        assert len(produced) == done  # streaming: never more than one frame ahead
        if done == 20:
            raise KeyboardInterrupt("user cancelled")

    with pytest.raises(KeyboardInterrupt):
        save_video(frames(), str(tmp_path), "clip", 25.0, audio=(_tone(2, 16000, 1), 16000),
                   callback=callback)
    assert os.listdir(tmp_path) == []  # neither the final file nor the hidden temporary one

    def fail(done, total):
        if done == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_video(frames(), str(tmp_path / "b.webm"), 25.0, format="vp9-webm", callback=fail)
    assert os.listdir(tmp_path) == []


def test_video_node_preview_metadata_and_interrupt(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    node = SonicVideoCombine()
    prompt = {"1": {"class_type": "SonicVideoCombine", "inputs": {}}}
    workflow = {"nodes": [{"id": 1, "type": "SonicVideoCombine"}]}
    audio = {"waveform": _tone(1.0, 22050, 2)[None], "sample_rate": 22050}  # [1,C,T]
    out = node.combine(_frames(10, 32, 48), 25.0, "Sonic/node", "h264-mp4", 20, "yuv420p", audio=audio,
                       prompt=prompt, extra_pnginfo={"workflow": workflow})
    path = out["result"][0]
    assert out["ui"] == {"images": [{"filename": "node_00001_.mp4", "subfolder": "Sonic", "type": "output"}],
                         "animated": (True,)}
    assert path == os.path.join(str(tmp_path), "Sonic", "node_00001_.mp4")
    info = _probe(path)
    assert json.loads(info["metadata"]["prompt"]) == prompt
    assert json.loads(info["metadata"]["workflow"]) == workflow
    assert info["frames"] == 10 and info["audio_codec"] == "aac"
    webm = node.combine(_frames(4, 32, 48), 25.0, "Sonic/node", "vp9-webm", 32, "yuv420p",
                        prompt=prompt, extra_pnginfo={"workflow": workflow})
    assert json.loads(_probe(webm["result"][0])["metadata"]["workflow"]) == workflow
    with cancel_during_next_job(), pytest.raises(runtime.InterruptProcessingException):  # cancel mid-encode
        node.combine(_frames(10, 32, 48), 25.0, "Sonic/node", "h264-mp4", 20, "yuv420p")
    assert sorted(os.listdir(tmp_path / "Sonic")) == ["node_00001_.mp4", "node_00002_.webm"]
    with pytest.raises(ValueError, match="filename_prefix"):
        node.combine(_frames(2, 16, 16), 25.0, "../escape", "h264-mp4", 20, "yuv420p")


def _speech_wav(path) -> tuple[torch.Tensor, int]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): no real speech to mux")
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(path), SPEECH], check=True, capture_output=True)
    with wave.open(str(path)) as f:
        sr, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16 if width == 2 else np.uint8)
    assert width == 2, "espeak-ng writes 16-bit PCM"
    samples = torch.from_numpy(data.astype(np.float32) / 32768.0).view(-1, channels).T  # [T*C] -> [C,T]
    return samples, sr


def test_video_10s_512_speech_mp4(tmp_path):
    """The deliverable users play: 10 s, 512x512, 25 fps, h264 + AAC with real speech."""
    speech, sr = _speech_wav(tmp_path / "speech.wav")
    n, fps, side = 250, 25.0, 512
    y = torch.linspace(0, 1, side).view(side, 1, 1)
    x = torch.linspace(0, 1, side).view(1, side, 1)

    def frames():  # generated one by one: nothing holds all 250 frames
        for i in range(n):
            phase = 2 * math.pi * i / n
            yield torch.cat((0.5 + 0.4 * torch.sin(phase + 6 * x).expand(side, side, 1),
                             y.expand(side, side, 1) * 0.8 + 0.1,
                             0.5 + 0.4 * torch.cos(phase + 4 * y).expand(side, side, 1)), -1)  # [H,W,3]

    out = tmp_path / "output"
    path, _, name = save_video(frames(), str(out), "Sonic/speech", fps, audio=(speech, sr))
    info = _probe(path)
    assert name == "speech_00001_.mp4" and os.listdir(out / "Sonic") == [name]
    assert (info["frames"], info["rate"], info["width"], info["height"]) == (n, fps, side, side)
    # espeak-ng writes 22.05 kHz; AAC gets 48 kHz (AAC_MIN_RATE)
    assert (info["codec"], info["audio_codec"], info["audio_rate"]) == ("h264", "aac", 48000)
    assert abs(info["audio_seconds"] - n / fps) <= 1 / fps
    with av.open(path) as c:
        assert abs(float(c.duration) / av.time_base - n / fps) <= 1 / fps
