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
from sonic_core.config import RESULT_KEEP_ENV, SAMPLER_DEFAULTS
from sonic_core.resume import PREFIX, RESULT_PREFIX, ResumeStore
from tests._golden import REPO, assert_same_math, rel_err, same_math_tol
from tests.test_sampler import golden_settings, steps_run
from tests._node_chain import chain, run_node, tiny  # noqa: F401  (fixtures: the tiny node chain)
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
    pipeline.animate(image, audio, out, models, s, progress=progress, state_dir=state_dir, resume=True,
                     keep_result=False)  # each run samples: a kept result would make the comparison moot
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
    assert [p.name[:len(RESULT_PREFIX)] for p in state.iterdir()] == [RESULT_PREFIX], \
        "the CLI with --state-dir removes its state and keeps its result"


def test_sampler_node_resumes_after_a_cancel(golden, tmp_path, monkeypatch):
    """Through SonicSampler (what a workflow runs): cancel mid-run, queue again -> same latents."""
    from nodes import runtime
    from tests.test_e2e_parity import _run_chain

    monkeypatch.setenv(runtime.RESUME_ENV, str(tmp_path / "states"))
    s = golden_settings(golden)
    n_win, n_run = sampler.window_count(golden.scalars["num_frames"], s), steps_run(s)
    assert n_run >= 2, (f"golden case {golden.name} runs {n_run} denoising step (steps={s.steps}, "
                        f"i2i_strength={s.i2i_strength}): a cancel in step 2 needs a case that runs 2 or more")
    monkeypatch.setenv(RESULT_KEEP_ENV, "0")  # else the cancelled rerun would return this run's kept result
    want = _run_chain(golden, tmp_path / "a", replay=False)
    monkeypatch.delenv(RESULT_KEEP_ENV)
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
    assert len(list((tmp_path / "states").glob(f"{RESULT_PREFIX}*"))) == 1, \
        "the finished run keeps its result"
    assert sorted(got.steps) == list(range(1, n_run)), "the rerun must start at step 2"
    assert_same_math(got.latent["samples"], want.latent["samples"], "node: resumed vs uninterrupted")


# ----------------------------------------------------------------------------------------------
# Kept results (issue 26 item 3): an identical finished sampling is returned without the UNet
# ----------------------------------------------------------------------------------------------
KEEP_ALL = 2**30  # bytes: room for every result of these tests


class CountingUNet(torch.nn.Module):
    """The tiny UNet, counting its forward calls (what a kept result must spare)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def _counted(unet, store, inputs=None, settings=SETTINGS):
    counting = CountingUNet(unet)
    out = sampler.sample(counting, **(inputs or _inputs()), settings=settings, resume=store)
    return out, counting.calls


def _results(folder):
    return sorted(folder.glob(f"{RESULT_PREFIX}*"))


def test_identical_run_returns_the_kept_result_without_the_unet(unet, uninterrupted, tmp_path, caplog):
    store = ResumeStore(tmp_path, keep_bytes=KEEP_ALL)
    first, calls = _counted(unet, store)
    assert calls == SETTINGS.steps * sampler.window_count(FRAMES, SETTINGS)  # one call a window (3 rows)
    assert_same_math(first, uninterrupted, "first run with a keeping store")
    [kept] = _results(tmp_path)
    assert not list(tmp_path.glob(f"{PREFIX}*")), "the state goes, the result stays"
    caplog.clear()
    again, calls = _counted(unet, ResumeStore(tmp_path, keep_bytes=KEEP_ALL))
    assert calls == 0, "an identical run must not call the UNet"
    assert torch.equal(again, first)  # the same bytes read back from the file: no float computation between
    assert f"kept in {kept}; returning it without sampling" in caplog.text
    # a store that keeps nothing (the CLI's default folder, SONIC_KEEP_MB=0) neither reads nor writes results
    _, calls = _counted(unet, ResumeStore(tmp_path))
    assert calls > 0 and _results(tmp_path) == [kept]


def test_changed_seed_or_steps_samples_again(unet, tmp_path):
    store = ResumeStore(tmp_path, keep_bytes=KEEP_ALL)
    base, _ = _counted(unet, store)
    other_noise, calls = _counted(unet, store, inputs=_inputs(seed=1))  # another seed: other noise
    assert calls > 0 and rel_err(other_noise, base) > 100 * same_math_tol()
    more = dataclasses.replace(SETTINGS, steps=SETTINGS.steps + 1)
    _, calls = _counted(unet, store, settings=more)
    assert calls == more.steps * sampler.window_count(FRAMES, more)
    assert len(_results(tmp_path)) == 3, "each finished sampling is kept under its own fingerprint"


def test_cap_evicts_the_oldest_kept_result_first(unet, tmp_path):
    """Room for two results: the least recently used one goes when a third is kept."""
    one = FRAMES * 4 * TINY_HW[0] * TINY_HW[1] * 4  # bytes of one result's latents (fp32)
    store = lambda: ResumeStore(tmp_path, keep_bytes=2 * one + one // 2)  # noqa: E731  2.5 results' latents
    t0 = os.path.getmtime(tmp_path)
    runs = {}
    for age, seed in ((300, 1), (200, 2)):  # kept 5 and 3 minutes ago
        _counted(unet, store(), inputs=_inputs(seed=seed))
        [runs[seed]] = [p for p in _results(tmp_path) if p not in runs.values()]
        os.utime(runs[seed], (t0 - age, t0 - age))
    _, calls = _counted(unet, store(), inputs=_inputs(seed=1))  # seed 1 used again: now the newest
    assert calls == 0
    _, calls = _counted(unet, store(), inputs=_inputs(seed=3))
    assert calls > 0
    left = _results(tmp_path)
    assert runs[1] in left and runs[2] not in left and len(left) == 2, "seed 2's result was the oldest"
    # a result larger than the whole cap is not kept (and evicts nothing)
    _counted(unet, ResumeStore(tmp_path, keep_bytes=one // 2), inputs=_inputs(seed=4))
    assert _results(tmp_path) == left


def _poison(path, latents=None, **meta):
    """Rewrite a state or kept result with other latents or metadata, its name unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old_meta, old = f.metadata(), f.get_tensor("latents")
    save_file({"latents": old if latents is None else latents(old)}, str(path), metadata={**old_meta, **meta})


@pytest.mark.parametrize("poison, why", [
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([3]), float("nan"))), "not finite"),
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([0]), 1e30)), "beyond the"),
    (dict(steps_done="3"), "steps_done='3'"),
])
def test_poisoned_kept_result_is_discarded_with_a_warning(unet, uninterrupted, tmp_path, caplog, poison, why):
    store = ResumeStore(tmp_path, keep_bytes=KEEP_ALL)
    _counted(unet, store)
    [kept] = _results(tmp_path)
    _poison(kept, **poison)
    caplog.clear()
    out, calls = _counted(unet, ResumeStore(tmp_path, keep_bytes=KEEP_ALL))
    assert calls == SETTINGS.steps * sampler.window_count(FRAMES, SETTINGS), "the poisoned result was used"
    assert_same_math(out, uninterrupted, "run after a poisoned kept result")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(kept) in warned[0] and why in warned[0], warned
    assert "discarded (removed it)" in warned[0]
    assert _results(tmp_path) == [kept], "replaced by this run's own result"
    again, calls = _counted(unet, ResumeStore(tmp_path, keep_bytes=KEEP_ALL))
    assert calls == 0 and torch.isfinite(again).all()


def test_sampler_node_returns_a_kept_result_without_sampling(chain, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Through SonicSampler (what each segment's requeue runs when ComfyUI's cache forgot it): the
    second identical run calls no step and no UNet, names the kept file, and its LATENT says so."""
    from nodes import runtime

    first, steps = run_node(chain, monkeypatch, tmp_path)
    [kept] = _results(tmp_path)
    assert steps == [0, 1] and first[runtime.KEPT_RESULT_KEY] == str(kept)
    calls = {"n": 0}
    real = sampler._guided_velocity

    def counted(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(sampler, "_guided_velocity", counted)
    caplog.clear()
    again, steps = run_node(chain, monkeypatch, tmp_path)
    assert steps == [] and calls["n"] == 0, "the second identical run sampled"
    assert torch.equal(again["samples"], first["samples"])  # the kept bytes, no computation between
    assert again[runtime.KEPT_RESULT_KEY] == str(kept)
    assert f"kept in {kept}; returning it without sampling" in caplog.text
    run_node(chain, monkeypatch, tmp_path / "other")  # control: the same counter sees a real sampling
    assert calls["n"] > 0
