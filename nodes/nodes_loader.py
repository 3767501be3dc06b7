"""SonicLoader: the Sonic UNet, audio2token, audio2bucket and whisper-tiny (type SONIC_MODEL)."""

from __future__ import annotations

import json
import logging
import os

from . import runtime
from .runtime import core

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".safetensors", ".pt", ".bin")
HF_CONFIG = "config.json"  # a Hugging Face model folder (whisper, SVD's vae/, image_encoder/) holds this
# Folders of another library's model: their weights (and their subfolders') are no Sonic weight file.
LIBRARY_MODEL_MARKERS = (HF_CONFIG, "model_index.json", "preprocessor_config.json")
# Weights under models/sonic that other Sonic nodes pick (face detector, RIFE), by name.
OTHER_NODES_WEIGHTS = ("yoloface", "yolov5", "rife/", "flownet")
WHISPER_MODEL_TYPE = "whisper"  # config.json "model_type" of a Hugging Face whisper checkpoint
# What ComfyUI's log calls each model ("Requested to load SonicUNet").
LOG_NAMES = {"unet": "SonicUNet", "audio2token": "SonicAudio2Token", "audio2bucket": "SonicAudio2Bucket",
             "whisper": "WhisperEncoder"}

_cache: dict[tuple, object] = {}  # one entry: the last SONIC_MODEL loaded, keyed by files + settings


def _signature(paths: list[str]) -> tuple:
    """(path, mtime, size) of every file that makes up the models, to notice replaced weights."""
    sig = []
    for p in paths:
        files = [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        for f in files:
            if os.path.isfile(f):
                st = os.stat(f)
                sig.append((f, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def load_models(unet: str, audio2token: str, audio2bucket: str, whisper: str, dtype: str = "auto",
                weight_dtype: str = "default"):
    """SonicModels under model management, loaded once per (files, mtimes, dtype) and reused."""
    paths = [runtime.resolve_path(n) for n in (unet, audio2token, audio2bucket, whisper)]
    if not os.path.isdir(paths[3]):
        raise ValueError(f"whisper {whisper!r} is not a folder; choose the whisper-tiny folder "
                         "(config.json, model.safetensors, preprocessor_config.json)")
    for name, p in zip(("unet", "audio2token", "audio2bucket"), paths[:3]):
        if not os.path.isfile(p):
            raise ValueError(f"{name} {p!r} is not a file; choose a weight file "
                             f"({', '.join(WEIGHT_SUFFIXES)})")
    load_dev, offload_dev = runtime.load_device(), runtime.offload_device()
    torch_dtype = runtime.resolve_dtype(dtype, load_dev)
    storage = core("lowvram").WEIGHT_DTYPES.get(weight_dtype, "?")
    if storage == "?":
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {list(core('lowvram').WEIGHT_DTYPES)}")
    key = (_signature(paths), str(torch_dtype), str(storage), str(load_dev), str(offload_dev))
    if key in _cache:
        log.info("Sonic models: reusing the loaded models (%s)", torch_dtype)
        return _cache[key]
    _cache.clear()  # drop the previous models before loading new ones (one UNet in memory)

    models = core("weights").load_sonic_models(*paths, dtype=torch_dtype, device=load_dev,
                                               load_device=offload_dev, weight_dtype=storage)
    managed = {name: runtime.ManagedModel(getattr(models, name), load_dev, offload_dev, name=LOG_NAMES[name])
               for name in core("models").MODEL_NAMES}
    models.load_hook = lambda name: managed[name].load()  # the closure keeps the patchers alive
    _cache[key] = models
    return models


def weight_choices() -> list[str]:
    """Weight files for unet / audio2token / audio2bucket: every weight file under models/sonic
    except those inside a Hugging Face or diffusers model folder and those of the detector and RIFE."""
    skip = tuple(f"{d}/" for marker in LIBRARY_MODEL_MARKERS for d in runtime.list_subfolders(marker))
    return [f for f in runtime.list_files(WEIGHT_SUFFIXES)
            if not f.startswith(skip) and not any(k in f.lower() for k in OTHER_NODES_WEIGHTS)]


def is_whisper_folder(path: str) -> bool:
    """Does ``path`` hold a Hugging Face whisper checkpoint (config.json with model_type whisper)?"""
    try:
        with open(os.path.join(path, HF_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures") or []
    return config.get("model_type") == WHISPER_MODEL_TYPE or any(
        isinstance(a, str) and a.startswith("Whisper") for a in architectures)


def whisper_choices() -> list[str]:
    """Folders under models/sonic that hold a whisper checkpoint."""
    out = []
    for rel in runtime.list_subfolders(HF_CONFIG):
        try:
            path = runtime.resolve_path(rel)
        except (FileNotFoundError, ValueError):
            continue
        if is_whisper_folder(path):
            out.append(rel)
    return out


class SonicLoader:
    DESCRIPTION = ("Loads Sonic's own models from the 'sonic' model folder: the Sonic UNet (SVD-xt UNet "
                   "with audio attention), audio2token, audio2bucket and the whisper-tiny encoder. "
                   "Models are loaded once, kept on the offload device and moved to the GPU right "
                   "before use by ComfyUI's model management.")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("load sonic", "sonic model loader", "audio to video model", "加载模型")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("weight_dtype",)
    FUNCTION = "load"
    RETURN_TYPES = ("SONIC_MODEL",)
    RETURN_NAMES = ("sonic_model",)
    OUTPUT_TOOLTIPS = ("The Sonic models (UNet, audio heads, whisper) for the other Sonic nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = weight_choices()
        folders = whisper_choices()
        return runtime.advanced({
            "required": {
                "unet": (files, {"tooltip": "Sonic UNet weights (unet.pth or .safetensors) in models/sonic. "
                                            "A .json beside it with the same name sets a non-default "
                                            "architecture."}),
                "audio2token": (files, {"tooltip": "audio2token.pth: whisper features -> 32 audio tokens "
                                                   "per frame."}),
                "audio2bucket": (files, {"tooltip": "audio2bucket.pth: whisper features + image embedding "
                                                    "-> motion buckets."}),
                "whisper": (folders, {"tooltip": "whisper-tiny folder in Hugging Face layout (config.json, "
                                                 "model.safetensors, preprocessor_config.json) inside "
                                                 "models/sonic; folders whose config.json is not a "
                                                 "whisper model's are not listed."}),
                "dtype": (runtime.DTYPE_CHOICES, {
                    "default": "auto",
                    "tooltip": "UNet compute dtype; auto lets ComfyUI pick (fp16/bf16 on GPU). Whisper "
                               "and the audio heads always run in fp32 like the official code."}),
            },
            "optional": {
                "weight_dtype": (list(core("lowvram").WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "How the UNet's weights are stored. default: in dtype (3.0 GB in fp16). "
                               "fp8_e4m3fn: 8-bit floats with a scale per channel, 1.5 GB, upcast to dtype "
                               "layer by layer while computing (like ComfyUI's weight_dtype fp8): for GPUs "
                               "with little memory; results differ slightly (README 'Low VRAM')."}),
            },
        }, cls.ADVANCED_INPUTS)

    def load(self, unet, audio2token, audio2bucket, whisper, dtype="auto", weight_dtype="default"):
        return (load_models(unet, audio2token, audio2bucket, whisper, dtype, weight_dtype),)


NODE_CLASS_MAPPINGS = {"SonicLoader": SonicLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicLoader": "Sonic Model Loader"}
