"""SonicSVDLoader: the SVD-xt temporal VAE and CLIP image encoder without ComfyUI's checkpoint loader.

Gives sonic_core's own implementations (``sonic_core.models.svd``) as VAE and CLIP_VISION. They
answer the calls Sonic and ComfyUI's VAE Encode / VAE Decode nodes make (``encode``, ``decode``,
``encode_image(image, crop=False)``), and they load from a diffusers-format SVD-xt folder, the
layout the official instructions download; small test models in that layout work too.
These objects are not under ComfyUI's model management: they stay on the load device.
"""

from __future__ import annotations

import logging
import os

from . import runtime
from .runtime import core

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "stable-video-diffusion-img2vid-xt"
_cache: dict[tuple, tuple] = {}  # one entry: (folder, mtimes, dtype, chunk, device) -> (vae, clip)


def _stamp(folder: str) -> tuple:
    out = []
    for sub in ("vae", "image_encoder"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            out += [(f, os.path.getmtime(os.path.join(d, f))) for f in sorted(os.listdir(d))]
    return tuple(out)


def _svd_download_command() -> str:
    pipeline = core("pipeline")
    svd = next(d for d in pipeline.DOWNLOADS if d.repo == pipeline.SVD_REPO)
    return svd.command("sonic")


def svd_folders() -> list[str]:
    """Folders under models/sonic that hold a diffusers SVD layout (vae/ and image_encoder/)."""
    found = []
    for rel in runtime.list_subfolders("config.json"):
        parent, _, leaf = rel.rpartition("/")
        if leaf == "vae" and parent and f"{parent}/image_encoder" in runtime.list_subfolders("config.json"):
            found.append(parent)
    return sorted(set(found)) or [DEFAULT_FOLDER]


class SonicSVDLoader:
    DESCRIPTION = (
        "Loads the SVD-xt temporal VAE (vae/) and CLIP image encoder (image_encoder/) from a "
        "diffusers-format SVD-xt folder and gives them as VAE and CLIP_VISION. Use it when you "
        "have the diffusers folder instead of the single svd_xt checkpoint; the Sonic Sampler "
        "takes either. The CLIP preprocessing here is the official one (LANCZOS to 224)."
    )
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("svd", "stable video diffusion", "svd vae", "clip vision",
                                            "image encoder")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("decode_chunk_size",)
    FUNCTION = "load"
    RETURN_TYPES = ("VAE", "CLIP_VISION")
    RETURN_NAMES = ("vae", "clip_vision")
    OUTPUT_TOOLTIPS = (
        "SVD-xt temporal VAE (decode in chunks of consecutive frames).",
        "SVD-xt CLIP ViT-H/14 image encoder with projection.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        cfg = core("config")
        return runtime.advanced({
            "required": {
                "svd_folder": (
                    svd_folders(),
                    {
                        "tooltip": (
                            "Diffusers-format SVD-xt folder in models/sonic holding vae/ and "
                            "image_encoder/. The repository is gated: accept its licence on "
                            "huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt and run "
                            "'hf auth login', then from ComfyUI/models: " + _svd_download_command()
                            + " (1.46 GB; README 'Weights')."
                        ),
                    },
                ),
                "dtype": (
                    runtime.DTYPE_CHOICES,
                    {
                        "default": "auto",
                        "tooltip": (
                            "Weight dtype; auto asks ComfyUI (fp16 on most GPUs, fp32 on CPU). The "
                            "official run uses fp16."
                        ),
                    },
                ),
                "decode_chunk_size": cfg.LIMITS["decode_chunk_size"].widget(
                    "Frames the temporal decoder sees together (official 8). It changes the result "
                    "slightly; lower it to save memory."
                ),
            }
        }, cls.ADVANCED_INPUTS)

    def load(self, svd_folder: str, dtype: str = "auto", decode_chunk_size: int = 8):
        folder = runtime.resolve_path(svd_folder.strip())
        if not os.path.isdir(folder):
            ident = core("identify")
            said = ident.mismatch(folder, ident.SVD)  # another model's file: which one
            raise ValueError(
                f"svd_folder {svd_folder!r} is not a folder{'; ' + said if said else ''}; give the diffusers "
                "SVD-xt folder that contains vae/ and image_encoder/"
            )
        device = runtime.load_device()
        torch_dtype = runtime.resolve_dtype(dtype, device)
        key = (folder, _stamp(folder), str(torch_dtype), int(decode_chunk_size), str(device))
        if key not in _cache:
            _cache.clear()
            vae, clip = core("models.svd").load_svd(folder, torch_dtype, device, int(decode_chunk_size))
            vae.output_device = clip.output_device = runtime.intermediate_device()
            # ComfyUI's VAE Decode node calls vae.decode(latents) with no callback: a progress bar
            # per decode, cancellable between chunks
            vae.progress = lambda frames: runtime.Progress(frames, "VAE decode").callback()
            _cache[key] = (vae, clip)
        return _cache[key]


NODE_CLASS_MAPPINGS = {"SonicSVDLoader": SonicSVDLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicSVDLoader": "SVD VAE + Image Encoder Loader"}
