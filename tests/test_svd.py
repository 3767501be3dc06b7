"""Standalone SVD-xt VAE + image encoder (sonic_core.models.svd) and the SonicSVDLoader node."""

from __future__ import annotations

import copy

import pytest
import torch

from sonic_core.config import VAE_SCALING_FACTOR
from sonic_core.models import svd
from sonic_core.weights import CheckpointError, save_safetensors
from tests._golden import assert_same_math, rel_err, same_math_tol
from tests._interrupt import cancel_during_next_job
from tests._model_files import write_golden_svd_folder


def _vae(g) -> svd.SVDVAE:
    model = svd.build_vae(g.models["vae"])
    model.load_state_dict(g.weights("vae"), strict=True)
    return svd.SVDVAE(model, decode_chunk_size=g.case.decode_chunk_size)


def _clip(g) -> svd.SVDImageEncoder:
    model = svd.build_image_encoder(g.models["image_encoder"])
    sd = g.weights("image_encoder")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return svd.SVDImageEncoder(model)


def _pixels(g) -> torch.Tensor:
    return g.t("pre.image_resized_u8").to(torch.float32)[None] / 255.0  # [1,H,W,3]


def _float64(g, wrapper):
    """The same module in float64: its output minus the float32 one is this case's round-off floor."""
    model = copy.deepcopy(wrapper.model).double()
    return svd.SVDVAE(model, decode_chunk_size=g.case.decode_chunk_size) if isinstance(
        wrapper, svd.SVDVAE) else svd.SVDImageEncoder(model)


def _planted(wrapper, part: str, factor: float = 1.01):
    """A copy with the first GroupNorm/LayerNorm weight of ``part`` ``factor`` x off (a key
    mis-assigned or cast wrongly): every parity tolerance here must fail it."""
    model = copy.deepcopy(wrapper.model)
    norm = next(m for m in getattr(model, part).modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)))
    norm.weight.data.mul_(factor)
    return type(wrapper)(model)


# Parity with the official float32 outputs: same_math_tol of the float32 round-off floor measured
# on this case (float32 vs float64 of the same module), as in test_unet. Measured on AMD EPYC
# (AVX2 and ATen default kernels, 1 thread): encode floor 2.0-2.5e-6, ours vs official 2.7-3.4e-6
# (1.01e-5 seen on another machine: a fixed 1e-5 failed); CLIP floor 2.2e-7, vs official 1.5-2.4e-7;
# planted 1 % norm weight: encode 2.3e-3, CLIP 2.9e-4, far outside.
def test_vae_encode_parity(golden):
    vae, px = _vae(golden), _pixels(golden)
    z = vae.encode(px)  # [1,4,h,w]
    floor = rel_err(z, _float64(golden, vae).encode(px))
    want = golden.t("pipe.image_latents")[1, 0]
    assert_same_math(z[0], want, f"image latents (mode), float32 round-off floor {floor:.1e}", floor=floor)
    ref = z * VAE_SCALING_FACTOR
    assert_same_math(ref, golden.t("pipe.ref_image_latents"), "ref image latents", floor=floor)
    # planted bug: one GroupNorm weight of the encoder 1 % off
    assert rel_err(_planted(vae, "encoder").encode(px)[0], want) > 10 * same_math_tol(floor)


def test_vae_decode_parity(golden):
    lat = golden.t("pipe.latents_final")[0] * (1.0 / VAE_SCALING_FACTOR)  # [F,4,h,w] VAE space
    vae = _vae(golden)
    frames = vae.decode(lat)  # [F,H,W,3]
    floor = rel_err(frames, _float64(golden, vae).decode(lat))  # measured 1.1e-6 (vs official 1.1e-6)
    want = golden.t("out.video")[0].permute(1, 2, 3, 0)  # [3,F,H,W] -> [F,H,W,3]
    assert_same_math(frames, want, f"decoded frames, float32 round-off floor {floor:.1e}", floor=floor)
    # planted bug: the decoder's last GroupNorm weight 1 % off (measured 6.9e-3)
    bad = copy.deepcopy(vae.model)
    bad.decoder.conv_norm_out.weight.data.mul_(1.01)
    bad_frames = svd.SVDVAE(bad, decode_chunk_size=golden.case.decode_chunk_size).decode(lat)
    assert rel_err(bad_frames, want) > 10 * same_math_tol(floor)


def _latents(g) -> torch.Tensor:
    """VAE-space latents [F,4,h,w] for the decode checks that need no official output: the case's
    input noise (an official input of every case, whatever its sampler settings)."""
    return g.t("input.latents_noise")[0]


def test_vae_decode_chunking_matters(golden):
    """The temporal decoder mixes frames inside a chunk: chunk 1 must differ from the case's chunk."""
    vae = _vae(golden)
    lat = _latents(golden)
    if lat.shape[0] < 2:
        pytest.skip("one frame: chunking cannot matter")
    assert (vae.decode(lat, chunk_size=1) - vae.decode(lat)).abs().max() > 1e-6


def test_clip_parity(golden):
    clip, px = _clip(golden), _pixels(golden)
    out = clip.encode_image(px, crop=False)
    floor = rel_err(out.image_embeds, _float64(golden, clip).encode_image(px, crop=False).image_embeds)
    want = golden.t("clip.image_embeds")
    assert_same_math(out.image_embeds, want, f"image embeds, float32 round-off floor {floor:.1e}", floor=floor)
    # planted bug: the first LayerNorm weight 1 % off
    bad = _planted(clip, "vision_model").encode_image(px, crop=False).image_embeds
    assert rel_err(bad, want) > 10 * same_math_tol(floor)


def test_encode_crops_to_multiple_of_8_and_rejects_tiny(golden):
    vae = _vae(golden)
    px = _pixels(golden)  # [1,H,W,3]
    padded = torch.nn.functional.pad(px.permute(0, 3, 1, 2), (2, 3, 1, 2)).permute(0, 2, 3, 1)  # +5 w, +3 h
    # the crop is a strided view of other memory: same math, possibly other convolution kernels
    assert_same_math(vae.encode(padded), vae.encode(px), "encode of the padded image vs the image")
    with pytest.raises(ValueError, match="below 8 px"):
        vae.encode(torch.zeros(1, 4, 64, 3))


def test_svd_loader_node_parity(golden, tmp_path):
    from nodes.nodes_svd import SonicSVDLoader

    write_golden_svd_folder(golden, tmp_path, vae_file="diffusion_pytorch_model.fp16.safetensors")
    vae, clip = SonicSVDLoader().load(str(tmp_path), "fp32", golden.case.decode_chunk_size)
    px = _pixels(golden)
    z = vae.encode(px)
    floor = rel_err(z, _float64(golden, vae).encode(px))  # the tolerances of the parity tests above
    assert_same_math(z[0], golden.t("pipe.image_latents")[1, 0], "node VAE encode", floor=floor)
    emb = clip.encode_image(px, crop=False).image_embeds
    floor = rel_err(emb, _float64(golden, clip).encode_image(px, crop=False).image_embeds)
    assert_same_math(emb, golden.t("clip.image_embeds"), "node CLIP embeds", floor=floor)


def test_svd_loader_wrong_weights(golden, tmp_path):
    write_golden_svd_folder(golden, tmp_path, vae_file="diffusion_pytorch_model.fp16.safetensors")
    bad = dict(golden.weights("vae"))
    bad.pop(next(iter(bad)))
    bad["extra.weight"] = torch.zeros(1)
    save_safetensors(bad, tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        svd.load_vae(tmp_path, torch.float32, "cpu")


def test_svd_loader_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        svd.load_svd(tmp_path / "nope", torch.float32, "cpu")


def test_svd_loader_lists_diffusers_folders(tmp_path, monkeypatch):
    from nodes.nodes_svd import DEFAULT_FOLDER, SonicSVDLoader

    monkeypatch.setenv("SONIC_MODELS_DIR", str(tmp_path))
    assert SonicSVDLoader.INPUT_TYPES()["required"]["svd_folder"][0] == [DEFAULT_FOLDER]
    for sub in ("svd/vae", "svd/image_encoder", "only_vae/vae"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "config.json").write_text("{}")
    assert SonicSVDLoader.INPUT_TYPES()["required"]["svd_folder"][0] == ["svd"]


def test_vae_decode_reports_progress_per_chunk(golden, tmp_path, monkeypatch):
    """Long decodes show progress: after every chunk, to the caller's callback or, for ComfyUI's VAE
    Decode node (no callback), to the bar the loader node attaches; cancel stops between chunks."""
    from nodes import runtime
    from nodes.nodes_svd import SonicSVDLoader

    lat = _latents(golden)  # [F,4,h,w]
    frames = lat.shape[0]
    seen = []
    _vae(golden).decode(lat, chunk_size=2, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(min(s + 2, frames), frames) for s in range(0, frames, 2)]

    write_golden_svd_folder(golden, tmp_path, vae_file="diffusion_pytorch_model.fp16.safetensors")
    vae, _clip = SonicSVDLoader().load(str(tmp_path), "fp32", 1)
    bars = []
    real = runtime.Progress

    class Recording(real):
        def __init__(self, total, what="Sonic"):
            super().__init__(total, what)
            bars.append(self)

    monkeypatch.setattr(runtime, "Progress", Recording)
    vae.decode(lat)  # as ComfyUI's VAEDecode calls it
    assert len(bars) == 1 and bars[0].current == bars[0].total == frames
    if frames > 1:
        with cancel_during_next_job(), pytest.raises(runtime.InterruptProcessingException):
            vae.decode(lat)
