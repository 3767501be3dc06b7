"""Digests of a model's whole content, which key resume states and kept results (resume.py).

Two models that differ anywhere must never share a key, or one gets the other's kept result
silently. A model loaded from a checkpoint (weights.load_unet) carries the digest of the whole file,
recorded at load (``record``); the file is hashed once (SHA-256, streamed in DIGEST_CHUNK_BYTES reads:
about 2 s of CPU for 3 GiB on a CPU with SHA instructions, 1.8x faster than BLAKE2b there,
bench/RESULTS.md) and the digest cached in a small JSON file keyed by the file's real path, size, mtime_ns, inode and
device, so the next load of an unchanged file reads no byte of it. A module not loaded from a file
(tests, a module handed over by another node pack) is hashed whole, every parameter and buffer, each
time its tensors change. ``model_digest`` adds every tensor's name, dtype and shape to either, so the
same file stored in another dtype or in fp8 keys differently.

The cache is untrusted input: an entry that is not ours (another shape, a digest that is not hex)
is ignored, and a cache that cannot be read or written only costs a re-hash, never a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .config import DIGEST_CACHE_ENTRIES, DIGEST_CACHE_ENV, DIGEST_CHUNK_BYTES

log = logging.getLogger(__name__)

DIGEST_ATTR = "sonic_content_digest"  # set on a module at load: the digest of what it was loaded from
_TENSORS_ATTR = "_sonic_tensor_digest"  # (tensor identity key, digest) of a module hashed in memory
ALGORITHM = "sha256"
CACHE_VERSION = 1
HEX = re.compile(r"[0-9a-f]{64}")  # a sha256 hex digest
STAT_FIELDS = ("size", "mtime_ns", "ino", "dev")


def default_cache_path() -> Path:
    """$SONIC_DIGEST_CACHE, else $XDG_CACHE_HOME/sonic/file-digests.json (~/.cache when unset)."""
    if os.environ.get(DIGEST_CACHE_ENV):
        return Path(os.environ[DIGEST_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sonic" / "file-digests.json"


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    good = {}
    for name, entry in data["files"].items():
        if (isinstance(entry, dict) and all(type(entry.get(k)) is int for k in (*STAT_FIELDS, "used"))
                and isinstance(entry.get("digest"), str) and HEX.fullmatch(entry["digest"])):
            good[name] = entry
    return good


def _write_cache(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Atomically, the DIGEST_CACHE_ENTRIES most recently used entries; failures only log."""
    keep = dict(sorted(files.items(), key=lambda kv: kv[1]["used"], reverse=True)[:DIGEST_CACHE_ENTRIES])
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "algorithm": ALGORITHM, "files": keep}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not write the digest cache %s (%s); the next load hashes again", path, e)
    finally:
        if os.path.lexists(tmp):
            try:
                tmp.unlink()
            except OSError:
                pass


def hash_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the whole file, streamed (memory: one DIGEST_CHUNK_BYTES buffer)."""
    h = hashlib.new(ALGORITHM)
    buf = bytearray(DIGEST_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def file_digest(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """The whole file's digest, from the cache when its path, size, mtime_ns, inode and device are
    those hashed before; else hashed now and remembered (unless the file changed meanwhile)."""
    real = os.path.realpath(path)
    cache_path = Path(cache) if cache is not None else default_cache_path()
    before = _stat_key(os.stat(real))
    files = _read_cache(cache_path)
    entry = files.get(real)
    if entry is not None and all(entry[k] == before[k] for k in STAT_FIELDS):
        entry["used"] = time.time_ns()
        _write_cache(cache_path, files)  # used now: the last to be forgotten
        return entry["digest"]
    t0 = time.perf_counter()
    digest = hash_file(real)
    seconds = time.perf_counter() - t0
    log.info("hashed %s (%.1f MiB) in %.1f s: the key of its kept results and resume states (once per file)",
             real, before["size"] / 2**20, seconds)
    if _stat_key(os.stat(real)) == before:  # not rewritten while it was read
        files = _read_cache(cache_path)  # another process may have added entries meanwhile
        files[real] = {**before, "digest": digest, "used": time.time_ns()}
        _write_cache(cache_path, files)
    return digest


def record(model: torch.nn.Module, source_digest: str, config: Any = None) -> torch.nn.Module:
    """Mark ``model`` as loaded from content ``source_digest`` (a checkpoint's ``file_digest``) built
    with architecture ``config`` (JSON-able; None for the shipped one)."""
    text = json.dumps({"file": source_digest, "config": config}, sort_keys=True, default=str)
    setattr(model, DIGEST_ATTR, hashlib.sha256(text.encode()).hexdigest())
    return model


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def tensor_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's name, dtype, shape and every byte (one tensor at a
    time moved to the CPU). Remembered on the module until a tensor is replaced or changed in place."""
    tensors = _tensors(model)
    key = tuple((name, id(t), t.data_ptr(), t._version, t.device.type) for name, t in tensors)
    cached = getattr(model, _TENSORS_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.new(ALGORITHM)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)  # [numel]
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))  # raw bytes, any dtype (fp8 too)
    digest = h.hexdigest()
    try:
        object.__setattr__(model, _TENSORS_ATTR, (key, digest))
    except (AttributeError, TypeError):
        pass
    return digest


def model_digest(model: torch.nn.Module) -> str:
    """The key of a model's whole content: the recorded source digest (``record``) or, for a module
    not loaded from a file, ``tensor_digest``; plus every tensor's name, dtype and shape as stored."""
    h = hashlib.sha256()
    source = getattr(model, DIGEST_ATTR, None)
    h.update((f"file:{source}" if isinstance(source, str) else f"tensors:{tensor_digest(model)}").encode())
    for name, t in _tensors(model):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()
