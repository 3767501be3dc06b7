"""Resumable sampling: the sampler's state after every denoising step, on disk, atomically.

A ten-minute clip is 300 windows x 25 steps of UNet calls, an hour or more; a crash, an
out-of-memory kill or a cancel near the end must not cost the whole run. After each outer step
the sampler writes ``(latents, steps done, fingerprint)`` to one safetensors file, named by the
fingerprint of every input that changes the result; a later run with the same inputs finds it
and continues at the next step (the loop body depends only on the latents and the step index,
so the result is the uninterrupted one). A run with other inputs has another fingerprint and
never reads that state. A finished run deletes its state, unless the store holds final states
(``hold_final``: the CLI, whose run goes on to decode and encode): then the final latents stay as a
state of all the steps until ``release`` (the video is written), so a crash, a Ctrl-C or a full disk
while decoding or encoding loses no sampling, and ``--resume`` goes straight to decoding.

A finished run can also keep its final latents (``keep_bytes`` > 0: the node, and the CLI with
``--state-dir``) as ``sonic-result-<fingerprint>.safetensors``: a later run with equal inputs
returns them without sampling. That is what lets Latent Segment's later segments skip the sampler
when ComfyUI's cache (``--cache-ram``, ``--cache-none``) forgot its output. Kept results are capped
at ``keep_bytes`` in all; the oldest (least recently used) go first.

Files are written under a temporary name and moved into place with ``os.replace`` (a kill during
the write leaves the previous state intact). Everything read back is untrusted: a file that is not
a regular file, holds other tensors, has metadata other than ours, a shape or dtype other than the
run's, or latents that are not finite or beyond ``RESUME_LATENT_ABS_MAX`` is discarded with a
warning that names it, and removed, so the next run starts clean. Nothing here ever ends a run:
a folder that cannot hold states, or a save that fails (full disk, read-only, no permission),
turns resume off for the rest of the run with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path

import torch

from .config import (RESULT_KEEP_ENV, RESULT_KEEP_MB, RESUME_FORMAT_VERSION, RESUME_LATENT_ABS_MAX,
                     RESUME_MAX_AGE_S)
from .paths import FOLDER, path_problem

log = logging.getLogger(__name__)

PREFIX = "sonic-resume-"  # a state: latents after ``steps_done`` of the run's steps
RESULT_PREFIX = "sonic-result-"  # a finished sampling's final latents
SUFFIX = ".safetensors"
TENSOR_NAME = "latents"  # the only tensor a state holds
META_KEYS = frozenset({"fingerprint", "steps_done", "version"})  # the only metadata a state holds
STEPS_PATTERN = re.compile(r"[0-9]{1,9}")  # steps_done as written: decimal digits only (no sign, no "2.0")
MIB = 2**20


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


def weights_digest(model: torch.nn.Module) -> str:
    """The key of a model's whole content (digest.model_digest): the digest of the whole checkpoint
    file recorded at load, or for a module not loaded from a file every byte of its tensors; with
    every tensor's name, dtype and shape. Two models that differ anywhere get different keys."""
    from .digest import model_digest

    return model_digest(model)


def keep_limit_bytes() -> int:
    """The cap on kept results: ``$SONIC_KEEP_MB`` MiB when set to a number >= 0, else RESULT_KEEP_MB."""
    raw = os.environ.get(RESULT_KEEP_ENV, "").strip()
    if not raw:
        return RESULT_KEEP_MB * MIB
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not (math.isfinite(mb) and mb >= 0):
        log.warning("%s=%r is not a number of MiB >= 0; keeping up to %d MiB of finished samplings",
                    RESULT_KEEP_ENV, raw, RESULT_KEEP_MB)
        return RESULT_KEEP_MB * MIB
    return int(mb * MIB)


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot hold states, or None: it (or the nearest existing folder above it) is
    checked, missing folders are created, a probe file is written and removed, and the folders made
    here are removed again, so the disk is left as it was."""
    folder = Path(folder)
    made: list[Path] = []
    try:
        if os.path.lexists(folder) and not folder.is_dir():
            return f"{folder} {path_problem(folder, FOLDER)[1]}"
        missing, top = [], folder
        while not os.path.lexists(top) and top != top.parent:
            missing.append(top)
            top = top.parent
        if not top.is_dir():
            return f"{top} {path_problem(top, FOLDER)[1]}"
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        probe = folder / f".sonic-probe-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0")
        finally:
            if os.path.lexists(probe):
                probe.unlink()
    except OSError as e:
        return f"{folder} is not writable ({_reason(e)})"
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
    return None


def _reason(e: BaseException) -> str:
    """An OS error's own words (``read-only file system``), also from inside a SafetensorError."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e)
    # safetensors: "I/O error: No space left on device (os error 28)" (0.8), "IoError(Os { code: 28, ...})"
    m = re.search(r"os error (\d+)|Os \{ code: (\d+)", text)
    if m:
        return os.strerror(int(m.group(1) or m.group(2))).lower()
    return text[:200] or type(e).__name__


class ResumeStore:
    """Sampler states (and with ``keep_bytes`` > 0 finished results) in ``folder``, created on the
    first save, never at import.

    ``resume``: False saves every step but never continues from a saved state. ``keep_bytes``: the
    cap on kept results (0: none kept, none read; the node passes ``keep_limit_bytes()``).
    ``hold_final``: a finished sampling leaves its final latents as a state of all its steps (unless
    kept as a result) until ``release``: the caller's work after sampling can fail without losing it.
    """

    def __init__(self, folder: str | os.PathLike, resume: bool = True, keep_bytes: int = 0,
                 hold_final: bool = False):
        self.folder = Path(folder)
        self.resume = resume
        self.keep_bytes = max(int(keep_bytes), 0)
        self.hold_final = hold_final
        self.off: str | None = None  # why states are off for the rest of this run (warned once)
        self.kept: Path | None = None  # the kept result this run returned or wrote
        self.held: Path | None = None  # the final state this run wrote or resumed from (hold_final)

    def path(self, fp: str) -> Path:
        return self.folder / f"{PREFIX}{fp[:32]}{SUFFIX}"

    def result_path(self, fp: str) -> Path:
        return self.folder / f"{RESULT_PREFIX}{fp[:32]}{SUFFIX}"

    # ------------------------------------------------------------------------------------------
    def check(self) -> str | None:
        """Why the folder cannot hold states (see ``folder_problem``), or None. Call it before any
        model loads; then ``disable`` with the caller's advice, or refuse the run."""
        return folder_problem(self.folder)

    def disable(self, why: str) -> None:
        """Resume off for the rest of this run: one warning, then every call is a no-op."""
        if self.off is None:
            self.off = why
            log.warning("%s; this run goes on without resume states", why)

    # ------------------------------------------------------------------------------------------
    def load(self, fp: str, like: torch.Tensor, total_steps: int) -> tuple[int, torch.Tensor] | None:
        """``(steps done, latents)`` saved for ``fp``, or None. With ``hold_final``, ``total_steps``
        done is a finished sampling whose caller's work did not end; it is held again (``release``).
        A state that does not fit ``like`` (shape, dtype), claims a step outside
        ``1..total_steps-1`` (``1..total_steps`` with ``hold_final``), or holds latents that are not
        finite or beyond RESUME_LATENT_ABS_MAX is discarded (warned, removed)."""
        p = self.path(fp)
        if self.off is not None or not os.path.lexists(p):
            return None
        if not self.resume and p.is_file() and not p.is_symlink():
            log.warning("%s holds an interrupted run of these inputs (its last saved step, or its finished "
                        "sampling if the video was not written); starting over (use --resume to continue it)",
                        p)
            return None
        last = total_steps if self.hold_final else total_steps - 1  # all steps: only a held final state
        got = self._read(p, fp, like, lambda step: 0 < step <= last, f"a step between 1 and {last}",
                         "resume state", "starting from step 1")
        if got is not None and got[0] == total_steps:
            self.held = p  # removed by release() once the caller's work is done
        return got

    def find_result(self, fp: str, like: torch.Tensor, total_steps: int) -> torch.Tensor | None:
        """The kept final latents of an earlier run with these inputs (validated like a state), or None."""
        p = self.result_path(fp)
        if self.off is not None or not self.keep_bytes or not os.path.lexists(p):
            return None
        got = self._read(p, fp, like, lambda step: step == total_steps, f"{total_steps} steps",
                         "kept result", "sampling again")
        if got is None:
            return None
        try:
            os.utime(p)  # used now: the last to be evicted
        except OSError:
            pass
        self.kept = p
        return got[1]

    def _read(self, p: Path, fp: str, like: torch.Tensor, step_ok, step_want: str, what: str,
              then: str) -> tuple[int, torch.Tensor] | None:
        from safetensors import safe_open

        if p.is_dir() and not p.is_symlink():  # not ours to delete, unless empty
            try:
                p.rmdir()
                log.warning("%s %s was an empty folder: removed it; %s", what, p, then)
            except OSError:
                self.disable(f"{p} is a folder where this run's {what} belongs: remove or rename it")
            return None
        if p.is_symlink() or not p.is_file():
            return self._discard(p, what, "is not a regular file", then)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                if names != [TENSOR_NAME]:
                    return self._discard(p, what, f"holds the tensors {names[:5]}, not just {TENSOR_NAME!r}",
                                         then)
                info = f.get_slice(TENSOR_NAME)
                shape, dtype = tuple(info.get_shape()), info.get_dtype()
                if shape != tuple(like.shape):
                    return self._discard(p, what, f"holds latents {shape}, this run's are "
                                                  f"{tuple(like.shape)}", then)
                latents = f.get_tensor(TENSOR_NAME)
        except Exception as e:  # a damaged file is never fatal: the run starts over
            return self._discard(p, what, f"is unreadable ({_reason(e)})", then)
        if latents.dtype != like.dtype:
            return self._discard(p, what, f"holds {dtype} latents, this run samples in {like.dtype}", then)
        ours = set(meta) == META_KEYS and meta["fingerprint"] == fp
        if not ours or meta["version"] != str(RESUME_FORMAT_VERSION):
            return self._discard(p, what, "has metadata other than this run's (fingerprint, version)", then)
        raw = meta["steps_done"]
        step = int(raw) if STEPS_PATTERN.fullmatch(raw) else None
        if step is None or not step_ok(step):
            return self._discard(p, what, f"claims steps_done={raw[:40]!r}, not {step_want}", then)
        if latents.numel():
            lo, hi = (float(v) for v in torch.aminmax(latents))  # NaN in, NaN out; inf stays inf
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return self._discard(p, what, "holds latents that are not finite (NaN or inf)", then)
            if max(-lo, hi) > RESUME_LATENT_ABS_MAX:
                return self._discard(p, what, f"holds latents up to {max(-lo, hi):.3g}, beyond the "
                                              f"{RESUME_LATENT_ABS_MAX:g} this sampler can reach", then)
        return step, latents.to(like.device)

    def _discard(self, p: Path, what: str, why: str, then: str) -> None:
        try:
            p.unlink()
            gone = "removed it"
        except OSError as e:
            gone = f"could not remove it ({_reason(e)}); the next save replaces it"
        log.warning("%s %s %s: discarded (%s); %s", what, p, why, gone, then)
        return None

    # ------------------------------------------------------------------------------------------
    def save(self, fp: str, steps_done: int, latents: torch.Tensor) -> Path | None:
        """Write the state atomically; also drops other states older than RESUME_MAX_AGE_S. A failing
        write turns states off for the rest of the run (one warning) and returns None."""
        final = self._write(self.path(fp), fp, steps_done, latents, "resume state")
        if final is not None:
            self._prune(keep=final)
        return final

    def finish(self, fp: str, latents: torch.Tensor, total_steps: int) -> None:
        """The run is done: keep its result (when ``keep_bytes`` allows) and remove its state; with
        ``hold_final`` and no kept result, the state becomes the final latents until ``release``."""
        if self.off is None and self.keep_bytes:
            size = latents.numel() * latents.element_size()
            if size > self.keep_bytes:
                log.info("not keeping the sampler's result: %.1f MiB is over the %.1f MiB cap (%s)",
                         size / MIB, self.keep_bytes / MIB, RESULT_KEEP_ENV)
            else:
                self._evict(self.keep_bytes - size)
                self.kept = self._write(self.result_path(fp), fp, total_steps, latents, "sampler's result")
                if self.kept is not None:
                    log.info("kept the sampler's result in %s (%.1f MiB): an identical run returns it "
                             "without sampling", self.kept, size / MIB)
        if self.hold_final and self.kept is None and self.off is None:
            self.held = self._write(self.path(fp), fp, total_steps, latents, "sampler's final state")
            if self.held is not None:
                log.info("sampling finished; its final latents stay in %s until the video is written", self.held)
                return
        self.clear(fp)

    def release(self) -> None:
        """The caller's work after sampling is done (the video is written): remove the final state
        held since ``finish`` or ``load``."""
        p, self.held = self.held, None
        if p is None or not p.is_file() or p.is_symlink():
            return
        try:
            p.unlink()
            log.info("video written; removed the sampler's final state %s", p)
        except OSError as e:
            log.warning("could not remove the sampler's final state %s (%s)", p, _reason(e))

    def _write(self, final: Path, fp: str, steps_done: int, latents: torch.Tensor, what: str) -> Path | None:
        from safetensors.torch import save_file

        if self.off is not None:
            return None
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({TENSOR_NAME: latents.detach().to("cpu").contiguous()}, str(tmp),
                      metadata={"fingerprint": fp, "steps_done": str(steps_done),
                                "version": str(RESUME_FORMAT_VERSION)})
            os.replace(tmp, final)
        except Exception as e:  # full disk, read-only, no permission, a folder in the way: never fatal
            self.disable(f"could not save the {what} in {self.folder} ({_reason(e)})")
            return None
        finally:
            try:
                if os.path.lexists(tmp):
                    tmp.unlink()
            except OSError:
                pass
        return final

    def clear(self, fp: str) -> None:
        """Remove the finished run's state (a folder in its place is left alone, see ``_read``)."""
        p = self.path(fp)
        if not p.is_file() or p.is_symlink():
            return
        try:
            p.unlink()
            log.info("sampling finished; removed resume state %s", p)
        except OSError as e:
            if self.off is None:  # else the one warning has been given
                log.warning("could not remove the finished run's resume state %s (%s)", p, _reason(e))

    def remove_folder_if_empty(self) -> None:
        try:
            self.folder.rmdir()  # only succeeds when empty
        except OSError:
            pass

    def _evict(self, room: int) -> None:
        """Remove kept results, oldest (least recently used) first, until the rest fit ``room`` bytes."""
        kept = []
        try:
            for p in self.folder.glob(f"{RESULT_PREFIX}*{SUFFIX}"):
                st = p.lstat()
                kept.append((st.st_mtime, p.name, st.st_size, p))
        except OSError:
            return  # no folder yet (nothing kept), or unreadable: the write reports it
        total = sum(k[2] for k in kept)
        for _mtime, _name, size, p in sorted(kept):
            if total <= room:
                break
            try:
                p.unlink()
                total -= size
                log.info("removed the kept result %s (%.1f MiB, the oldest) to stay under the %.1f MiB cap",
                         p, size / MIB, self.keep_bytes / MIB)
            except OSError:
                pass

    def _prune(self, keep: Path) -> None:
        now = time.time()
        try:
            found = [*self.folder.glob(f"{PREFIX}*{SUFFIX}"), *self.folder.glob(f"{RESULT_PREFIX}*{SUFFIX}")]
        except OSError:
            return
        for p in found:
            try:
                if p != keep and now - p.lstat().st_mtime > RESUME_MAX_AGE_S:
                    p.unlink()
                    log.info("removed %s (older than %d days)", p, RESUME_MAX_AGE_S // 86400)
            except OSError:
                pass  # another process removed it first
