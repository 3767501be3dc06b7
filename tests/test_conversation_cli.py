"""``python -m sonic_core animate PHOTO --voice 1=a.wav --voice 3=b.wav ...`` (issue 30 item 6): the
refusals (exit 2, one line, before any model loads), a two-face run end to end on tiny models, and
resume with two faces after a kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from sonic_core import cli, conversation, pipeline, selftest, video
from sonic_core.resume import PREFIX, RESULT_PREFIX
from tests._golden import REPO

PHOTO = (340, 200)  # px (w, h): three heads side by side
HEADS = (70, 170, 270)  # px, each head's centre x (faces 1, 2, 3 from the left)
FACE_W, FACE_H = 72, 90  # px, each face's transparent ellipse
FACE_TOP = 45  # px
RATE = 22050  # Hz of the test voices (not 16 kHz: the resampler runs)
H264_MEAN_TOL = 1.0  # u8 levels: mean |video - photo| beyond the photo's own h264 encode (its rounding)


def face_box(k: int) -> tuple[int, int, int, int]:
    """Face ``k`` (0-based from the left): its transparent ellipse's box (x1, y1, x2, y2)."""
    cx = HEADS[k]
    return cx - FACE_W // 2, FACE_TOP, cx + FACE_W // 2, FACE_TOP + FACE_H


def write_photo(path: Path, heads: int = 3) -> Path:
    """Three drawn people on a background (a gradient, so a shifted paste would show); each face
    transparent (alpha 0 marks it) in its own skin tone."""
    from PIL import Image, ImageDraw

    w, h = PHOTO
    ramp = np.linspace(60, 180, w, dtype=np.float32)[None, :, None]  # [1,W,1]
    rgb = np.broadcast_to(ramp, (h, w, 3)).copy()  # [H,W,3]
    rgb[..., 2] = 200 - rgb[..., 2] / 2
    im = Image.fromarray(rgb.astype(np.uint8)).convert("RGBA")
    d = ImageDraw.Draw(im)
    skins = ((225, 185, 150), (170, 120, 90), (240, 200, 170))
    for k in range(heads):
        x1, y1, x2, y2 = face_box(k)
        d.rectangle((x1 - 8, y2, x2 + 8, h), fill=(40 + 30 * k, 40, 60, 255))  # shoulders
        d.ellipse((x1, y1, x2, y2), fill=(*skins[k], 0))  # the face: alpha 0 marks it
        d.ellipse((x1 + 18, y1 + 30, x1 + 28, y1 + 38), fill=(30, 30, 30, 0))  # eyes
        d.ellipse((x2 - 28, y1 + 30, x2 - 18, y1 + 38), fill=(30, 30, 30, 0))
        d.ellipse((x1 + 26, y1 + 60, x2 - 26, y1 + 68), fill=(150, 60, 60, 0))  # mouth
    im.save(path)
    return path


def voice_samples(seconds: float, pitch: float) -> np.ndarray:
    """A voice-like mono clip: harmonics of a gliding pitch (Hz) under a syllable envelope, peak 0.3."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = pitch + 0.2 * pitch * np.sin(2 * np.pi * 0.7 * t)  # Hz
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    wave = wave * np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    pcm = np.round(samples * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("conversation")
    a, b = voice_samples(0.8, 140.0), voice_samples(0.5, 220.0)  # different lengths: b is padded
    rttm = d / "talk.rttm"
    rttm.write_text("# diarization\nSPEAKER talk 1 0.40 0.40 <NA> <NA> bob <NA> <NA>\n"
                    "SPEAKER talk 1 0.00 0.40 <NA> <NA> alice <NA> <NA>\n")
    return dict(photo=write_photo(d / "three.png"), a=write_wav(d / "alice.wav", a),
                b=write_wav(d / "bob.wav", b), samples=(a, b), rttm=rttm, dir=d)


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    t0 = time.perf_counter()
    code = cli.main(["-q", *argv])
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 30, "the check came late"
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any heavy model load fails the test: a refusal must come before."""
    from sonic_core import weights
    from sonic_core.models import svd

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(weights, "load_sonic_models", refuse)
    monkeypatch.setattr(svd, "load_svd", refuse)


def _refusals(f):
    photo, a, b, rttm = str(f["photo"]), str(f["a"]), str(f["b"]), str(f["rttm"])
    both = ["--crop", "--paste-back"]
    return [
        ([photo, "--voice", f"4={a}", "--voice", f"1={b}", *both],
         rf"--voice 4={re.escape(a)}: face 4 is past the faces of .*three\.png \(faces 1\.\.3 were found, "
         r"numbered from the left\); see the numbers with .*--preview-faces"),
        ([photo, a, "--timeline", rttm, "--speaker", "carol=1", *both],
         r"--speaker carol: the timeline .*talk\.rttm has no speaker 'carol' \(its speakers: alice, bob\)"),
        ([photo, "--voice", f"1={a}", "--voice", f"1={b}", *both],
         rf"--voice 1={re.escape(b)}: face 1 already has the voice {re.escape(a)}"),
        ([photo, "--voice", f"1={a}"], r"--voice needs --crop --paste-back"),
        ([photo, "--voice", f"1={a}", "--crop"], r"--voice needs --crop --paste-back"),
        ([photo, "--voice", f"1={a}", "--timeline", rttm, *both], r"--voice and --timeline .* together"),
        ([photo, "--voice", a, *both], rf"--voice '{re.escape(a)}' is not N=AUDIO: write it like --voice "
         r"1=alice\.wav"),
        ([photo, "--voice", f"x={a}", *both], r"--voice x=.*: 'x' is not a face number"),
        ([photo, "--voice", f"0={a}", *both], r"--voice 0=.*: '0' is not a face number"),
        ([photo, a, "--voice", f"2={b}", *both], r"AUDIO .*alice\.wav and --voice together"),
        ([photo, a, "--timeline", rttm, "--speaker", "alice", *both], r"--speaker 'alice' is not NAME=N"),
        ([photo, a, "--timeline", rttm, "--speaker", "alice=1", "--speaker", "bob=1", *both],
         r"--speaker bob=1: face 1 is already the speaker 'alice'"),
        ([photo, "--timeline", rttm, "--speaker", "alice=1", *both], r"--timeline .* needs AUDIO"),
        ([photo, a, "--speaker", "alice=1", *both], r"--speaker alice=1 needs --timeline"),
        ([photo, "--voice", f"1={f['dir'] / 'missing.wav'}", *both], r"audio .*missing\.wav does not exist"),
        ([photo], r"AUDIO is missing: animate PHOTO AUDIO -o VIDEO"),
        ([photo, a], r"-o/--output is missing"),
    ]


REFUSALS = 17


@pytest.mark.parametrize("case", range(REFUSALS))
def test_refused_before_any_model_loads(files, tmp_path, capsys, no_model_loads, case):
    """Exit 2, one line naming the value, nothing written; the models folder holds the tiny models'
    names only as an empty folder, and loading is made to fail: the check comes first."""
    args, pattern = _refusals(files)[case]
    out = tmp_path / "out" / "talk.mp4"
    argv = ["animate", *args, "--models", str(tmp_path / "no_models")]
    if "-o/--output is missing" not in pattern:
        argv += ["-o", str(out)]
    code, err = _run(capsys, argv)
    assert code == 2 and re.search(pattern, err), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()


def test_refusal_count():
    assert len(_refusals({"photo": "p", "a": "a", "b": "b", "rttm": "r", "dir": Path(".")})) == REFUSALS


def test_preview_faces_writes_the_numbered_photo(files, tmp_path, capsys, no_model_loads):
    from PIL import Image

    out = tmp_path / "faces.png"
    code, err = _run(capsys, ["animate", str(files["photo"]), "--preview-faces", str(out),
                              "--models", str(tmp_path / "no_models")])
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == PHOTO
        drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
    photo, _ = pipeline.read_image(files["photo"])
    changed = np.abs(drawn - np.round(photo[0].numpy() * 255)).max(axis=2) > 0  # [H,W]
    for k in range(3):  # every face is boxed: pixels change around each face, not far away
        x1, y1, x2, y2 = face_box(k)
        assert changed[max(y1 - 6, 0):y2 + 6, x1 - 6:x2 + 6].any(), f"face {k + 1} not drawn"
    assert not changed[:, :10].any() and not changed[-5:, :].any(), "the preview redrew the background"
    code, err = _run(capsys, ["animate", str(files["photo"]), "--preview-faces", str(out),
                              "--models", str(tmp_path / "no_models")])
    assert code == 2 and "already exists" in err


def test_cast_of_flags():
    """The parsed cast: face numbers to files or speakers, whitespace around '=' allowed."""
    import argparse

    p = argparse.ArgumentParser()
    pipeline.configure_cli(p)
    args = p.parse_args(["photo.png", "--voice", "3=b.wav", "--voice", " 1 = a.wav", "-o", "x.mp4", "--crop",
                         "--paste-back"])
    cast = conversation.parse_cast(args)
    assert cast.voices == {1: "a.wav", 3: "b.wav"} and cast.faces == [1, 3]
    args = p.parse_args(["photo.png", "mix.wav", "--timeline", "t.rttm", "--speaker", "alice=2", "--speaker",
                         "bob=1", "-o", "x.mp4", "--crop", "--paste-back"])
    cast = conversation.parse_cast(args)
    assert cast.speakers == {2: "alice", 1: "bob"} and cast.faces == [1, 2] and cast.timeline == "t.rttm"
    assert not conversation.wanted(p.parse_args(["photo.png", "v.wav", "-o", "x.mp4"]))


# ----------------------------------------------------------------------------------------------
# End to end on tiny models
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return selftest.write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def _decode(path: Path, audio: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Frames ``[N,H,W,3]`` u8, audio ``[T]`` (first channel) float, its rate."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    if not audio:
        return frames, None, 0
    with av.open(str(path)) as c:
        parts = [f.to_ndarray() for f in c.decode(audio=0)]  # [C,n] planar float
        rate = c.streams.audio[0].rate
    return frames, np.concatenate([p[:1] for p in parts], axis=1)[0], rate


def _crops(photo: Path, numbers) -> list[tuple[int, int, int, int]]:
    """The crop each driven face is animated in, as the pipeline takes it."""
    from sonic_core import face

    image, alpha = pipeline.read_image(photo)
    return [face.detect_face_mask(image, mask=alpha, crop=True, face_index=n).box.crop_xyxy for n in numbers]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


BASE = ["--steps", "2", "--no-interpolate", "--min-resolution", "64", "--device", "cpu", "--crop",
        "--paste-back"]


@pytest.mark.slow
def test_two_voices_drive_faces_1_and_3_face_2_listens(files, models, tmp_path, capsys):
    """Faces 1 and 3 move, face 2 (a bystander) and everything outside the two crops stay the photo's
    own pixels (h264 rounding aside), the sound is the two voices mixed."""
    out = tmp_path / "talk.mp4"
    code = cli.main(["-q", "animate", str(files["photo"]), "--voice", f"1={files['a']}", "--voice",
                     f"3={files['b']}", "-o", str(out), "--models", str(models), *BASE])
    assert code == 0, capsys.readouterr().err[-3000:]
    frames, sound, rate = _decode(out)
    assert frames.shape[1:3] == (PHOTO[1], PHOTO[0])
    assert frames.shape[0] == int(0.8 * 12.5), "the longer voice sets the length"
    photo = np.round(pipeline.read_image(files["photo"])[0][0].numpy() * 255)  # [H,W,3]
    outside = np.ones(frames.shape[1:3], dtype=bool)
    moving = []
    for x1, y1, x2, y2 in _crops(files["photo"], (1, 3)):
        outside[y1:y2, x1:x2] = False
        moving.append(frames[:, y1:y2, x1:x2].astype(np.float32).std(axis=0).mean())
    err = np.abs(frames.astype(np.float32) - photo[None])  # [N,H,W,3]
    still_video = tmp_path / "still.mp4"  # the photo itself through the same encoder: h264's own rounding
    video.write_video(torch.from_numpy(photo / 255).float()[None].expand(frames.shape[0], -1, -1, -1),
                      str(still_video), 12.5)
    floor = np.abs(_decode(still_video, audio=False)[0].astype(np.float32) - photo[None])  # [N,H,W,3]
    assert err[:, outside].mean() < floor[:, outside].mean() + H264_MEAN_TOL, (err[:, outside].mean(),
                                                                                floor[:, outside].mean())
    bx1, by1, bx2, by2 = face_box(1)  # face 2, not driven: its face stays the photo's
    bystander = (slice(None), slice(by1, by2), slice(bx1, bx2))
    assert err[bystander].mean() < floor[bystander].mean() + H264_MEAN_TOL, (err[bystander].mean(),
                                                                              floor[bystander].mean())
    still = frames[:, outside].astype(np.float32).std(axis=0).mean()
    assert min(moving) > 5 * max(still, 0.2), (moving, still)
    a, b = files["samples"]
    mix = np.zeros(max(len(a), len(b)), np.float32)
    mix[:len(a)] += a
    mix[:len(b)] += b
    import soxr

    want = soxr.resample(mix, RATE, rate)
    assert _corr(sound, want) > 0.8 and _corr(sound, want) > _corr(sound, soxr.resample(a, RATE, rate)) \
        and _corr(sound, want) > _corr(sound, soxr.resample(b, RATE, rate)), "the sound is not the mix"
    assert np.abs(sound).max() <= 1.0
    assert not list(tmp_path.glob(".*")), "the default state folder goes once the video is written"


@pytest.mark.slow
def test_timeline_drives_each_face_with_its_turns(files, models, tmp_path, capsys):
    out = tmp_path / "talk.mp4"
    code = cli.main(["-q", "animate", str(files["photo"]), str(files["a"]), "--timeline", str(files["rttm"]),
                     "--speaker", "alice=1", "--speaker", "bob=2", "-o", str(out), "--models", str(models),
                     *BASE])
    assert code == 0, capsys.readouterr().err[-3000:]
    frames, sound, rate = _decode(out)
    assert frames.shape[0] == int(0.8 * 12.5)
    import soxr

    assert _corr(sound, soxr.resample(files["samples"][0], RATE, rate)) > 0.9, "the video keeps the recording"


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from sonic_core import cli, sampler_faces
    kill_at = int(sys.argv[1])
    real = sampler_faces.generate_faces
    def generate_faces(*a, **k):
        inner = k.get("callback")
        def callback(done, total, *rest):
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if inner is not None:
                inner(done, total, *rest)
        k["callback"] = callback
        return real(*a, **k)
    sampler_faces.generate_faces = generate_faces
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_kill_9_in_the_second_step_then_resume(files, models, tmp_path):
    """A SIGKILL while faces 1 and 3 sample together (issue 30 item 7): each face's state after step 1
    is saved (each its own file: the fingerprints differ); --resume continues both from step 2."""
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = ["animate", str(files["photo"]), "--voice", f"1={files['a']}", "--voice", f"3={files['b']}",
            "-o", str(tmp_path / "talk.mp4"), "--models", str(models), *BASE, "--steps", "3",
            "--state-dir", str(state), "--no-keep-result", "--window-batch", "2"]

    def drive(kill_at: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), *argv, *extra], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    killed = drive(3)  # one window per face and step, both in one call: windows 3-4 are step 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "talk.mp4").exists()
    assert not list(state.glob(f"{RESULT_PREFIX}*")), "no face finished"
    assert len(list(state.glob(f"{PREFIX}*"))) == 2, "each face's state after step 1"
    resumed = drive(0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for n in (1, 3):
        assert f"face {n}: resuming at step 2 of 3" in resumed.stderr, resumed.stderr[-3000:]
    frames, _, _ = _decode(tmp_path / "talk.mp4")
    assert frames.shape[0] == int(0.8 * 12.5)
    assert not state.exists(), "--no-keep-result: nothing stays once the video is written"


def test_each_face_has_its_own_fingerprint():
    """A face's resume state and kept result are keyed by its crop (image latents, face mask) and its
    voice (audio tokens, motion): another face or another voice never reads them."""
    from sonic_core import sampler
    from tests.test_resume import SETTINGS, _inputs
    from tests.test_unet import _tiny_unet

    unet = _tiny_unet(3)
    sched = sampler.make_schedule(SETTINGS.steps, SETTINGS.i2i_strength, None)

    def fp(**change):
        x = {**_inputs(), **change}
        return sampler._fingerprint(unet, x["image_latents"], x["ref_latents"], x["clip_embeds"],
                                    x["cond_tokens"], x["uncond_tokens"], x["buckets"], x["face_mask"],
                                    x["noise"], SETTINGS, torch.float32, sched, None)

    base, other = _inputs(), _inputs(seed=1)
    same = fp()
    assert fp() == same  # same face, same voice: the same state
    assert fp(cond_tokens=other["cond_tokens"], buckets=other["buckets"]) != same, "another voice"
    assert fp(image_latents=other["image_latents"], ref_latents=other["ref_latents"],
              clip_embeds=other["clip_embeds"]) != same, "another face's crop"
    moved = base["face_mask"].roll(7, dims=-1)  # the same crop pixels, the face box elsewhere in it
    assert fp(face_mask=moved) != same, "another face box"
