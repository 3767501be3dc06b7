"""Resumable sampling (sonic_core/resume.py): a run stopped at step k continues to the same result."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import av
import pytest
import torch

from sonic_core import sampler
from sonic_core.config import SAMPLER_DEFAULTS
from sonic_core.resume import PREFIX, ResumeStore
from tests._golden import REPO, assert_same_math, rel_err, same_math_tol
from tests.test_sampler import golden_settings, steps_run
from tests.test_unet import TINY, TINY_HW, TINY_K, _tiny_unet

FRAMES = 7
SETTINGS = dataclasses.replace(SAMPLER_DEFAULTS, steps=4, frames_per_window=3, overlap=1, shift_offset=2)


class Crash(Exception):
    pass


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = TINY_HW
    d = TINY["cross_attention_dim"]
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 10:50, 30:80] = 1.0
    return dict(
        image_latents=torch.randn(1, 4, h, w, generator=gen), ref_latents=torch.randn(1, 4, h, w, generator=gen),
        clip_embeds=torch.randn(1, d, generator=gen), cond_tokens=torch.randn(FRAMES, TINY_K, d, generator=gen),
        uncond_tokens=torch.randn(TINY_K, d, generator=gen), buckets=torch.rand(FRAMES, 2, generator=gen) * 100,
        face_mask=mask, noise=torch.randn(FRAMES, 4, h, w, generator=gen),
    )


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet(3)


@pytest.fixture(scope="module")
def uninterrupted(unet):
    return sampler.sample(unet, **_inputs(), settings=SETTINGS)


def _run(unet, store, inputs=None, crash_at: int | None = None):
    calls = []

    def cb(done, total, _preview):
        calls.append(done)
        if crash_at is not None and done == crash_at:
            raise Crash()

    return sampler.sample(unet, **(inputs or _inputs()), settings=SETTINGS, callback=cb, resume=store), calls


def test_crash_then_resume_gives_the_uninterrupted_result(unet, uninterrupted, tmp_path):
    store = ResumeStore(tmp_path)
    n_win = sampler.window_count(FRAMES, SETTINGS)
    with pytest.raises(Crash):
        _run(unet, store, crash_at=2 * n_win + 1)  # inside step 3: steps 1 and 2 are saved
    [state] = list(tmp_path.glob(f"{PREFIX}*"))
    out, calls = _run(unet, store)
    assert calls[0] == 2 * n_win + 1 and len(calls) == 2 * n_win, "the rerun must start at step 3"
    assert_same_math(out, uninterrupted, "resumed vs uninterrupted")
    assert not state.exists() and not list(tmp_path.iterdir()), "a finished run removes its state"


def test_state_of_other_inputs_is_never_used(unet, uninterrupted, tmp_path):
    store = ResumeStore(tmp_path)
    other = _inputs(seed=1)
    with pytest.raises(Crash):
        _run(unet, store, inputs=other, crash_at=sampler.window_count(FRAMES, SETTINGS) + 1)
    out, calls = _run(unet, store)  # the original inputs: a full run
    assert calls[0] == 1 and len(calls) == steps_run(SETTINGS) * sampler.window_count(FRAMES, SETTINGS)
    assert_same_math(out, uninterrupted, "fresh run beside another run's state")
    assert len(list(tmp_path.glob(f"{PREFIX}*"))) == 1, "the other run's state stays for that run"
    # planted bug: had the other state been used, the result would be far off
    wrong, _ = _run(unet, store, inputs=other)
    assert rel_err(wrong, uninterrupted) > 100 * same_math_tol()


def test_state_of_other_weights_is_never_used(unet, uninterrupted, tmp_path):
    """Another checkpoint, or the same one stored in fp8, changes the result: its state is not used."""
    from sonic_core import lowvram

    store = ResumeStore(tmp_path)
    n_win = sampler.window_count(FRAMES, SETTINGS)
    fp8 = _tiny_unet(3)
    lowvram.store_weights_fp8(fp8, torch.float32)
    for i, other in enumerate((_tiny_unet(4), fp8)):
        with pytest.raises(Crash):
            _run(other, store, crash_at=2 * n_win + 1)  # leaves a state after step 2
        assert len(list(tmp_path.glob(f"{PREFIX}*"))) == i + 1, "each model's state is its own"
    out, calls = _run(unet, store)
    assert calls[0] == 1 and len(calls) == steps_run(SETTINGS) * n_win, "the original weights start afresh"
    assert_same_math(out, uninterrupted, "fresh run beside other weights' states")
    resumed, calls = _run(fp8, store)  # and the fp8 run still finds its own state
    assert calls[0] == 2 * n_win + 1
    assert rel_err(resumed, uninterrupted) > 0


def test_damaged_state_starts_over(unet, uninterrupted, tmp_path):
    store = ResumeStore(tmp_path)
    with pytest.raises(Crash):
        _run(unet, store, crash_at=sampler.window_count(FRAMES, SETTINGS) + 1)
    [state] = list(tmp_path.glob(f"{PREFIX}*"))
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    out, calls = _run(unet, store)
    assert calls[0] == 1
    assert_same_math(out, uninterrupted, "run after a damaged state")


DRIVER = textwrap.dedent("""
    import logging, os, signal, sys
    import torch
    from sonic_core import pipeline, sampler
    logging.basicConfig(level=logging.INFO)
    models, image, audio, out, state_dir, kill_at, record = sys.argv[1:8]
    generate = sampler.generate
    def recording(*a, **k):
        latents = generate(*a, **k)
        torch.save(latents, record)
        return latents
    sampler.generate = recording
    def progress(stage, done, total):
        if stage == "sampling" and done == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
    s = pipeline.AnimateSettings(steps=4, interpolate=False, min_resolution=128)
    pipeline.animate(image, audio, out, models, s, progress=progress, state_dir=state_dir, resume=True)
""")


@pytest.mark.slow
def test_kill_9_mid_sampling_then_resume(tmp_path):
    """A real SIGKILL during sampling (step 3 of 4), then the same run again: it continues at step 3
    and its latents equal an uninterrupted run's; `animate --resume` does the same from the CLI."""
    from sonic_core import selftest

    models = selftest.write_tiny_models(tmp_path / "models")
    image = selftest.write_portrait(tmp_path / "face.png")
    voice = selftest.write_voice(tmp_path / "voice.wav")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    state = tmp_path / "state"

    def drive(name: str, kill_at: int) -> subprocess.CompletedProcess:
        args = [str(models), str(image), str(voice), str(tmp_path / f"{name}.mp4"), str(state), str(kill_at),
                str(tmp_path / f"{name}.pt")]
        return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)

    killed = drive("killed", 3)  # one window per step here: the 3rd UNet call is in step 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed.mp4").exists() and list(state.glob(f"{PREFIX}*")), "no state saved"
    resumed = drive("resumed", 0)
    assert resumed.returncode == 0 and "resuming at step 3 of 4" in resumed.stderr, resumed.stderr[-2000:]
    assert not state.exists(), "the finished run removes its state"
    fresh = drive("fresh", 0)
    assert fresh.returncode == 0 and "resuming" not in fresh.stderr
    a, b = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "fresh.pt")
    assert_same_math(a, b, "latents resumed after kill -9 vs uninterrupted")

    # the CLI: --resume continues the killed run's state and writes the whole video
    assert drive("killed2", 3).returncode == -signal.SIGKILL
    cli = [sys.executable, "-m", "sonic_core", "animate", str(image), str(voice), "--models", str(models),
           "--steps", "4", "--no-interpolate", "--min-resolution", "128", "--device", "cpu",
           "-o", str(tmp_path / "cli.mp4"), "--resume", "--state-dir", str(state)]
    run = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "resuming at step 3 of 4" in run.stderr, run.stderr[-2000:]
    with av.open(str(tmp_path / "cli.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == a.shape[0]
    assert not state.exists()


def test_sampler_node_resumes_after_a_cancel(golden, tmp_path, monkeypatch):
    """Through SonicSampler (what a workflow runs): cancel mid-run, queue again -> same latents."""
    from nodes import runtime
    from tests.test_e2e_parity import _run_chain

    monkeypatch.setenv(runtime.RESUME_ENV, str(tmp_path / "states"))
    s = golden_settings(golden)
    n_win, n_run = sampler.window_count(golden.scalars["num_frames"], s), steps_run(s)
    assert n_run >= 2, (f"golden case {golden.name} runs {n_run} denoising step (steps={s.steps}, "
                        f"i2i_strength={s.i2i_strength}): a cancel in step 2 needs a case that runs 2 or more")
    want = _run_chain(golden, tmp_path / "a", replay=False)
    calls = {"n": 0}

    def cancel_in_step_2():
        calls["n"] += 1
        if calls["n"] == n_win + 1:
            runtime.request_interrupt()

    import sonic_core.sampler as smp
    real = smp.euler_step
    monkeypatch.setattr(smp, "euler_step", lambda *a: (cancel_in_step_2(), real(*a))[1])
    with pytest.raises(runtime.InterruptProcessingException):
        _run_chain(golden, tmp_path / "b", replay=False)
    assert list((tmp_path / "states").glob(f"{PREFIX}*")), "the cancelled run left no state"
    monkeypatch.setattr(smp, "euler_step", real)
    got = _run_chain(golden, tmp_path / "c", replay=False)
    assert not list((tmp_path / "states").glob(f"{PREFIX}*"))
    assert sorted(got.steps) == list(range(1, n_run)), "the rerun must start at step 2"
    assert_same_math(got.latent["samples"], want.latent["samples"], "node: resumed vs uninterrupted")
