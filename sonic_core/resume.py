"""Resumable sampling: the sampler's state after every denoising step, on disk, atomically.

A ten-minute clip is 300 windows x 25 steps of UNet calls, an hour or more; a crash, an
out-of-memory kill or a cancel near the end must not cost the whole run. After each outer step
the sampler writes ``(latents, steps done, fingerprint)`` to one safetensors file, named by the
fingerprint of every input that changes the result; a later run with the same inputs finds it
and continues at the next step (the loop body depends only on the latents and the step index,
so the result is the uninterrupted one). A run with other inputs has another fingerprint and
never reads that state. A finished run deletes its state.

Files are ``sonic-resume-<fingerprint>.safetensors``, written under a temporary name and moved
into place with ``os.replace`` (a kill during the write leaves the previous state intact).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from .config import RESUME_FORMAT_VERSION, RESUME_MAX_AGE_S

log = logging.getLogger(__name__)

PREFIX = "sonic-resume-"
SUFFIX = ".safetensors"


def fingerprint(tensors: dict[str, torch.Tensor | None], settings: dict) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes (in key order) and the JSON settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": RESUME_FORMAT_VERSION, "settings": settings}, sort_keys=True,
                        default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()


WEIGHT_SAMPLES = 16  # values read from each weight tensor for the model's digest


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights as stored: every parameter's and buffer's name, dtype and shape,
    and ``WEIGHT_SAMPLES`` evenly strided values of each (one transfer from the device). Another
    checkpoint, another storage (fp8) or another dtype gives another digest; hashing all 3 GB of
    a UNet on every run would cost seconds, a sample costs milliseconds."""
    h = hashlib.sha256()
    picks = []
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // WEIGHT_SAMPLES)
            picks.append(flat[::step][:WEIGHT_SAMPLES].to(torch.float64))
    if picks:
        h.update(torch.cat(picks).cpu().numpy().tobytes())
    return h.hexdigest()


class ResumeStore:
    """Sampler states in ``folder`` (created on the first save, never at import)."""

    def __init__(self, folder: str | os.PathLike, resume: bool = True):
        self.folder = Path(folder)
        self.resume = resume  # False: save every step, but never continue from a saved state

    def path(self, fp: str) -> Path:
        return self.folder / f"{PREFIX}{fp[:32]}{SUFFIX}"

    def load(self, fp: str, like: torch.Tensor, total_steps: int) -> tuple[int, torch.Tensor] | None:
        """``(steps done, latents)`` saved for ``fp``, or None. A state that does not fit ``like``
        (shape, dtype) or claims a step outside ``1..total_steps-1`` is ignored with a warning."""
        from safetensors import safe_open

        p = self.path(fp)
        if not p.is_file():
            return None
        if not self.resume:
            log.warning("%s holds an interrupted run of these inputs; starting over (use --resume to "
                        "continue it)", p)
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                latents = f.get_tensor("latents")
        except Exception as e:  # a damaged state is never fatal: the run starts over
            log.warning("resume state %s is unreadable (%s); starting from step 1", p, e)
            return None
        step = int(meta.get("steps_done", -1))
        if meta.get("fingerprint") != fp or latents.shape != like.shape or latents.dtype != like.dtype \
                or not 0 < step < total_steps:
            log.warning("resume state %s does not match this run; starting from step 1", p)
            return None
        return step, latents.to(like.device)

    def save(self, fp: str, steps_done: int, latents: torch.Tensor) -> Path:
        """Write the state atomically; also drops other states older than RESUME_MAX_AGE_S."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(fp)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file({"latents": latents.detach().to("cpu").contiguous()}, str(tmp),
                      metadata={"fingerprint": fp, "steps_done": str(steps_done),
                                "version": str(RESUME_FORMAT_VERSION)})
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._prune(keep=final)
        return final

    def clear(self, fp: str) -> None:
        p = self.path(fp)
        if p.exists():
            p.unlink()
            log.info("sampling finished; removed resume state %s", p)

    def remove_folder_if_empty(self) -> None:
        try:
            self.folder.rmdir()  # only succeeds when empty
        except OSError:
            pass

    def _prune(self, keep: Path) -> None:
        now = time.time()
        for p in self.folder.glob(f"{PREFIX}*{SUFFIX}"):
            try:
                if p != keep and now - p.stat().st_mtime > RESUME_MAX_AGE_S:
                    p.unlink()
                    log.info("removed resume state %s (older than %d days)", p, RESUME_MAX_AGE_S // 86400)
            except OSError:
                pass  # another process removed it first
