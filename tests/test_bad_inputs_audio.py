"""Issue 29 items 8, 10 and 12: audio that lies about itself, AUDIO in any layout, core numbers.

* item 8: a container header that declares less than the data holds (a hand-patched WAV data chunk
  size; a FLAC whose STREAMINFO total is patched) is read whole, with a warning naming both lengths;
  a WAV with a real chunk after its data is not mistaken for one.
* item 12: NaN/inf and absurd (1e30) samples are refused at read time naming the file (the CLI exits
  before any weight is looked for); a file of two tracks whose first is silent uses the second and
  says so.
* item 10: every AUDIO layout other nodes produce ([B, C, T], [B, T, C], [C, T], [T, C], [T], int
  PCM) reads the same in Whisper Audio Encode and Video Combine; an unreadable layout is named; the
  public sonic_core functions check their numbers through config.LIMITS as the nodes do.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sonic_core import audio as A
from sonic_core import cli, selftest
from sonic_core.pipeline import read_audio

RATE = 16000  # Hz of the files written here
SECONDS = 2.0  # s of audio they hold
DECLARED = 0.3  # s a patched header declares


def _tone(seconds: float = SECONDS, rate: int = RATE) -> np.ndarray:
    """A voice-range tone with an envelope, int16 [T]."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0.1, None)
    return (0.3 * np.sin(2 * np.pi * 180 * t) * envelope * 32767).astype(np.int16)


def _write(path: Path, tracks: list[np.ndarray], codec: str = "pcm_s16le", rate: int = RATE) -> Path:
    """Real files through PyAV: one stream per entry of ``tracks`` (int16 mono or float32 [C, T])."""
    import av

    with av.open(str(path), "w") as out:
        streams = []
        for pcm in tracks:
            layout = "mono" if pcm.ndim == 1 or pcm.shape[0] == 1 else "stereo"
            streams.append(out.add_stream(codec, rate=rate, layout=layout))
        for stream, pcm in zip(streams, tracks):
            fmt = stream.codec_context.format.name
            arr = pcm[None] if pcm.ndim == 1 else pcm
            if fmt in ("flt", "fltp"):
                arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.float32) / 32768
            if not fmt.endswith("p") and arr.shape[0] > 1:
                arr = np.ascontiguousarray(arr.T).reshape(1, -1)  # packed: [1, T*C]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout=stream.layout.name)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                out.mux(packet)
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------------------------
# item 8: headers that declare less than the data holds
# ----------------------------------------------------------------------------------------------
def test_wav_header_declaring_less_is_read_whole_and_said(tmp_path, caplog):
    whole = _write(tmp_path / "whole.wav", [_tone()])
    raw = bytearray(whole.read_bytes())
    at = raw.index(b"data")
    assert struct.unpack("<I", raw[at + 4:at + 8])[0] == int(SECONDS * RATE) * 2
    raw[at + 4:at + 8] = struct.pack("<I", int(DECLARED * RATE) * 2)  # the header now says 0.3 s
    patched = tmp_path / "patched.wav"
    patched.write_bytes(raw)
    wave, rate = read_audio(patched)
    assert rate == RATE and wave.shape == (1, 1, int(SECONDS * RATE))  # all 2 s, not 0.3
    [said] = _warnings(caplog)
    assert f"declares {DECLARED:.2f} s" in said and f"holds {SECONDS:.2f} s" in said, said
    ref, _ = read_audio(whole)
    assert torch.equal(wave, ref)  # the same samples as the unpatched file


def test_wav_with_a_chunk_after_its_data_is_not_misread(tmp_path, caplog):
    raw = bytearray(_write(tmp_path / "a.wav", [_tone()]).read_bytes())
    tail = b"LIST" + struct.pack("<I", 16) + b"INFOISFT" + struct.pack("<I", 4) + b"abc\x00"
    raw += tail
    raw[4:8] = struct.pack("<I", len(raw) - 8)  # RIFF size covers the new chunk
    (tmp_path / "b.wav").write_bytes(raw)
    wave, _ = read_audio(tmp_path / "b.wav")
    assert wave.shape[-1] == int(SECONDS * RATE) and not _warnings(caplog)


def test_flac_streaminfo_declaring_less_is_said_with_both_lengths(tmp_path, caplog):
    raw = bytearray(_write(tmp_path / "a.flac", [_tone()], codec="flac").read_bytes())
    assert raw[:4] == b"fLaC" and raw[4] & 0x7F == 0  # STREAMINFO first, its data at byte 8
    field = int.from_bytes(raw[18:26], "big")  # rate(20) channels(3) bits(5) total samples(36)
    assert field & (2**36 - 1) == int(SECONDS * RATE)
    raw[18:26] = ((field & ~(2**36 - 1)) | int(DECLARED * RATE)).to_bytes(8, "big")
    (tmp_path / "b.flac").write_bytes(raw)
    wave, _ = read_audio(tmp_path / "b.flac")
    assert wave.shape[-1] == int(SECONDS * RATE)
    [said] = _warnings(caplog)
    assert f"declares {DECLARED:.2f} s" in said and f"{SECONDS:.2f} s decode" in said, said


# ----------------------------------------------------------------------------------------------
# item 12: corrupt samples refused at read time, naming the file; two tracks
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def portrait(tmp_path_factory) -> Path:
    return selftest.write_portrait(tmp_path_factory.mktemp("portrait") / "p.png")


@pytest.mark.parametrize("value, words", [(float("nan"), "NaN or inf samples (first at sample 8000"),
                                          (float("inf"), "NaN or inf samples (first at sample 8000"),
                                          (1e30, "samples of magnitude 1e+30, beyond 1000")])
def test_cli_refuses_corrupt_samples_before_any_model(value, words, portrait, tmp_path, capsys):
    x = _tone().astype(np.float32) / 32768
    x[RATE // 2:RATE // 2 + 10] = value
    bad = _write(tmp_path / "bad.wav", [x[None]], codec="pcm_f32le")
    logger = logging.getLogger("sonic_core")
    handlers = list(logger.handlers)
    try:  # --models names no folder: the run stops on the audio, before any weight is looked for
        code = cli.main(["-q", "animate", str(portrait), str(bad), "-o", str(tmp_path / "o.mp4"),
                         "--models", str(tmp_path / "none")])
    finally:
        logger.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 2 and f"error: audio {bad} has " in err and words in err, err
    assert "audio2bucket" not in err and "download" not in err


def test_two_tracks_with_a_silent_first_use_the_one_with_sound(tmp_path, caplog):
    voice = _tone()
    path = _write(tmp_path / "two.mka", [np.zeros_like(voice), voice])
    wave, rate = read_audio(path)
    assert rate == RATE and float(wave.abs().max()) > 0.2  # the voice, not the silence
    assert torch.allclose(wave[0, 0], torch.from_numpy(voice.astype(np.float32) / 32768))
    [said] = _warnings(caplog)
    assert "2 audio tracks and track 1 is silent: track 2" in said and "not used: track(s) 1" in said, said
    caplog.clear()
    wave1, _ = read_audio(_write(tmp_path / "first.mka", [voice, np.zeros_like(voice)]))
    assert torch.equal(wave1, wave) and not _warnings(caplog)  # track 1 has sound: it is used


# ----------------------------------------------------------------------------------------------
# item 10: AUDIO layouts, and the core's numbers
# ----------------------------------------------------------------------------------------------
def _layouts(stereo: torch.Tensor) -> dict[str, torch.Tensor]:
    """``stereo`` [2, T] float in every layout other nodes produce."""
    return {"[B, C, T]": stereo[None], "[B, T, C] (channels-last)": stereo.t()[None],
            "[C, T] (no batch axis)": stereo,
            "[T, C] (channels-last, no batch axis)": stereo.t().contiguous(),
            "int16 [B, C, T]": (stereo * 32768).round().clamp(-32768, 32767).to(torch.int16)[None]}


def test_every_layout_reads_the_same():
    stereo = torch.from_numpy(np.stack([_tone(), _tone()[::-1].copy()]).astype(np.float32) / 32768)  # [2, T]
    for name, wave in _layouts(stereo).items():
        got, layout = A.standard_waveform(wave)
        assert layout in name and got.shape == (1, 2, stereo.shape[1]), (name, layout, got.shape)
        assert torch.allclose(got[0], stereo, atol=1 / 32768), name
    mono, layout = A.standard_waveform(stereo[0])
    assert layout.startswith("[T]") and mono.shape == (1, 1, stereo.shape[1])
    with pytest.raises(ValueError, match=r"shape \(1, 2, 1, 32000\) is not an audio layout"):
        A.standard_waveform(stereo[None, :, None])
    # a short clip's error names the layout
    with pytest.raises(ValueError, match=r"read as \[B, C, T\]\)\); at least 80 ms"):
        A.check_waveform(torch.zeros(1, 2, 100), RATE)


def test_whisper_encode_reads_channels_last(model_dir, monkeypatch):
    """The reported case: [1, T, 2] into Whisper Audio Encode was "0.0 ms long (2 samples...)"."""
    from nodes import runtime
    from nodes.nodes_audio import SonicWhisperAudioEncode
    from nodes.nodes_loader import SonicLoader

    root, names = model_dir
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    (models,) = SonicLoader().load(**names, dtype="fp32")
    stereo = torch.from_numpy(np.stack([_tone(1.0), _tone(1.0)]).astype(np.float32) / 32768)  # [2, T]
    node = SonicWhisperAudioEncode()
    (want,) = node.encode(models, {"waveform": stereo[None], "sample_rate": RATE})
    (got,) = node.encode(models, {"waveform": stereo.t()[None], "sample_rate": RATE})  # [1, T, 2]
    assert got.num_frames == want.num_frames == 12
    assert torch.equal(got.cond_tokens, want.cond_tokens) and got.waveform.shape == (1, 2, RATE)
    with pytest.raises(ValueError, match=r"read as \[B, T, C\] \(channels-last\)\)\); at least 80 ms"):
        node.encode(models, {"waveform": stereo[:, :100].t()[None], "sample_rate": RATE})  # [1, 100, 2]: short
    bad = stereo.clone()
    bad[0, 100] = float("nan")
    with pytest.raises(ValueError, match=r"^audio has 1 NaN or inf samples"):  # named as the input
        node.encode(models, {"waveform": bad.t()[None], "sample_rate": RATE})


def test_video_combine_audio_reads_every_layout():
    from nodes.nodes_video import audio_track
    from sonic_core.video import _audio_array

    stereo = torch.from_numpy(np.stack([_tone(0.5), _tone(0.5)]).astype(np.float32) / 32768)
    for name, wave in _layouts(stereo).items():
        track, rate = audio_track({"waveform": wave, "sample_rate": RATE})
        arr, _ = _audio_array((track, rate))
        assert arr.shape == (2, stereo.shape[1]), name
    with pytest.raises(ValueError, match="sample_rate must be a positive number of Hz, got nan"):
        audio_track({"waveform": stereo[None], "sample_rate": float("nan")})
    with pytest.raises(ValueError, match="not normalised or is corrupt"):
        _audio_array((stereo * 1e30, RATE))


def test_core_functions_check_their_numbers_as_the_nodes_do():
    from sonic_core import face, image, motion, sampler
    from sonic_core.config import SAMPLER_DEFAULTS

    photo = torch.rand(1, 96, 96, 3)
    with pytest.raises(ValueError, match="expand_ratio nan must be a finite number from 0 to 5"):
        face.detect_face_mask(photo, mask=torch.ones(96, 96), expand_ratio=float("nan"))
    with pytest.raises(ValueError, match="confidence 2.0 is out of range"):
        face.detect_face_mask(photo, mask=torch.ones(96, 96), confidence=2.0)
    with pytest.raises(ValueError, match="min_resolution nan must be a whole number"):
        image.working_size(640, 480, float("nan"))
    with pytest.raises(ValueError, match="head_scale inf must be a finite number"):
        motion.predict_motion(torch.nn.Linear(1, 1), None, torch.zeros(1, 8), head_scale=float("inf"))
    import dataclasses

    with pytest.raises(ValueError, match="min_audio_guidance nan must be a finite number"):
        sampler.validate(dataclasses.replace(SAMPLER_DEFAULTS, min_audio_guidance=float("nan")), 10)
    with pytest.raises(ValueError, match="seed -1 is out of range"):
        sampler.generate(None, None, None, photo, None, None, None, seed=-1)
    with pytest.raises(ValueError, match="max_seconds nan must be a finite number"):
        A.encode_audio(None, torch.zeros(1, 1, RATE), RATE, float("nan"))


def test_wav_with_an_appended_id3_tag_is_not_read_as_samples(tmp_path, caplog):
    raw = _write(tmp_path / "a.wav", [_tone()]).read_bytes() + b"ID3\x03\x00\x00" + bytes(20000)  # ~0.6 s of bytes
    (tmp_path / "b.wav").write_bytes(raw)
    wave, _ = read_audio(tmp_path / "b.wav")
    assert wave.shape[-1] == int(SECONDS * RATE) and not _warnings(caplog)
