"""Standalone SVD-xt temporal VAE and CLIP image encoder with ComfyUI's call shapes.

ComfyUI workflows normally hand the sampler ComfyUI's own VAE and CLIP_VISION objects. These
wrappers answer the same calls, so the sampler, the tests and the CLI work without ComfyUI:

* ``SVDVAE.encode(pixels [B,H,W,3] in 0..1) -> [B,4,h,w]``: unscaled latent mode (SPEC §7).
* ``SVDVAE.decode(latents [B,4,h,w]) -> [B,H,W,3]`` in 0..1: latents in VAE space (already
  divided by the scaling factor), decoded by the temporal decoder in chunks of consecutive
  frames (``num_frames`` = chunk length, SPEC §11), then ``clamp(x * 0.5 + 0.5, 0, 1)``.
  It reports ``callback(frames done, frames)`` after each chunk; a caller that cannot pass one
  (ComfyUI's VAE Decode node) gets the one ``progress(frames)`` makes, when that is set.
* ``SVDImageEncoder.encode_image(image [B,H,W,3] in 0..1, crop=False)`` -> an object with
  ``image_embeds [B,D]``: the official preprocessing (uint8 -> PIL LANCZOS 224x224 -> CLIP
  mean/std, SPEC §2.4) then ``CLIPVisionModelWithProjection``.

Devices and dtypes are constructor arguments; results are returned on the CPU in float32 like
ComfyUI's intermediate tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import SAMPLER_DEFAULTS, U8_MAX, VAE_SCALE

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None]  # (frames decoded so far, frames in all)

VAE_SUBFOLDER = "vae"
IMAGE_ENCODER_SUBFOLDER = "image_encoder"
CONFIG_FILE = "config.json"
VAE_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
ENCODER_WEIGHT_FILES = (
    "model.safetensors",
    "model.fp16.safetensors",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
)


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


class SVDVAE:
    """SVD-xt ``AutoencoderKLTemporalDecoder`` behind ComfyUI's VAE calls (``encode``/``decode``)."""

    downscale_ratio = VAE_SCALE
    upscale_ratio = VAE_SCALE

    def __init__(
        self,
        model: torch.nn.Module,
        decode_chunk_size: int = SAMPLER_DEFAULTS.decode_chunk_size,
        output_device: torch.device | str = "cpu",
    ):
        if decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size={decode_chunk_size} must be at least 1")
        self.model = model.eval().requires_grad_(False)
        self.decode_chunk_size = int(decode_chunk_size)
        self.output_device = torch.device(output_device)
        # progress(total frames) -> callback, for decodes whose caller passes none (set by the node)
        self.progress: Callable[[int], Callback] | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,H,W,3]`` in 0..1 -> unscaled latent mode ``[B,4,h,w]`` float32.

        Sides that are not multiples of 8 are centre-cropped to the next multiple below (as
        ComfyUI's VAE does).
        """
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError(f"VAE encode takes images [B, H, W, 3] in 0..1, got {tuple(pixels.shape)}")
        h, w = pixels.shape[1:3]
        if h < VAE_SCALE or w < VAE_SCALE:
            raise ValueError(f"image size {w}x{h} is below {VAE_SCALE} px; use a larger image")
        y0, x0 = (h % VAE_SCALE) // 2, (w % VAE_SCALE) // 2
        pixels = pixels[:, y0 : y0 + h - h % VAE_SCALE, x0 : x0 + w - w % VAE_SCALE]  # [B,8k,8m,C]
        p = _param(self.model)
        x = pixels[..., :3].permute(0, 3, 1, 2).to(p.device, torch.float32)  # [B,3,H,W]
        x = ((x - 0.5) / 0.5).to(p.dtype)  # [-1, 1] as the official ref_img
        z = self.model.encode(x).latent_dist.mode()  # [B,4,h,w]
        return z.to(self.output_device, torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int | None = None,
               callback: Callback | None = None) -> torch.Tensor:
        """VAE-space latents ``[B,4,h,w]`` (B = frames) -> images ``[B,H,W,3]`` in 0..1 float32.

        ``callback(done, total)`` (else the one ``self.progress`` gives) runs after every chunk."""
        if latents.ndim != 4:
            raise ValueError(f"VAE decode takes latents [frames, 4, h, w], got {tuple(latents.shape)}")
        if latents.shape[1] != self.latent_channels:  # VAE Decode of another model's latent: say so, not a conv error
            raise ValueError(f"the latent has {latents.shape[1]} channels (shape {tuple(latents.shape)}), but this "
                             f"SVD-xt VAE decodes {self.latent_channels}-channel latents: connect the Sonic "
                             "Sampler's latent (another model's latent needs that model's VAE)")
        chunk = int(chunk_size or self.decode_chunk_size)
        total = latents.shape[0]
        if callback is None and self.progress is not None:
            callback = self.progress(total)
        p = _param(self.model)
        out = []
        for s in range(0, total, chunk):
            z = latents[s : s + chunk].to(p.device, p.dtype)  # [c,4,h,w]
            frames = self.model.decode(z, num_frames=z.shape[0]).sample  # [c,3,H,W]
            frames = (frames.float() * 0.5 + 0.5).clamp(0, 1)
            out.append(frames.permute(0, 2, 3, 1).to(self.output_device))  # [c,H,W,3]
            if callback is not None:
                callback(min(s + chunk, total), total)
        return torch.cat(out, dim=0)  # [B,H,W,3]


@dataclass
class ImageEncoderOutput:
    """What ``encode_image`` returns (the fields of ComfyUI's CLIP vision Output that Sonic uses)."""

    image_embeds: torch.Tensor  # [B,D] projected embedding
    last_hidden_state: torch.Tensor  # [B,T,C]


def _center_square(u8: np.ndarray) -> np.ndarray:
    h, w = u8.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return u8[y0 : y0 + s, x0 : x0 + s]


class SVDImageEncoder:
    """SVD-xt ``CLIPVisionModelWithProjection`` behind ComfyUI's ``encode_image`` call."""

    def __init__(self, model: torch.nn.Module, output_device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.output_device = torch.device(output_device)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = False) -> ImageEncoderOutput:
        """``[B,H,W,3]`` in 0..1 -> embeddings; ``crop`` centre-crops a square first (ComfyUI's default)."""
        from ..image import clip_pixels  # PIL LANCZOS 224 + CLIP mean/std (SPEC §2.4)

        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"encode_image takes images [B, H, W, 3] in 0..1, got {tuple(image.shape)}")
        u8 = (image[..., :3].detach().float().cpu().clamp(0, 1) * U8_MAX).round().to(torch.uint8).numpy()
        pix = torch.stack([clip_pixels(_center_square(x) if crop else x) for x in u8])  # [B,3,224,224]
        p = _param(self.model)
        out = self.model(pixel_values=pix.to(p.device, p.dtype))
        return ImageEncoderOutput(
            image_embeds=out.image_embeds.to(self.output_device, torch.float32),
            last_hidden_state=out.last_hidden_state.to(self.output_device, torch.float32),
        )


# ----------------------------------------------------------------------------------------------
# Loading from a diffusers-format SVD-xt folder (vae/, image_encoder/)
# ----------------------------------------------------------------------------------------------
def _weights_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    from ..paths import optional_file

    for n in names:
        if optional_file(folder / n, what, fix="download it again"):  # a FIFO or folder there is said
            return folder / n
    raise FileNotFoundError(
        f"{what}: none of {list(names)} in {folder}; download the SVD-xt folder "
        "(stabilityai/stable-video-diffusion-img2vid-xt) with its vae/ and image_encoder/"
    )


def _read_config(folder: Path, what: str) -> dict:
    from ..paths import optional_file

    cfg = folder / CONFIG_FILE
    if not optional_file(cfg, what, fix="download it again"):  # a FIFO or folder there is said
        raise FileNotFoundError(
            f"{what}: {cfg} is missing; point to a diffusers-format SVD-xt folder "
            f"containing {VAE_SUBFOLDER}/ and {IMAGE_ENCODER_SUBFOLDER}/"
        )
    from ..weights import CheckpointError, negative_dimensions

    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError: a damaged download
        raise CheckpointError(f"{what}: {cfg} cannot be read ({type(e).__name__}: {e}); download it again "
                              "from stabilityai/stable-video-diffusion-img2vid-xt") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {cfg} must be a JSON object, found {type(data).__name__}; download "
                              "it again")
    bad = negative_dimensions(data)
    if bad:
        raise CheckpointError(f"{what}: {cfg} has negative dimension(s) {', '.join(bad)}; download it again")
    return data


def _build(factory, config: dict, folder: Path, what: str) -> torch.nn.Module:
    """``factory(config)``, with a model-building error turned into one that names the config file."""
    from ..weights import CheckpointError

    try:
        return factory(config)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{what}: {folder / CONFIG_FILE} does not describe a usable model "
                              f"({type(e).__name__}: {e}); download it again") from e


def build_vae(config: dict) -> torch.nn.Module:
    """``AutoencoderKLTemporalDecoder`` from a config dict (``_``-keys ignored), random weights."""
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder.from_config({k: v for k, v in config.items()})


def build_image_encoder(config: dict) -> torch.nn.Module:
    """``CLIPVisionModelWithProjection`` from a ``CLIPVisionConfig`` dict, random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return CLIPVisionModelWithProjection(cfg)


def _load_into(
    model: torch.nn.Module, path: Path, what: str, dtype: torch.dtype, device: torch.device | str
) -> torch.nn.Module:
    from ..weights import check_keys, read_state_dict

    sd = read_state_dict(path)
    expected = model.state_dict()
    # buffers that transformers recreates (e.g. position_ids) may be absent from older files
    for k in [k for k in expected if k not in sd and k.endswith("position_ids")]:
        sd[k] = expected[k]
    check_keys(model, sd, f"{what} {path}")
    model.load_state_dict(sd, strict=True)
    # nn.Module.to: diffusers' ModelMixin.to warns about float32-kept modules on every dtype cast
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    decode_chunk_size: int = SAMPLER_DEFAULTS.decode_chunk_size,
) -> SVDVAE:
    """``SVDVAE`` from ``folder/vae`` (``folder`` may also be the vae folder itself)."""
    from .. import identify

    folder = Path(folder)
    sub = folder / VAE_SUBFOLDER if (folder / VAE_SUBFOLDER).is_dir() else folder
    with identify.expecting(sub, identify.SVD_VAE):  # another model's folder: says which
        model = _build(build_vae, _read_config(sub, "SVD VAE"), sub, "SVD VAE")
        model = _load_into(model, _weights_file(sub, VAE_WEIGHT_FILES, "SVD VAE"), "SVD VAE", dtype, device)
    return SVDVAE(model, decode_chunk_size)


def load_image_encoder(folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> SVDImageEncoder:
    """``SVDImageEncoder`` from ``folder/image_encoder`` (or that folder itself)."""
    from .. import identify

    folder = Path(folder)
    sub = folder / IMAGE_ENCODER_SUBFOLDER if (folder / IMAGE_ENCODER_SUBFOLDER).is_dir() else folder
    with identify.expecting(sub, identify.CLIP):  # another model's folder: says which
        model = _build(build_image_encoder, _read_config(sub, "SVD image encoder"), sub, "SVD image encoder")
        model = _load_into(model, _weights_file(sub, ENCODER_WEIGHT_FILES, "SVD image encoder"),
                           "SVD image encoder", dtype, device)
    return SVDImageEncoder(model)


def load_svd(
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    decode_chunk_size: int = SAMPLER_DEFAULTS.decode_chunk_size,
) -> tuple[SVDVAE, SVDImageEncoder]:
    """VAE and image encoder of a diffusers-format SVD-xt folder."""
    from .. import identify
    from ..paths import FOLDER, check_input

    with identify.expecting(folder, identify.SVD):  # the whole folder is named (not its vae/ part)
        folder = check_input(folder, "SVD-xt folder", FOLDER,
                             fix=f"give the diffusers SVD-xt folder, with {VAE_SUBFOLDER}/ and "
                                 f"{IMAGE_ENCODER_SUBFOLDER}/")
        return (load_vae(folder, dtype, device, decode_chunk_size), load_image_encoder(folder, dtype, device))
