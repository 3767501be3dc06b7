"""How the CLI ends (issue 29 item 13): flags that would be ignored, the real size of an odd-sized
video, two runs writing one -o, a stdout that cannot be written, and Ctrl+C."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from sonic_core import cli, pipeline, preflight, selftest, video
from tests._golden import REPO


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_exit_inputs")
    return selftest.write_portrait(d / "face.png"), selftest.write_voice(d / "voice.wav")


def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# paste flags without --paste-back
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--paste-feather", "0.2"), ("--paste-region", "face"),
                                         ("--paste-feather", "0.1")])  # the default's value, given: refused too
def test_paste_flag_without_paste_back_is_refused_before_weights(inputs, tmp_path, capsys, flag, value):
    out = tmp_path / "o.mp4"
    code, err = _main(capsys, "animate", str(inputs[0]), str(inputs[1]), "-o", str(out), "--models",
                      str(tmp_path / "empty"), "--crop", flag, value)
    assert code == 2, err
    assert f"{flag} {value} only shapes --paste-back" in err and "add --crop --paste-back" in err, err
    assert "missing" not in err and "Traceback" not in err, "refused before the weights are looked for"
    assert os.listdir(tmp_path) == []


def test_paste_flags_with_paste_back_pass_that_check(inputs, tmp_path, capsys):
    code, err = _main(capsys, "animate", str(inputs[0]), str(inputs[1]), "-o", str(tmp_path / "o.mp4"),
                      "--models", str(tmp_path / "empty"), "--crop", "--paste-back", "--paste-feather", "0.2",
                      "--paste-region", "face")
    assert code == 3 and "weight file(s) missing" in err, err  # it went on, to the empty models folder


# ----------------------------------------------------------------------------------------------
# odd sizes: the padded size is said
# ----------------------------------------------------------------------------------------------
def test_odd_sized_frames_log_the_real_video_size(tmp_path, caplog):
    frames = torch.rand(3, 457, 301, 3, generator=torch.Generator().manual_seed(0))  # [N,H,W,3]
    out = tmp_path / "odd.mp4"
    with caplog.at_level(logging.INFO, "sonic_core.video"):
        video.write_video(frames, str(out), 12.5)
    assert ("the frames are 301x457 px; yuv420p needs even sides, so the video is 302x458 px (the last column "
            "and row repeated once)") in caplog.text
    with av.open(str(out)) as c:
        first = next(c.decode(video=0))
    assert (first.width, first.height) == (302, 458)
    caplog.clear()
    with caplog.at_level(logging.INFO, "sonic_core.video"):
        video.write_video(frames[:, :456], str(tmp_path / "even_h.mp4"), 12.5)
    assert "the last column repeated once" in caplog.text


# ----------------------------------------------------------------------------------------------
# two runs, one -o
# ----------------------------------------------------------------------------------------------
def _held_partial(out: Path) -> int:
    """A temp video of ``out`` locked as a live encode holds it (what another run's write_video makes)."""
    tmp = out.parent / f".{out.name}.0123456789ab{video.PARTIAL_TAG}mp4"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_another_run_writing_the_same_output_is_named(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    fd = _held_partial(out)
    try:
        with pytest.raises(FileExistsError, match=r"another run is writing .*o\.mp4 now .*wait for it"):
            preflight.check_output(out)
        code, err = _main(capsys, "animate", str(inputs[0]), str(inputs[1]), "-o", str(out), "--models",
                          str(tmp_path / "empty"))
        assert code == 2 and "another run is writing" in err and "missing" not in err, err
    finally:
        os.close(fd)  # the other run ended: its lock is gone
    code, err = _main(capsys, "animate", str(inputs[0]), str(inputs[1]), "-o", str(out), "--models",
                      str(tmp_path / "empty"))
    assert code == 3, err


def test_output_published_by_another_run_during_the_encode_is_a_clear_error(tmp_path):
    out = tmp_path / "o.mp4"

    def other_run_publishes(done, _total):
        if done == 1:
            out.write_bytes(b"the other run's video")

    with pytest.raises(FileExistsError) as e:
        video.write_video(torch.rand(3, 64, 64, 3), str(out), 12.5, callback=other_run_publishes)
    assert "written by another run" in str(e.value) and "choose another output name" in str(e.value)
    assert "Errno" not in str(e.value) and ".partial." not in str(e.value)
    assert out.read_bytes() == b"the other run's video" and os.listdir(tmp_path) == ["o.mp4"]


# ----------------------------------------------------------------------------------------------
# stdout that cannot be written; Ctrl+C
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    return path


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_finished_command_with_stdout_on_a_full_device_exits_0(checkpoint, tmp_path):
    out = tmp_path / "small.safetensors"
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "sonic_core", "convert-weights", str(checkpoint), str(out)],
                             cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "could not write to stdout (no space left on device)" in run.stderr.lower()
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr


def test_finished_command_with_stdout_on_a_closed_pipe_exits_0(checkpoint, tmp_path):
    out = tmp_path / "small.safetensors"
    read, write = os.pipe()
    os.close(read)  # the reader is gone (`| head -0`): every write is EPIPE
    try:
        run = subprocess.run([sys.executable, "-m", "sonic_core", "convert-weights", str(checkpoint), str(out)],
                             cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "could not write to stdout" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr


def test_ctrl_c_is_one_line_naming_resume(inputs, tmp_path, capsys, monkeypatch):
    def pressed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "animate", pressed)
    code, err = _main(capsys, "animate", str(inputs[0]), str(inputs[1]), "-o", str(tmp_path / "o.mp4"))
    assert code == 130
    assert err == ("interrupted; run the same command again with --resume to continue from the last saved "
                   "step\n")


@pytest.mark.slow  # a tiny CLI run up to its sampler (half a minute on a busy 2-core machine)
def test_real_sigint_while_sampling_exits_130_with_one_line(inputs, tmp_path):
    models = selftest.write_tiny_models(tmp_path / "models")
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "sonic_core", "animate", str(inputs[0]), str(inputs[1]),
                             "--models", str(models), "--steps", "3", "--no-interpolate", "--min-resolution",
                             "128", "--device", "cpu", "-o", str(out)], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    before = []
    for line in proc.stderr:  # progress lines on a pipe: one per update
        before.append(line)
        if "sampling:" in line:
            proc.send_signal(signal.SIGINT)
            break
    after = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, "".join(before[-20:]) + after
    lines = [ln for ln in after.splitlines() if "sampling:" not in ln]  # a bar line may still land first
    assert lines == ["interrupted; run the same command again with --resume to continue from the last saved "
                     "step"], after
    assert not out.exists()
