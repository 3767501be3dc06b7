"""Several faces sampled together (sonic_core/sampler_faces.py, issue 30 item 7): windows of different
faces share UNet calls, and each face's result is its own single-face ``sampler.sample`` run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sonic_core import sampler, sampler_faces, selftest
from sonic_core.config import SAMPLER_DEFAULTS
from sonic_core.models.unet import build_sonic_unet
from sonic_core.resume import PREFIX, RESULT_PREFIX, ResumeStore
from tests._golden import rel_err, same_math_tol

FRAMES = 7
K = 4  # audio tokens per frame
# 4 windows a step (starts 0, 2, 4, 6 of 3 frames, overlap 1: shared frames and the wrap-around)
SETTINGS = dataclasses.replace(SAMPLER_DEFAULTS, steps=3, frames_per_window=3, overlap=1, shift_offset=2)
HW = (8, 12)  # latent h, w of faces 1 and 2 (image 64 x 96); face 3's crop is another size
OTHER_HW = (8, 8)


class Stop(Exception):
    pass


def _face(seed: int, hw=HW, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    d = selftest.TINY_WIDTH
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 8 + 4 * seed : 40 + 4 * seed, 10:50] = 1.0  # each face its own mask
    face = dict(
        image_latents=torch.randn(1, 4, h, w, generator=gen),
        ref_latents=torch.randn(1, 4, h, w, generator=gen),
        clip_embeds=torch.randn(1, d, generator=gen), cond_tokens=torch.randn(FRAMES, K, d, generator=gen),
        uncond_tokens=torch.randn(K, d, generator=gen), buckets=torch.rand(FRAMES, 2, generator=gen) * 100,
        face_mask=mask, noise=torch.randn(FRAMES, 4, h, w, generator=gen),
    )
    return {k: v.to(dtype) for k, v in face.items()}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = build_sonic_unet(dict(selftest.TINY_UNET)).eval().requires_grad_(False)
    with torch.no_grad():  # off the default init (norms, mix factors), so every input matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def alone(unet):
    """Each face's own single-face run (one window per call), float32 and float64 (the floor)."""
    out = {}
    for seed, hw in ((1, HW), (2, HW), (3, OTHER_HW)):
        out[seed] = sampler.sample(unet, **_face(seed, hw), settings=SETTINGS)
        out[seed, "f64"] = sampler.sample(unet.double(), **_face(seed, hw, torch.float64), settings=SETTINGS,
                                          dtype=torch.float64)
        unet.float()
    return out


def _calls(unet):
    rows = []
    return rows, unet.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))


def test_two_faces_share_calls_each_equals_its_own_run(unet, alone):
    """Faces 1 and 2 (same latent shape) share UNet calls (3 windows a call: the second call holds
    windows of both faces), face 3 (another crop size) runs on its own; each result is its single-face run's
    within the same-math tolerance of this case's float32 round-off floor (float32 vs float64)."""
    rows, hook = _calls(unet)
    seen = []
    try:
        out = sampler_faces.sample_faces(unet, [_face(1), _face(2), _face(3, OTHER_HW)], settings=SETTINGS,
                                         window_batch=3, callback=lambda d, t, p: seen.append((d, t)))
    finally:
        hook.remove()
    # per step: faces 1+2 have 8 windows -> calls of 3, 3, 2 windows; then face 3's steps: 4 windows, 3 + 1
    assert rows == [9, 9, 6] * SETTINGS.steps + [9, 3] * SETTINGS.steps, rows
    assert seen == [(d, 36) for d in range(1, 37)]
    for k, seed in enumerate((1, 2, 3)):
        floor = rel_err(alone[seed], alone[seed, "f64"])
        err = rel_err(out[k], alone[seed])
        print(f"face {seed}: shared vs alone {err:.2e} relative, float32 floor {floor:.2e}")
        assert err <= same_math_tol(floor), f"face {seed}: {err:.2e} > {same_math_tol(floor):.2e}"
    assert rel_err(out[0], out[1]) > 1e-2  # the faces differ: no face got another's conditioning


def test_float64_shared_calls_are_the_single_face_math(unet, alone):
    """In float64 the shared call is the same arithmetic per window (strict: a window that saw another
    face's mask, tokens or latents would be far off)."""
    faces = [_face(1, dtype=torch.float64), _face(2, dtype=torch.float64)]
    out = sampler_faces.sample_faces(unet.double(), faces, settings=SETTINGS, dtype=torch.float64,
                                     window_batch=8)
    unet.float()
    assert rel_err(out[0], alone[1, "f64"]) < 1e-10 and rel_err(out[1], alone[2, "f64"]) < 1e-10


def test_cancel_then_resume_every_face_from_its_state(unet, alone, tmp_path):
    """A stop inside step 2 leaves each face's state at step 1 (its own fingerprint, the same as its
    single-face run's); the resumed run samples only steps 2.. and gives the uninterrupted result.
    A face whose sampling is kept returns it without sampling, the other resumes alone."""
    store = ResumeStore(tmp_path, resume=True)

    def stop_at(n):
        def cb(done, total, _p):
            if done == n:
                raise Stop
        return cb

    with pytest.raises(Stop):  # 8 windows a step: window 10 is in step 2
        sampler_faces.sample_faces(unet, [_face(1), _face(2)], settings=SETTINGS, window_batch=3,
                                   callback=stop_at(10), resume=store)
    assert len(list(tmp_path.glob(f"{PREFIX}*"))) == 2
    rows, hook = _calls(unet)
    seen = []
    try:
        out = sampler_faces.sample_faces(unet, [_face(1), _face(2)], settings=SETTINGS, window_batch=3,
                                         callback=lambda d, t, p: seen.append(d), resume=store)
    finally:
        hook.remove()
    assert rows == [9, 9, 6] * (SETTINGS.steps - 1) and seen[0] == 9, (rows, seen[:3])
    for k, seed in enumerate((1, 2)):
        assert rel_err(out[k], alone[seed]) <= same_math_tol(rel_err(alone[seed], alone[seed, "f64"]))
    assert not list(tmp_path.glob(f"{PREFIX}*")), "finished: no state left"

    keep = ResumeStore(tmp_path / "keep", resume=True, keep_bytes=1 << 30)
    first = sampler.sample(unet, **_face(1), settings=SETTINGS, resume=keep)  # face 1 sampled alone, kept
    with pytest.raises(Stop):
        # face 2 alone: stopped in step 2, its state at step 1
        sampler.sample(unet, **_face(2), settings=SETTINGS, callback=stop_at(5), resume=keep)
    kept, rows = [], []
    hook = unet.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        both = sampler_faces.sample_faces(unet, [_face(1), _face(2)], settings=SETTINGS, window_batch=3,
                                          resume=keep, kept=kept)
    finally:
        hook.remove()
    assert torch.equal(both[0], first), "face 1: the kept result, not sampled again"
    assert rows == [9, 3] * (SETTINGS.steps - 1), "only face 2 samples, from step 2"
    assert rel_err(both[1], alone[2]) <= same_math_tol(rel_err(alone[2], alone[2, "f64"]))
    assert len(kept) == 2 and all(p.name.startswith(RESULT_PREFIX) for p in kept)


def test_refusals():
    with pytest.raises(ValueError, match="frames"):
        short = _face(2)
        short["noise"] = short["noise"][:5]
        sampler_faces.sample_faces(None, [_face(1), short], settings=SETTINGS)
    with pytest.raises(ValueError, match="some faces have a face mask"):
        sampler_faces.sample_faces(None, [_face(1), dict(_face(2), face_mask=None)], settings=SETTINGS)
    with pytest.raises(ValueError, match="lacks the inputs"):
        sampler_faces.sample_faces(None, [{"noise": torch.zeros(1)}], settings=SETTINGS)
