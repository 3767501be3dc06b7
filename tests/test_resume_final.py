"""A crash after sampling loses no sampling (issue 29 item 4): with ``hold_final`` (the CLI) the final
latents stay as a state of all the steps until the video is written; ``--resume`` then goes straight
to decoding, and a finished video removes them."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import av
import pytest
import torch

from sonic_core import sampler
from sonic_core.pipeline import sampling_kept_until_written
from sonic_core.resume import PREFIX, RESULT_PREFIX, ResumeStore
from tests._golden import REPO, assert_same_math
from tests.test_resume import FRAMES, SETTINGS, _run, uninterrupted, unet  # noqa: F401  (fixtures)

N_CALLS = SETTINGS.steps * sampler.window_count(FRAMES, SETTINGS)  # UNet calls of a whole sampling


def test_final_latents_held_until_released_then_resume_skips_every_step(unet, uninterrupted, tmp_path, caplog):
    store = ResumeStore(tmp_path, resume=True, hold_final=True)
    first, calls = _run(unet, store)
    assert len(calls) == N_CALLS
    [held] = tmp_path.glob(f"{PREFIX}*")
    assert store.held == held, "the finished sampling stays as a state until the video is written"
    assert_same_math(first, uninterrupted, "held run vs uninterrupted")
    caplog.set_level(logging.INFO, "sonic_core")
    again = ResumeStore(tmp_path, resume=True, hold_final=True)  # the crashed run's --resume
    out, calls = _run(unet, again)
    assert calls == [], "every step was done: no UNet call"
    assert torch.equal(out, first)  # the same bytes read back: no float computation between
    assert "going straight to decoding" in caplog.text
    assert again.held == held and held.exists(), "held again until this run's video is written"
    again.release()
    assert not held.exists() and not list(tmp_path.iterdir())


def test_held_state_without_resume_samples_again_with_a_warning(unet, tmp_path, caplog):
    _run(unet, ResumeStore(tmp_path, hold_final=True))
    caplog.clear()
    store = ResumeStore(tmp_path, resume=False, hold_final=True)
    _, calls = _run(unet, store)
    assert len(calls) == N_CALLS
    assert "use --resume to continue it" in caplog.text and "finished sampling" in caplog.text


def test_a_kept_result_needs_no_held_state(unet, tmp_path):
    """--state-dir keeps results: the kept result is what --resume finds; no second copy is held."""
    store = ResumeStore(tmp_path, hold_final=True, keep_bytes=2**30)
    _run(unet, store)
    assert store.held is None and [p.name[:len(RESULT_PREFIX)] for p in tmp_path.iterdir()] == [RESULT_PREFIX]


def test_failed_write_keeps_the_sampling_and_says_so(unet, tmp_path, caplog):
    """The block that writes the video fails (a full disk): the held latents stay, with a line
    naming --resume; a block that ends well removes them and the empty folder."""
    folder = tmp_path / "state"
    store = ResumeStore(folder, hold_final=True)
    _run(unet, store)
    held = store.held
    with pytest.raises(OSError, match="No space"):
        with sampling_kept_until_written(store):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert held.exists() and f"kept in {held}: run the same command again with --resume" in caplog.text
    with sampling_kept_until_written(store):
        pass
    assert not folder.exists()


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from sonic_core import cli, pipeline
    real = pipeline.animate
    def killed_while_encoding(*a, progress=None, **k):
        def stop(stage, done, total):
            if stage == "encoding" and done == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash: nothing of Python's cleanup runs
        return real(*a, progress=stop, **k)
    pipeline.animate = killed_while_encoding
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow  # two tiny CLI runs (a minute each on a busy 2-core machine)
def test_cli_killed_while_encoding_resumes_at_decoding(tmp_path):
    """The CLI's default mode (state beside -o): SIGKILL while encoding, then the same command with
    --resume decodes the held latents without a sampling step, writes the video, exits 0 even with
    stdout on a full device (item 13), and leaves no state behind."""
    from sonic_core import selftest

    models = selftest.write_tiny_models(tmp_path / "models")
    image = selftest.write_portrait(tmp_path / "face.png")
    voice = selftest.write_voice(tmp_path / "voice.wav")
    out = tmp_path / "out" / "talk.mp4"
    argv = ["animate", str(image), str(voice), "--models", str(models), "--steps", "2", "--no-interpolate",
            "--min-resolution", "128", "--device", "cpu", "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, "-c", DRIVER, *argv], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = out.parent / f".{out.name}.resume"
    assert not out.exists() and len(list(folder.glob(f"{PREFIX}*"))) == 1, "the sampling was lost"
    with open(os.devnull if not os.path.exists("/dev/full") else "/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "sonic_core", *argv, "--resume"], env=env, cwd=REPO,
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "going straight to decoding" in run.stderr and "sampling: " not in run.stderr, run.stderr[-3000:]
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20  # SELFTEST_SECONDS of audio at 12.5 fps
    assert not folder.exists(), "the written video removes the held state and its folder"
