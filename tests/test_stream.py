"""sonic_core.stream: decode -> RIFE -> encode in chunks gives the one-pass frames (issue 14)."""

from __future__ import annotations

import av
import pytest
import torch

from sonic_core import interpolate, stream, video
from sonic_core.models import svd
from sonic_core.selftest import TINY_VAE
from tests._golden import assert_same_math, rel_err, same_math_tol
from tests.test_rife import _tiny_rife

FRAMES = 11  # latents: not a multiple of the chunk, so the last decode chunk is short
CHUNK = 4  # frames per temporal-decoder chunk


class CountingVAE:
    """An SVDVAE that records the size of every decode call (a whole-clip call would show here)."""

    def __init__(self, vae: svd.SVDVAE):
        self.vae, self.calls = vae, []

    def decode(self, latents, chunk_size=None):
        self.calls.append(latents.shape[0])
        return self.vae.decode(latents, chunk_size)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = svd.build_vae(TINY_VAE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    latents = torch.randn(FRAMES, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # [F,4,h,w]
    return svd.SVDVAE(model, decode_chunk_size=CHUNK), _tiny_rife(seed=2), latents


def _one_pass(vae, rife, latents, multiplier):
    frames = vae.decode(latents)  # [F,H,W,3], the temporal decoder's own chunks
    return frames if rife is None else interpolate.interpolate(rife, frames, multiplier, 3)


@pytest.mark.parametrize("multiplier", [None, 2, 4])
def test_streamed_frames_equal_one_pass(tiny, multiplier):
    vae, rife, latents = tiny
    counting = CountingVAE(vae)
    use = rife if multiplier else None
    seen = []
    frames = stream.video_frames(counting, latents, CHUNK, use, multiplier or 2, 3,
                                 callback=lambda d, t: seen.append((d, t)))
    assert counting.calls == [], "nothing may run before the stream is consumed"
    got = torch.stack(list(frames))  # [N,H,W,3]
    want = _one_pass(vae, use, latents, multiplier or 2)
    assert len(frames) == got.shape[0] == want.shape[0]
    assert counting.calls == [CHUNK] * (FRAMES // CHUNK) + [FRAMES % CHUNK]  # never the whole clip
    # the same arithmetic on the same frames; RIFE batches differ at chunk borders (other GEMM sizes)
    assert_same_math(got, want, f"streamed vs one pass (x{multiplier})")
    if multiplier:
        pairs = FRAMES - 1 if multiplier == 2 else (FRAMES - 1) + (2 * FRAMES - 2)
        assert seen[-1] == (pairs, pairs), "progress ends at the total number of RIFE pairs"
        # the pair straddling the first chunk border is interpolated from frames 3 and 4
        border = 2 * (CHUNK - 1) + 1
        if multiplier == 2:
            mid = interpolate.interpolate(rife, want[[border - 1, border + 1]], 2, 1)[1]
            assert_same_math(got[border], mid, "border pair")
        # planted bug: a stream that dropped the carried frame would shift every later frame
        shifted = torch.cat([got[:1], got[:-1]])
        assert rel_err(shifted, want) > 100 * same_math_tol()


def test_stream_encodes_and_decodes_back(tiny, tmp_path):
    vae, rife, latents = tiny
    frames = stream.video_frames(vae, latents, CHUNK, rife, 2, 4)
    path = video.write_video(frames, str(tmp_path / "s.mp4"), 25.0)
    with av.open(path) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert n == 2 * FRAMES - 1


def test_stream_rejects_bad_arguments(tiny):
    vae, rife, latents = tiny
    with pytest.raises(ValueError, match="chunk size 0"):
        list(stream.decode_chunks(vae, latents, 0))
    with pytest.raises(ValueError, match="at least 2 frames"):
        stream.video_frames(vae, latents[:1], CHUNK, rife)
    with pytest.raises(ValueError, match="multiplier 3"):
        list(stream.interpolate_chunks(rife, [latents], 3))
