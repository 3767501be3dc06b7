"""Resume states are untrusted input (issue 22 items 11-14).

A state or kept result read back is checked (one tensor named ``latents`` of the run's shape and
dtype, our three metadata keys, ``steps_done`` in decimal digits within the run's steps, finite
values within ``RESUME_LATENT_ABS_MAX``); a bad one is discarded with one warning naming the file,
and removed, so the next run starts clean. The state folder is checked before any model loads:
the CLI refuses a ``--state-dir`` it cannot use (exit 2), the node and the CLI's default folder run
on without resume, with one warning. A failing save (full disk, read-only) never ends a run.

Full and read-only disks are real: a 64 KiB tmpfs (filled) and a read-only tmpfs, mounted here
(root only; skipped otherwise, as root ignores chmod and a read-only folder cannot be made without).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import av
import pytest
import torch

from sonic_core import cli, sampler
from sonic_core.config import RESUME_LATENT_ABS_MAX
from sonic_core.resume import PREFIX, RESULT_PREFIX, ResumeStore, folder_problem
from tests._golden import assert_same_math
from tests._node_chain import chain, run_node, tiny  # noqa: F401  (fixtures)
from tests.test_resume import FRAMES, SETTINGS, Crash, _inputs, _poison, _run
from tests.test_unet import _tiny_unet

TMPFS_BYTES = 64 * 1024  # the full disk: a tiny state (10-20 KB) plus the filler does not fit
FILLER_LEFT = 4096  # bytes left free after the filler (one tmpfs page): a probe file fits, no state does


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet(3)


@pytest.fixture(scope="module")
def uninterrupted(unet):
    return sampler.sample(unet, **_inputs(), settings=SETTINGS)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("sonic_core")]


def _state_after_step_2(unet, store) -> Path:
    with pytest.raises(Crash):
        _run(unet, store, crash_at=2 * sampler.window_count(FRAMES, SETTINGS) + 1)
    [state] = store.folder.glob(f"{PREFIX}*")
    return state


# ----------------------------------------------------------------------------------------------
# Items 11 and 12: a poisoned state is discarded, named and removed; the run starts at step 1
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("poison, why", [
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([2]), float("nan"))), "not finite"),
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([2]), float("inf"))), "not finite"),
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([2]), float("-inf"))), "not finite"),
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([2]), 1e30)), "holds latents up to 1e+30"),
    (dict(latents=lambda x: x.index_fill(0, torch.tensor([2]), -2 * RESUME_LATENT_ABS_MAX)),
     "up to 2e+04, beyond the 10000"),
    (dict(steps_done="abc"), "steps_done='abc', not a step between 1 and 3"),
    (dict(steps_done="2.0"), "steps_done='2.0'"),
    (dict(steps_done="-1"), "steps_done='-1'"),
    (dict(steps_done="0"), "steps_done='0'"),
    (dict(steps_done="4"), "steps_done='4'"),  # = all steps: a state is never the end
    (dict(steps_done=" 2"), "steps_done=' 2'"),
    (dict(steps_done="9" * 400), "steps_done='9999"),  # no int() of a 400-digit string
    (dict(fingerprint="0" * 64), "metadata other than this run's"),
    (dict(version="0"), "metadata other than this run's"),
    (dict(extra="x"), "metadata other than this run's"),
    (dict(latents=lambda x: x[:-1].clone()), f"holds latents ({FRAMES - 1}, 4"),
    (dict(latents=lambda x: x.double()), "holds F64 latents, this run samples in torch.float32"),
])
def test_poisoned_state_is_discarded_and_removed(unet, uninterrupted, tmp_path, caplog, poison, why):
    store = ResumeStore(tmp_path)
    state = _state_after_step_2(unet, store)
    _poison(state, **poison)
    caplog.clear()
    with pytest.raises(Crash):  # stop at the rerun's first UNet call: after the load, before any save
        _run(unet, store, crash_at=1)
    [warning] = _warnings(caplog)
    assert str(state) in warning and why in warning
    assert "discarded (removed it); starting from step 1" in warning
    assert not state.exists(), "the bad state must go, so that the next run starts clean"
    caplog.clear()
    out, calls = _run(unet, ResumeStore(tmp_path))
    assert calls[0] == 1 and _warnings(caplog) == []
    assert torch.isfinite(out).all()
    assert_same_math(out, uninterrupted, "run after a poisoned state")


@pytest.mark.parametrize("kind", ["extra tensor", "no latents", "symlink", "not safetensors"])
def test_odd_state_files_are_discarded(unet, uninterrupted, tmp_path, caplog, kind):
    from safetensors.torch import save_file

    store = ResumeStore(tmp_path)
    state = _state_after_step_2(unet, store)
    target = tmp_path.parent / f"{tmp_path.name}-elsewhere.bin"
    if kind == "extra tensor":
        from safetensors import safe_open

        with safe_open(str(state), framework="pt") as f:
            meta, x = f.metadata(), f.get_tensor("latents")
        save_file({"latents": x, "more": torch.zeros(1)}, str(state), metadata=meta)
        why = "holds the tensors"
    elif kind == "no latents":
        save_file({"other": torch.zeros(1)}, str(state), metadata={"steps_done": "2"})
        why = "holds the tensors ['other']"
    elif kind == "symlink":
        shutil.move(state, target)  # a valid state, but reached through a link: refused, the link removed
        state.symlink_to(target)
        why = "is not a regular file"
    else:
        state.write_bytes(b"\x80\x04K\x01." * 10)  # a pickle, not a safetensors file
        why = "is unreadable"
    caplog.clear()
    out, calls = _run(unet, store)
    [warning] = _warnings(caplog)
    assert str(state) in warning and why in warning, warning
    assert calls[0] == 1 and not os.path.lexists(state)
    assert_same_math(out, uninterrupted, f"run after a state with {kind}")
    if kind == "symlink":
        assert target.is_file(), "only the link is removed, never what it points to"


def test_folder_at_the_state_path(unet, uninterrupted, tmp_path, caplog):
    """An empty folder there is removed; one with files is the user's: resume goes off, one warning."""
    store = ResumeStore(tmp_path)
    state = _state_after_step_2(unet, store)
    state.unlink()
    state.mkdir()
    (state / "mine.txt").write_text("keep me")
    caplog.clear()
    out, calls = _run(unet, ResumeStore(tmp_path))
    [warning] = _warnings(caplog)
    assert f"{state} is a folder where this run's resume state belongs" in warning
    assert "goes on without resume states" in warning
    assert calls[0] == 1 and (state / "mine.txt").read_text() == "keep me"
    assert_same_math(out, uninterrupted, "run beside a folder at its state path")
    (state / "mine.txt").unlink()
    caplog.clear()
    with pytest.raises(Crash):
        _run(unet, ResumeStore(tmp_path), crash_at=sampler.window_count(FRAMES, SETTINGS) + 1)
    assert "was an empty folder: removed it" in _warnings(caplog)[0]
    assert state.is_file(), "with the empty folder gone the state is saved again"


# ----------------------------------------------------------------------------------------------
# Item 13: the folder, checked before anything loads
# ----------------------------------------------------------------------------------------------
def _mount(path: Path, *options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a real full or read-only disk needs root (mount a tmpfs)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("the mount and umount binaries are not installed: no real full or read-only disk")
    path.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(path)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")


@pytest.fixture
def disks(tmp_path):
    """``full``: a 64 KiB tmpfs with FILLER_LEFT bytes free; ``ro``: a read-only tmpfs. Unmounted after."""
    mounted = []

    def make(kind: str) -> Path:
        path = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}"
        _mount(path, "ro" if kind == "ro" else "rw")
        mounted.append(path)
        if kind == "full":
            with open(path / "filler", "wb") as f:
                f.write(b"\0" * (TMPFS_BYTES - FILLER_LEFT))
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)
        assert not os.path.ismount(path), f"{path} is still mounted"


def test_folder_problems_are_named_and_nothing_is_left(tmp_path, disks):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert folder_problem(afile) == f"{afile} is a file, not a folder"
    assert folder_problem(afile / "below") == f"{afile} is a file, not a folder"
    (tmp_path / "loop").symlink_to("loop")  # what the path really is (sonic_core.paths), not "a file or..."
    assert folder_problem(tmp_path / "loop") == f"{tmp_path / 'loop'} is a symlink loop (the link leads, " \
        "directly or through others, to itself)"
    (tmp_path / "loop").unlink()
    ro = disks("ro")
    assert folder_problem(ro) == f"{ro} is not writable (read-only file system)"
    assert folder_problem(ro / "a" / "b") == f"{ro / 'a' / 'b'} is not writable (read-only file system)"
    deep = tmp_path / "new" / "deeper"
    assert folder_problem(deep) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", ro.name], "the check left folders behind"
    assert folder_problem(disks("full")) is None, "a probe fits a full disk: saves fail later, warned then"


# ----------------------------------------------------------------------------------------------
# Item 14: a failing save warns once; the run carries on without resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, reason", [("full", "no space left on device"),
                                          ("ro", "read-only file system")])
def test_failing_save_warns_once_and_the_run_finishes(unet, uninterrupted, caplog, disks, kind, reason):
    folder = disks(kind)
    before = sorted(os.listdir(folder))
    caplog.clear()
    out, calls = _run(unet, ResumeStore(folder / "states" if kind == "ro" else folder, keep_bytes=2**30))
    [warning] = _warnings(caplog)
    assert f"could not save the resume state in {folder}" in warning and reason in warning, warning
    assert "this run goes on without resume states" in warning
    assert len(calls) == SETTINGS.steps * sampler.window_count(FRAMES, SETTINGS)
    assert_same_math(out, uninterrupted, f"run with a {kind} state folder")
    assert sorted(os.listdir(folder)) == before, "a partial or temporary file was left on the disk"


# ----------------------------------------------------------------------------------------------
# The CLI: a bad --state-dir is refused up front; everything else runs on
# ----------------------------------------------------------------------------------------------
def _cli(tiny, out: Path, *extra: str, models: Path | None = None) -> list[str]:
    m, image, voice = tiny
    return ["animate", str(image), str(voice), "-o", str(out), "--models", str(models or m), "--steps", "2",
            "--no-interpolate", "--min-resolution", "64", "--device", "cpu", *extra]


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_cli_refuses_an_unusable_state_dir_before_loading(tiny, tmp_path, capsys, disks):
    """An empty models folder: a check made after loading would exit 3 (missing weights) instead."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = disks("ro")
    for state_dir, words in ((afile, f"{afile} is a file, not a folder"),
                             (afile / "sub", f"{afile} is a file, not a folder"),
                             (ro, f"{ro} is not writable (read-only file system)")):
        code = cli.main(["-q", *_cli(tiny, tmp_path / "o.mp4", "--state-dir", str(state_dir),
                                     models=tmp_path / "none")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: --state-dir: {words}") and err.count("\n") == 1, err
        assert "choose a writable folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", ro.name]


def test_cli_runs_on_with_a_full_state_dir_or_a_file_in_the_default_place(tiny, tmp_path, caplog, disks):
    full = disks("full")
    caplog.clear()
    assert cli.main(_cli(tiny, tmp_path / "a.mp4", "--state-dir", str(full))) == 0
    [warning] = _warnings(caplog)
    assert f"could not save the resume state in {full} (no space left on device)" in warning
    assert _frames(tmp_path / "a.mp4") > 0 and os.listdir(full) == ["filler"]
    # the default folder (.b.mp4.resume beside -o) is a file: resume off, one warning, the run goes on
    blocker = tmp_path / ".b.mp4.resume"
    blocker.write_text("not a folder")
    caplog.clear()
    assert cli.main(_cli(tiny, tmp_path / "b.mp4")) == 0
    [warning] = _warnings(caplog)
    assert f"{blocker} is a file, not a folder" in warning and "goes on without resume states" in warning
    assert _frames(tmp_path / "b.mp4") > 0 and blocker.read_text() == "not a folder"


def test_cli_poisoned_states_do_not_block_the_next_run(tiny, tmp_path, caplog):
    """NaN latents (item 11) and steps_done 'abc' (item 12) under the run's own fingerprint: each
    is named, removed, and the run samples from step 1 to a finite video; the retry is clean."""
    states = tmp_path / "states"
    assert cli.main(_cli(tiny, tmp_path / "first.mp4", "--state-dir", str(states))) == 0
    [kept] = states.glob(f"{RESULT_PREFIX}*")  # the run's final latents, under its fingerprint
    state = states / kept.name.replace(RESULT_PREFIX, PREFIX)
    for i, poison in enumerate((dict(latents=lambda x: torch.full_like(x, float("nan")), steps_done="1"),
                                dict(steps_done="abc"))):
        shutil.move(kept, state)
        _poison(state, **poison)
        caplog.clear()
        out = tmp_path / f"retry{i}.mp4"
        assert cli.main(_cli(tiny, out, "--state-dir", str(states), "--resume")) == 0
        [warning] = _warnings(caplog)
        assert str(state) in warning and "discarded (removed it); starting from step 1" in warning, warning
        assert "resuming" not in caplog.text and not state.exists() and kept.is_file()
        assert _frames(out) == _frames(tmp_path / "first.mp4")


# ----------------------------------------------------------------------------------------------
# The node: SONIC_RESUME_DIR unusable or full, a poisoned state: one warning, finite latents
# ----------------------------------------------------------------------------------------------
def test_node_runs_on_when_its_folder_is_unusable_or_full(chain, tmp_path, monkeypatch, caplog, disks):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for folder, words in ((afile, f"{afile} is a file, not a folder"),
                          (disks("ro") / "sonic_resume", "is not writable (read-only file system)"),
                          (disks("full"), "could not save the resume state")):
        caplog.clear()
        latent, steps = run_node(chain, monkeypatch, folder)
        [warning] = _warnings(caplog)
        assert words in warning and "this run goes on without resume states" in warning, warning
        if "could not save" not in warning:
            assert "set SONIC_RESUME_DIR to a writable folder" in warning
        assert steps == [0, 1] and torch.isfinite(latent["samples"]).all()
        assert "sonic_kept_result" not in latent
    assert afile.read_text() == "x"


def test_node_discards_a_nan_state_and_returns_finite_latents(chain, tmp_path, monkeypatch, caplog):
    want, _ = run_node(chain, monkeypatch, tmp_path)
    [kept] = tmp_path.glob(f"{RESULT_PREFIX}*")
    assert want["sonic_kept_result"] == str(kept)
    state = tmp_path / kept.name.replace(RESULT_PREFIX, PREFIX)
    shutil.move(kept, state)
    _poison(state, latents=lambda x: torch.full_like(x, float("nan")), steps_done="1")
    caplog.clear()
    got, steps = run_node(chain, monkeypatch, tmp_path)
    [warning] = _warnings(caplog)
    assert str(state) in warning and "not finite" in warning
    assert steps == [0, 1], "the run must start at step 1"
    assert torch.isfinite(got["samples"]).all() and not state.exists()
    assert_same_math(got["samples"], want["samples"], "node after a NaN state")
