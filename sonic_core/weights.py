"""Read, check and save checkpoints; build the Sonic models from them.

Formats: ``.safetensors`` and pickles (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.pkl``), the latter
only through ``torch.load(weights_only=True)``. A pickle must hold a flat ``{name: tensor}`` dict;
one wrapper level is accepted: a dict whose ``"state_dict"`` (Lightning-style) or ``"module"``
(DeepSpeed-style) entry is such a flat dict, other entries of the wrapper are ignored. Anything
else is refused with an error naming the file.

Architecture: a JSON file beside a checkpoint with the same stem (``unet.pth`` -> ``unet.json``)
describes a non-default architecture: a diffusers UNet config dict for the UNet, the constructor
keyword arguments for audio2token / audio2bucket. Without it the official architecture is built
(the UNet from the shipped SVD-xt config).

Every load is strict: missing, unexpected or mis-shaped keys are errors that list the first
``KEYS_LISTED`` keys of each kind and their counts. Large models are built on the meta device and
receive the checkpoint tensors directly (``load_state_dict(assign=True)``), so the weights are held
in memory once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import shutil
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import (
    KEYS_LISTED,
    SAFETENSORS_HEADER_LENGTH_BYTES,
    SAFETENSORS_MAX_HEADER_BYTES,
    SAFETENSORS_MAX_TENSORS,
)
from .paths import FOLDER, check_input, optional_file

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
WRAPPER_KEYS = ("state_dict", "module")  # accepted single-level wrappers around a state dict
ARCHITECTURE_SUFFIX = ".json"
WHISPER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face layout, first wins
WHISPER_CONFIG_FILE = "config.json"
WHISPER_PREPROCESSOR_FILE = "preprocessor_config.json"
WHISPER_ENCODER_PREFIXES = ("encoder.", "model.encoder.")  # WhisperModel / ...ForConditionalGeneration


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, unsafe, or not matching the model."""


# ----------------------------------------------------------------------------------------------
# Reading and checking state dicts
# ----------------------------------------------------------------------------------------------
def _require_file(path: Path, what: str) -> Path:
    return check_input(path, what, fix="check the path (see README 'Weights')")  # says what it really is


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from what torch.load returned, or a CheckpointError."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                others = [k for k in obj if k != key]
                logger.info("%s: using the state dict under %r (ignoring %d other entries)", path.name, key,
                            len(others))
                return dict(obj[key])
        bad = [(k, type(v).__name__) for k, v in obj.items()
               if not (isinstance(k, str) and isinstance(v, torch.Tensor))][:KEYS_LISTED]
        detail = ("it is empty" if not obj else
                  "non-tensor entries: " + ", ".join(f"{k!r} ({t})" for k, t in bad))
        raise CheckpointError(
            f"{path}: expected a flat state dict {{name: tensor}} (or one under {WRAPPER_KEYS}), "
            f"but {detail}; "
            "re-save just the model's state_dict() or convert the file to .safetensors")
    raise CheckpointError(
        f"{path}: expected a state dict {{name: tensor}}, found a {type(obj).__name__}; re-save the "
        "model's state_dict() (not the whole model object) or convert the file to .safetensors")


def _unpickler_reason(e: Exception) -> str:
    """The useful line of torch's weights_only error (e.g. ``Unsupported global: GLOBAL x.Y``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln),
                  lines[0] if lines else type(e).__name__)
    reason = reason.removeprefix("WeightsUnpickler error:").strip()
    return reason.split(" was not an allowed global")[0]


def check_safetensors_header(path: Path) -> int:
    """Refuse a .safetensors file whose header is too large, before parsing it; returns the tensor count.

    The file starts with the header length (8 bytes, little-endian); that length is bounded by
    ``SAFETENSORS_MAX_HEADER_BYTES`` and the file size, then the JSON header is read and its
    tensor count bounded by ``SAFETENSORS_MAX_TENSORS``, so a hostile header costs a fraction of
    a second instead of a full parse.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_HEADER_LENGTH_BYTES)
        if len(head) < SAFETENSORS_HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file; it is "
                                  "truncated or not a safetensors file, download or convert it again")
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: refused, its safetensors header is {n} bytes ({n / 2**20:.1f} MiB), more than "
                f"the {SAFETENSORS_MAX_HEADER_BYTES // 2**20} MiB any model of this pack needs; it is "
                "damaged or not a model checkpoint, download or convert it again")
        if n > size - SAFETENSORS_HEADER_LENGTH_BYTES:
            raise CheckpointError(
                f"{path}: its safetensors header claims {n} bytes but the file has {size}; it is "
                "truncated or corrupt, download or convert it again")
        raw = f.read(n)
    # one JSON object {name: {dtype, shape, data_offsets}, "__metadata__": {...}}; at most
    # SAFETENSORS_MAX_HEADER_BYTES to parse, so this stays well under a second
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                              "corrupt, download or convert it again") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a {type(header).__name__}, not an object; "
                              "the file is corrupt")
    count = len(header) - ("__metadata__" in header)
    if count > SAFETENSORS_MAX_TENSORS:
        raise CheckpointError(
            f"{path}: refused, it holds {count} tensors, more than the {SAFETENSORS_MAX_TENSORS} any model "
            "of this pack has; it is not a Sonic, whisper, SVD or RIFE checkpoint")
    return count


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, in their stored dtype."""
    path = _require_file(Path(path), "checkpoint")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is probably "
                "truncated or corrupt, download or convert it again") from e
        if not sd:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors")
        return sd
    if suffix in PICKLE_SUFFIXES:
        mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped, legacy pickles cannot
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused, the pickle holds objects other than tensors and plain containers "
                f"({_unpickler_reason(e)}); it is loaded only with torch.load(weights_only=True). If you "
                "trust the file, re-save just its state_dict() or convert it to .safetensors with a "
                "tool of your choice") from e
        except Exception as e:  # zip/stream errors, EOF: damaged file
            raise CheckpointError(
                f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); it is "
                "probably truncated or corrupt, download it again") from e
        return _unwrap(obj, path)
    raise CheckpointError(
        f"{path}: unsupported checkpoint extension {suffix!r}; use one of "
        f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")


def _expected_shapes(model_or_expected: nn.Module | Mapping) -> dict[str, tuple[int, ...]]:
    if isinstance(model_or_expected, nn.Module):
        return {k: tuple(v.shape) for k, v in model_or_expected.state_dict().items()}
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
            for k, v in model_or_expected.items()}


def _dtype_kind(dtype: torch.dtype) -> str:
    """"float", "bool", "complex" or "int": what a checkpoint tensor must share with the model's."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _expected_dtypes(model_or_expected: nn.Module | Mapping) -> dict[str, torch.dtype]:
    """``{key: dtype}`` where the expectation knows one (a module, or a mapping of tensors)."""
    if isinstance(model_or_expected, nn.Module):
        return {k: v.dtype for k, v in model_or_expected.state_dict().items()}
    return {k: v.dtype for k, v in model_or_expected.items() if isinstance(v, torch.Tensor)}


def _listing(keys: list[str], kind: str) -> str:
    shown = ", ".join(keys[:KEYS_LISTED])
    more = f", ... ({len(keys) - KEYS_LISTED} more)" if len(keys) > KEYS_LISTED else ""
    return f"{len(keys)} {kind} (first {min(len(keys), KEYS_LISTED)}: {shown}{more})"


def check_keys(model_or_expected: nn.Module | Mapping, state_dict: Mapping[str, torch.Tensor],
               what: str) -> None:
    """Strict key, shape and dtype check of ``state_dict`` against a model or ``{key: shape}``.

    Raises CheckpointError listing the first ``KEYS_LISTED`` missing, unexpected, mis-shaped and
    wrong-dtype keys with their counts; ``what`` names the checkpoint in the message. A dtype is
    wrong when its kind differs from the model's (float vs int vs bool): floating tensors of any
    precision load into floating parameters (they are cast), an int32 or bool tensor does not.
    """
    expected = _expected_shapes(model_or_expected)
    dtypes = _expected_dtypes(model_or_expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {list(state_dict[k].shape)} vs model {list(expected[k])}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    wrong_dtype = [f"{k} {str(state_dict[k].dtype).removeprefix('torch.')} vs model "
                   f"{str(dtypes[k]).removeprefix('torch.')}"
                   for k in dtypes if k in state_dict and isinstance(state_dict[k], torch.Tensor)
                   and _dtype_kind(state_dict[k].dtype) != _dtype_kind(dtypes[k])]
    if not (missing or unexpected or mismatched or wrong_dtype):
        return
    parts = []
    if missing:
        parts.append(_listing(missing, "missing keys"))
    if unexpected:
        parts.append(_listing(unexpected, "unexpected keys"))
    if mismatched:
        parts.append(_listing(mismatched, "shape mismatches (checkpoint vs model)"))
    if wrong_dtype:
        parts.append(_listing(wrong_dtype, "dtype mismatches (checkpoint vs model)"))
    raise CheckpointError(
        f"{what}: the state dict does not match the model ({len(expected)} keys expected, "
        f"{len(state_dict)} in the file): " + "; ".join(parts) +
        ". Check that this is the right checkpoint for this model, and that the architecture JSON "
        "beside it (same name, .json) matches it, or remove that JSON for the official architecture")


def _temp_beside(path: Path) -> Path:
    """A new empty temp file next to ``path`` (same filesystem for os.replace; umask permissions)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``path``; without ``overwrite`` an existing ``path`` is never replaced."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, fails if path exists
    except FileExistsError:
        raise FileExistsError(f"{path} exists (it appeared while writing); it was left as it is") from None
    except OSError:  # no hard links on this filesystem
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; it was left as it is") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``state_dict`` to ``path`` atomically (temp file in the same folder, then renamed).

    Without ``overwrite`` an existing ``path`` is never replaced (FileExistsError, temp removed).
    """
    from safetensors.torch import save_file

    path = Path(path)
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        ident = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and ident in seen:  # safetensors refuses shared storage: store a copy
            v = v.clone()
        seen.add(ident)
        tensors[k] = v
    tmp = _temp_beside(path)
    try:
        mode = tmp.stat().st_mode & 0o777  # umask permissions of a new file
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, mode)  # the safetensors writer leaves 0600
        _publish(tmp, path, overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Architecture JSON and model construction
# ----------------------------------------------------------------------------------------------
def architecture_path(checkpoint: str | os.PathLike) -> Path:
    """The architecture JSON that belongs to a checkpoint: same folder and stem, ``.json``."""
    return Path(checkpoint).with_suffix(ARCHITECTURE_SUFFIX)


def read_architecture(checkpoint: str | os.PathLike) -> dict | None:
    """The architecture dict beside ``checkpoint``, or None when there is none."""
    arch = architecture_path(checkpoint)
    if not optional_file(arch, "architecture JSON", fix="fix or remove it"):  # a FIFO there is said
        return None
    try:
        data = json.loads(arch.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{arch}: architecture JSON cannot be read ({e}); fix or remove it") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{arch}: architecture JSON must be an object, found {type(data).__name__}")
    bad = negative_dimensions(data)
    if bad:
        raise CheckpointError(
            f"{arch}: architecture JSON has negative dimension(s): {', '.join(bad[:KEYS_LISTED])}; sizes "
            "must be positive, fix the value or remove the JSON for the official architecture")
    logger.info("%s: non-default architecture from %s", Path(checkpoint).name, arch.name)
    return data


def negative_dimensions(value: Any, where: str = "") -> list[str]:
    """``key = value`` for every negative integer in a JSON value (nested keys as ``a.b[1]``)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [f"{where} = {value}"] if value < 0 else []
    if isinstance(value, dict):
        return [b for k, v in value.items()
                for b in negative_dimensions(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [b for i, v in enumerate(value) for b in negative_dimensions(v, f"{where}[{i}]")]
    return []


def _build_on_meta(factory, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)


def _assign_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str, dtype: torch.dtype,
                    device: torch.device | str | None) -> nn.Module:
    """Strictly check ``sd``, cast floating tensors to ``dtype`` on ``device`` and assign them."""
    check_keys(model, sd, what)
    device = torch.device(device) if device is not None else torch.device("cpu")
    for k in list(sd):  # in place, so the stored-dtype copy of each tensor can be freed as we go
        v = sd[k]
        sd[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors not provided by the checkpoint remain uninitialised: "
                           f"{left[:KEYS_LISTED]}")
    return model.eval().requires_grad_(False)


def _load_module(path: str | os.PathLike, factory, what: str, dtype: torch.dtype,
                 device: torch.device | str | None, arch_kwargs: dict | None = None) -> nn.Module:
    t0 = time.perf_counter()
    path = Path(path)
    kwargs = read_architecture(path) if arch_kwargs is None else arch_kwargs
    try:
        model = _build_on_meta(factory, **(kwargs or {}))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{architecture_path(path)}: invalid {what} architecture {kwargs}: {e}; fix "
                              "it or remove it for the official architecture") from e
    sd = read_state_dict(path)
    _assign_weights(model, sd, f"{what} checkpoint {path}", dtype, device)
    logger.info("loaded %s from %s: %d tensors, %s, %.1f s", what, path.name, len(sd), dtype,
                time.perf_counter() - t0)
    return model


def load_audio2token(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None):
    """audio2token (``AudioProjModel``) from a checkpoint; float32 by default like the official run."""
    from . import identify
    from .models.audio_proj import AudioProjModel

    with identify.expecting(path, identify.AUDIO2TOKEN):  # another model's file: says which
        return _load_module(path, AudioProjModel, "audio2token", dtype, device)


def load_audio2bucket(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None):
    """audio2bucket (``Audio2BucketModel``) from a checkpoint; float32 by default."""
    from . import identify
    from .models.audio_proj import Audio2BucketModel

    with identify.expecting(path, identify.AUDIO2BUCKET):
        return _load_module(path, Audio2BucketModel, "audio2bucket", dtype, device)


def load_unet(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str | None = None,
              weight_dtype: torch.dtype | None = None):
    """The Sonic UNet (SVD-xt UNet + audio attention) from ``unet.pth`` / ``.safetensors``.

    The architecture is the shipped SVD-xt config unless a JSON (diffusers UNet config) sits
    beside the checkpoint. fp16 and fp32 files both load; weights are cast to ``dtype``.
    ``weight_dtype`` ``torch.float8_e4m3fn`` stores the Linear / Conv weights in fp8 (computed in
    ``dtype``, sonic_core.lowvram); None keeps them in ``dtype``.
    """
    from . import identify

    with identify.expecting(path, identify.UNET):  # another model's file: says which
        return _load_unet(Path(path), dtype, device, weight_dtype)


def _load_unet(path: Path, dtype: torch.dtype, device: torch.device | str | None,
               weight_dtype: torch.dtype | None):
    from .models import unet as unet_module

    t0 = time.perf_counter()
    path = Path(path)
    _require_file(path, "UNet checkpoint")
    config = read_architecture(path) or unet_module.load_config(None)
    try:
        model = _build_on_meta(unet_module.build_sonic_unet, config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{architecture_path(path)}: invalid UNet architecture ({e}); it must be a "
                              "diffusers UNetSpatioTemporalConditionModel config, or remove it") from e
    sd = read_state_dict(path)
    _assign_weights(model, sd, f"UNet checkpoint {path}", dtype, device)
    from .digest import file_digest, record

    record(model, file_digest(path), config)  # the key of its kept results and resume states (resume.py)
    if weight_dtype is not None:
        from .lowvram import store_weights_fp8

        store_weights_fp8(model, dtype, weight_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded UNet from %s: %d tensors, %.3f B parameters, %s, %.1f s", path.name, len(sd),
                n_params / 1e9, dtype, time.perf_counter() - t0)
    return model


# ----------------------------------------------------------------------------------------------
# Whisper (Hugging Face folder layout)
# ----------------------------------------------------------------------------------------------
def _whisper_encoder_state(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` tensors with the prefix removed (decoder and heads are ignored)."""
    for prefix in WHISPER_ENCODER_PREFIXES:
        enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if enc:
            logger.debug("%s: %d encoder tensors under %r, %d other tensors ignored", path.name, len(enc),
                         prefix, len(sd) - len(enc))
            return enc
    raise CheckpointError(
        f"{path}: no whisper encoder weights (no keys starting with {WHISPER_ENCODER_PREFIXES}); "
        f"first keys: {list(sd)[:KEYS_LISTED]}. Use the openai/whisper-tiny folder in Hugging Face layout")


def load_whisper(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
    """``(WhisperEncoder, WhisperFeatureExtractor)`` from a Hugging Face whisper folder.

    The folder holds ``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` and usually
    ``preprocessor_config.json`` (without it the extractor is built from the config's mel count).
    Only the encoder is built; its keys are checked strictly, decoder keys are ignored.
    """
    from . import identify

    with identify.expecting(folder, identify.WHISPER):  # another model's folder: says which
        return _load_whisper(Path(folder), dtype, device)


def _load_whisper(folder: Path, dtype: torch.dtype, device: torch.device | str | None):
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    t0 = time.perf_counter()
    check_input(folder, "whisper folder", FOLDER, fix="download openai/whisper-tiny (config.json, "
                "model.safetensors, preprocessor_config.json) into a folder and point there")
    config_file = folder / WHISPER_CONFIG_FILE
    if not optional_file(config_file, "whisper config", fix="download whisper-tiny's config.json again"):
        raise FileNotFoundError(
            f"whisper folder {str(folder)!r} has no {WHISPER_CONFIG_FILE}; it must be a Hugging Face "
            "whisper model folder (openai/whisper-tiny)")
    weights = next((folder / n for n in WHISPER_WEIGHT_FILES
                    if optional_file(folder / n, "whisper weights", fix="download it again")), None)
    if weights is None:
        raise FileNotFoundError(
            f"whisper folder {str(folder)!r} has no weights: expected one of {WHISPER_WEIGHT_FILES}")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot be read ({e}); download openai/whisper-tiny's "
                              "config.json again") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: must be a JSON object, found {type(raw).__name__}; download "
                              "openai/whisper-tiny's config.json again")
    if raw.get("model_type") != "whisper":
        raise CheckpointError(
            f"{config_file}: model_type is {raw.get('model_type')!r}, expected 'whisper'; point to the "
            "whisper-tiny folder")
    bad = negative_dimensions(raw)
    if bad:
        raise CheckpointError(f"{config_file}: negative dimension(s) {', '.join(bad[:KEYS_LISTED])}; use the "
                              "config.json of openai/whisper-tiny")
    try:
        config = WhisperConfig.from_dict(raw)
        encoder = _build_on_meta(WhisperEncoder, config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{config_file}: not a usable whisper config ({type(e).__name__}: {e}); use "
                              "the config.json of openai/whisper-tiny") from e
    sd = _whisper_encoder_state(read_state_dict(weights), weights)
    _assign_weights(encoder, sd, f"whisper encoder in {weights}", dtype, device)

    if (folder / WHISPER_PREPROCESSOR_FILE).is_file():
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    else:
        logger.info("%s: no %s, using the default feature extractor with %d mel bins", folder,
                    WHISPER_PREPROCESSOR_FILE, config.num_mel_bins)
        feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    if feature_extractor.feature_size != config.num_mel_bins:
        raise CheckpointError(
            f"{folder}: the feature extractor makes {feature_extractor.feature_size} mel bins but the "
            f"encoder expects {config.num_mel_bins}; fix {WHISPER_PREPROCESSOR_FILE}")
    logger.info("loaded whisper encoder from %s: %d tensors, %s, %.1f s", folder, len(sd), dtype,
                time.perf_counter() - t0)
    return encoder, feature_extractor


# ----------------------------------------------------------------------------------------------
# Everything at once; conversion
# ----------------------------------------------------------------------------------------------
def load_sonic_models(unet: str | os.PathLike, audio2token: str | os.PathLike,
                      audio2bucket: str | os.PathLike, whisper_dir: str | os.PathLike,
                      dtype: torch.dtype, device: torch.device | str,
                      load_device: torch.device | str | None = None,
                      weight_dtype: torch.dtype | None = None):
    """All Sonic-specific models in a ``SonicModels`` container.

    ``dtype`` is the UNet's dtype; whisper, audio2token and audio2bucket stay float32 as in the
    official pipeline. ``weight_dtype``: the UNet's weight storage (None: ``dtype``; fp8, see
    ``load_unet``). Weights are placed on ``load_device`` (default: the CPU, i.e. offloaded);
    ``device`` is the compute device that ``SonicModels.load`` moves a model to.
    """
    from .models import SonicModels

    load_device = torch.device(load_device) if load_device is not None else torch.device("cpu")
    encoder, feature_extractor = load_whisper(whisper_dir, torch.float32, load_device)
    return SonicModels(
        unet=load_unet(unet, dtype, load_device, weight_dtype),
        audio2token=load_audio2token(audio2token, torch.float32, load_device),
        audio2bucket=load_audio2bucket(audio2bucket, torch.float32, load_device),
        whisper=encoder,
        feature_extractor=feature_extractor,
        dtype=dtype,
        device=torch.device(device),
    )


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike, fp16: bool = False,
                    overwrite: bool = False) -> dict[str, Any]:
    """Any supported checkpoint -> ``dst`` (.safetensors), atomically; the architecture JSON follows.

    With ``fp16`` floating tensors are stored as float16. An existing ``dst`` (or its architecture
    JSON) is an error unless ``overwrite``. Returns ``{"keys", "bytes", "architecture"}``.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"output {str(dst)!r} must end in .safetensors")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output {str(dst)!r} is the input file; choose another output name")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(dst.parent)!r} does not exist; create it first")
    arch_src, arch_dst = architecture_path(src), architecture_path(dst)
    copy_arch = arch_src.is_file() and arch_src.resolve() != arch_dst.resolve()
    if not overwrite:
        taken = [p for p in ([dst] + ([arch_dst] if copy_arch else [])) if os.path.lexists(p)]
        if taken:
            raise FileExistsError(
                f"output {' and '.join(repr(str(p)) for p in taken)} already exist(s); nothing was written. "
                "Choose another output name, or pass --overwrite to replace "
                f"{'them' if len(taken) > 1 else 'it'}")
    sd = read_state_dict(src)
    if fp16:
        for k in list(sd):
            if sd[k].is_floating_point():
                sd[k] = sd[k].to(torch.float16)
    save_safetensors(sd, dst, overwrite=overwrite)
    copied = None
    if copy_arch:
        tmp = _temp_beside(arch_dst)
        try:
            shutil.copyfile(arch_src, tmp)
            _publish(tmp, arch_dst, overwrite)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        copied = arch_dst
    size = dst.stat().st_size
    logger.info("converted %s -> %s: %d tensors, %.1f MiB%s", src, dst, len(sd), size / 2**20,
                f", architecture {copied.name}" if copied else "")
    return {"keys": len(sd), "bytes": size, "architecture": copied}
