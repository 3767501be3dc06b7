"""Which model a file or folder looks like, so a model input pointed at another model's file says so.

``identify(path)`` reads only what names a model: a folder's ``config.json`` (``model_type``,
``_class_name``) or ``model_index.json``, a safetensors header's keys, a pickle's keys (memory-mapped
when it is a zip), whether a zip holds TorchScript code. The key patterns are those of the official
checkpoints (tests/fixtures manifests: unet.pth's IP-adapter ``to_k_ip`` keys, the audio heads'
``proj1..3`` with or without ``norm``, RIFE's ``block0..2`` / ``block_tea``, whisper's ``encoder.conv1``,
the temporal VAE's ``time_conv_out``, CLIP's ``vision_model``).

``expecting(path, expected)`` wraps a loader: when the load fails and ``path`` looks like another
model, the error says which one it looks like and which one the input expects.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# the models of this pack, as the errors name them
UNET = "the Sonic UNet (Sonic/unet.pth)"
SVD_UNET = "an SVD UNet without Sonic's audio layers (not Sonic/unet.pth)"
AUDIO2TOKEN = "audio2token (Sonic/audio2token.pth)"
AUDIO2BUCKET = "audio2bucket (Sonic/audio2bucket.pth)"
WHISPER = "whisper-tiny (the whisper-tiny folder)"
SVD = "the SVD-xt folder (stable-video-diffusion-img2vid-xt, with vae/ and image_encoder/)"
SVD_VAE = "the SVD-xt VAE (stable-video-diffusion-img2vid-xt/vae)"
CLIP = "the SVD-xt CLIP image encoder (stable-video-diffusion-img2vid-xt/image_encoder)"
RIFE = "RIFE (RIFE/flownet.pkl)"
DETECTOR = "a TorchScript model such as the face detector (yoloface_v5m.pt)"
MODELS_FOLDER = "the Sonic models folder (models/sonic, holding Sonic/unet.pth)"

CONFIG_FILE = "config.json"
MODEL_INDEX_FILE = "model_index.json"
MAX_JSON_BYTES = 1 << 20  # a model config is a few KB; a larger "config" is not read
MODEL_TYPES = {"whisper": WHISPER, "clip_vision_model": CLIP}  # config.json model_type -> model
CLASS_NAMES = {"AutoencoderKLTemporalDecoder": SVD_VAE, "CLIPVisionModelWithProjection": CLIP,
               "UNetSpatioTemporalConditionModel": SVD_UNET, "StableVideoDiffusionPipeline": SVD,
               "WhisperForConditionalGeneration": WHISPER, "WhisperModel": WHISPER}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl")
STATE_PREFIXES = ("module.", "model.")  # DataParallel / Hugging Face wrappers


def identify_keys(keys: Iterable[str]) -> str | None:
    """The model whose state dict has these keys, or None."""
    ks = set()
    for k in keys:
        for prefix in STATE_PREFIXES:
            k = k.removeprefix(prefix)
        ks.add(k)
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in ks):
        return UNET if any(".to_k_ip." in k for k in ks) else SVD_UNET
    if {"proj1.weight", "proj2.weight", "proj3.weight"} <= ks:
        return AUDIO2TOKEN if "norm.weight" in ks else AUDIO2BUCKET
    if any(k.startswith(("block0.conv0.", "block_tea.")) for k in ks):
        return RIFE
    if "encoder.conv1.weight" in ks or ("conv1.weight" in ks and "embed_positions.weight" in ks):
        return WHISPER
    if "decoder.time_conv_out.weight" in ks or ("quant_conv.weight" in ks and "encoder.conv_in.weight" in ks):
        return SVD_VAE
    if any(k.startswith("vision_model.") for k in ks):
        return CLIP
    return None


def _json(path: Path) -> dict | None:
    from .paths import FILE, describe_path

    if describe_path(path)[0] != FILE:  # never open a FIFO, a device...
        return None
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _from_config(data: dict | None) -> str | None:
    if not data:
        return None
    return MODEL_TYPES.get(str(data.get("model_type"))) or CLASS_NAMES.get(str(data.get("_class_name"))) or \
        next((CLASS_NAMES[a] for a in data.get("architectures") or [] if a in CLASS_NAMES), None)


def _file_keys(path: Path) -> list[str] | None:
    """The tensor names of a checkpoint file, read as cheaply as its format allows; None if unreadable."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from .weights import check_safetensors_header  # bounded header, refused before parsing
            from .config import SAFETENSORS_HEADER_LENGTH_BYTES

            check_safetensors_header(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(SAFETENSORS_HEADER_LENGTH_BYTES), "little")
                header = json.loads(f.read(n))
            return [k for k in header if k != "__metadata__"]
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception:  # noqa: BLE001 - a file that cannot be read names no model
        return None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        return [k for k in obj if isinstance(k, str)]
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist()[:4096])
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def identify(path: str | os.PathLike) -> str | None:
    """Which model of this pack ``path`` (file or folder) looks like, or None. Never opens a
    path that is not a regular file or folder."""
    from .paths import FILE, FOLDER, describe_path

    path = Path(path)
    kind, _ = describe_path(path)
    if kind == FOLDER:
        found = _from_config(_json(path / CONFIG_FILE)) or _from_config(_json(path / MODEL_INDEX_FILE))
        if found:
            return found
        if (path / "vae").is_dir() and (path / "image_encoder").is_dir():
            return SVD
        if (path / "Sonic" / "unet.pth").is_file() or (path / "Sonic").is_dir():
            return MODELS_FOLDER
        return None
    if kind != FILE:
        return None
    if path.suffix.lower() == ".json":
        return _from_config(_json(path))
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return DETECTOR
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        keys = _file_keys(path)
        return identify_keys(keys) if keys else None
    return None


def mismatch(path: str | os.PathLike, expected: str) -> str | None:
    """"``path`` looks like X, not E, which this input loads" when it looks like another model; else None."""
    found = identify(path)
    if found is None or found == expected:
        return None
    return (f"{os.fspath(path)} looks like {found}, not {expected}, which this input loads: point it at "
            "that model's file or folder instead")


_OUTER = contextvars.ContextVar("sonic_identify_outer", default=None)  # the outermost expectation wins


@contextlib.contextmanager
def expecting(path: str | os.PathLike, expected: str):
    """Around a loader: an error while loading ``path`` says which model the path looks like when it
    is not ``expected`` (the error's type is kept where it can carry the new message). Nested uses
    (the SVD folder's VAE part) leave it to the outermost, which names what the user gave."""
    if _OUTER.get() is not None:
        yield
        return
    token = _OUTER.set(expected)
    try:
        yield
    except (ValueError, OSError, RuntimeError, TypeError, KeyError) as e:
        said = mismatch(path, expected)
        if said is None:
            raise
        message = f"{said} (the load failed: {e})"
        try:
            err = type(e)(message)
        except Exception:  # noqa: BLE001 - an error class with another signature
            from .weights import CheckpointError

            err = CheckpointError(message)
        raise err from e
    finally:
        _OUTER.reset(token)
