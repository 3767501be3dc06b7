"""Windowed denoising with position shift, 3-way guidance and SVD-xt's Euler/EDM schedule.

SPEC §8 (schedule, initial latents, Euler step), §9 (windows, position shift, averaging),
§10 (guidance) and §6 (time ids). ``sample`` is the single entry point the sampler node and the
CLI call; the caller owns devices and dtypes (they are arguments here).

Windows of one outer step are independent (they all read the latents of the previous step), so
several windows share one UNet call (``window_batch``); the Euler step and the accumulation
still run window by window in the official order, so the computation is that of one window per
call (float32 results can differ by rounding: BLAS rounds small-row GEMMs, e.g. the time
embeddings, differently when more rows share a call). With a torch.distributed process group the
windows of every step are shared across ranks and their results added up in the same order
(sonic_core/distributed.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import (
    GUIDANCE_ROWS_CHOICES,
    LATENT_CHANNELS,
    SAMPLER_DEFAULTS,
    U8_MAX,
    VAE_SCALE,
    VAE_SCALING_FACTOR,
    WINDOW_BATCH_CPU,
    WINDOW_BATCH_MEMORY_MARGIN,
    WINDOW_BYTES_PER_LATENT_ELEMENT,
    SamplerDefaults,
)

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = Path(__file__).resolve().parent / "models" / "configs" / "svd_xt_scheduler.json"
CFG_BRANCHES = 3  # [uncond, drop_audio, cond] rows per window (SPEC §10)


# ----------------------------------------------------------------------------------------------
# Schedule (SPEC §8)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The part of the Euler/EDM schedule a run uses (after the i2i start, SPEC §8)."""

    sigmas: torch.Tensor  # [n_run + 1] float32, sigma of each run step and the trailing 0
    timesteps: torch.Tensor  # [n_run] float32, 0.25 * ln(sigma), what the UNet is fed
    t_start: int  # first step of the full n-step table that runs


def make_schedule(steps: int, i2i_strength: float = 1.0, config: dict | None = None) -> Schedule:
    """Karras sigmas of the shipped SVD-xt EulerDiscreteScheduler config, cut by ``get_timesteps``."""
    from diffusers import EulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not 0.0 < i2i_strength <= 1.0:
        raise ValueError(f"i2i_strength={i2i_strength} must be in (0, 1]; 1.0 starts from pure noise")
    cfg = config if config is not None else json.loads(SCHEDULER_CONFIG.read_text())
    scheduler = EulerDiscreteScheduler.from_config(cfg)
    scheduler.set_timesteps(steps, device="cpu")
    init = min(int(steps * i2i_strength), steps)
    t_start = max(steps - init, 0)
    if t_start >= steps:
        least = math.ceil(100 / steps) / 100  # the smallest two-decimal strength that runs a step
        raise ValueError(f"i2i_strength={i2i_strength} with steps={steps} runs no step "
                         f"(int({steps} x {i2i_strength}) = 0): use i2i_strength {least:g} or more at "
                         f"{steps} steps, or raise steps to {math.ceil(1 / i2i_strength)} or more")
    sigmas = scheduler.sigmas.to(torch.float32)[t_start:]  # [n_run + 1]
    timesteps = scheduler.timesteps.to(torch.float32)[t_start:]  # [n_run]
    return Schedule(sigmas=sigmas, timesteps=timesteps, t_start=t_start)


def euler_step(
    v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step of a v-prediction EDM model (gamma 0), x upcast to float32 (SPEC §8)."""
    out_dtype = v.dtype
    x = x.to(torch.float32)
    x0 = v * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Windows (SPEC §9)
# ----------------------------------------------------------------------------------------------
def window_indices(num_frames: int, window: int, overlap: int, shift: int) -> list[list[int]]:
    """Frame indices of every window of one outer step: starts range(0, F, W-overlap) - shift, mod F."""
    return [
        [(s0 - shift + j) % num_frames for j in range(window)]
        for s0 in range(0, num_frames, window - overlap)
    ]


def guidance_scales(lo: float, hi: float, n_run: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-step guidance ramp: linspace(lo, hi, n_run) in float32, cast to the latent dtype (SPEC §10)."""
    return torch.linspace(lo, hi, n_run).to(dtype)


# SamplerDefaults field -> config.LIMITS key: the numbers the Sonic Sampler node checks, checked
# here too for Python callers (NaN, inf and out-of-range values are named as the node names them)
SETTING_LIMITS = {"steps": "steps", "min_resolution": "min_resolution",
                  "frames_per_window": "frames_per_window", "overlap": "overlap", "shift_offset": "shift_offset",
                  "min_appearance_guidance": "min_appearance_guidance",
                  "max_appearance_guidance": "max_appearance_guidance",
                  "min_audio_guidance": "min_audio_guidance", "max_audio_guidance": "max_audio_guidance",
                  "i2i_strength": "i2i_strength", "noise_aug_strength": "noise_aug",
                  "fps_conditioning": "fps_conditioning", "audio_scale": "audio_scale"}


def validate(settings: SamplerDefaults, num_frames: int) -> None:
    """Raise on settings the window loop cannot run with, naming the bad value."""
    from .config import check_inputs

    check_inputs({f: getattr(settings, f) for f in SETTING_LIMITS}, SETTING_LIMITS)  # the node's ranges
    w, ov = settings.frames_per_window, settings.overlap
    if w < 1:
        raise ValueError(f"frames_per_window={w} must be at least 1")
    if not 0 <= ov < w:
        raise ValueError(f"overlap={ov} must be >= 0 and smaller than frames_per_window={w}")
    if num_frames < 1:
        raise ValueError(f"the audio gives {num_frames} frames; give at least one frame of audio")
    if settings.shift_offset < 0:
        raise ValueError(f"shift_offset={settings.shift_offset} must be >= 0")
    if settings.guidance_rows not in GUIDANCE_ROWS_CHOICES:
        raise ValueError(f"guidance_rows={settings.guidance_rows} must be one of {GUIDANCE_ROWS_CHOICES}: "
                         "3 runs the three guidance branches in one UNet call, 1 one after another (less memory)")


def check_face_mask(face_mask) -> None:
    """Refuse a face mask that is all zero (or holds NaN), before any model loads.

    The audio attention's output is multiplied by the mask (``audio_scale * M * Attn``), so an empty
    mask gives exactly ``audio_scale = 0``: a video in which nothing follows the speech. That is
    almost always a wiring slip (Load Image's mask of an opaque image is all zero), and the
    deliberate case has its own control, so this is an error with advice, not a warning.
    """
    if not isinstance(face_mask, torch.Tensor) or face_mask.numel() == 0:
        got = tuple(face_mask.shape) if isinstance(face_mask, torch.Tensor) else type(face_mask).__name__
        raise ValueError(f"face_mask must be a MASK [1, H, W] marking the face, got {got}; connect Face Mask "
                         "Detect's mask")
    m = face_mask.detach()
    if not bool(torch.isfinite(m).all()):
        raise ValueError("face_mask holds NaN or inf values; connect Face Mask Detect's mask (values 0..1)")
    if not bool((m > 0).any()):
        raise ValueError(f"face_mask {tuple(face_mask.shape)} is all zero: the audio acts only inside the face "
                         "mask, so nothing would move with the speech. Connect Face Mask Detect's mask (Load "
                         "Image's mask of an image without transparency is empty), or paint the face in the mask "
                         "editor; to animate without the audio's motion on purpose, set audio_scale to 0")


def auto_window_batch(
    free_bytes: int | None,
    height: int,
    width: int,
    window: int,
    dtype: torch.dtype,
    num_windows: int,
    guidance_rows: int = CFG_BRANCHES,
) -> int:
    """How many windows fit one UNet call: from free accelerator memory, or a small fixed CPU number.

    ``height``/``width`` are latent sizes. The per-window estimate scales with the latent elements
    of one window's UNet call, ``guidance_rows x W x h x w`` (WINDOW_BYTES_PER_LATENT_ELEMENT,
    measured on SVD-xt); ``free_bytes`` is what is free with the UNet's weights already loaded.
    """
    if free_bytes is None:
        return max(1, min(WINDOW_BATCH_CPU, num_windows))
    from .lowvram import fit_count

    return fit_count(free_bytes, _call_bytes(height, width, window, dtype, guidance_rows), num_windows)


def auto_guidance_rows(
    free_bytes: int | None, height: int, width: int, window: int, dtype: torch.dtype, window_batch: int = 1
) -> int:
    """CFG rows per UNet call: 3 (one call per window, the fastest) when ``window_batch`` windows of 3
    rows fit ``free_bytes`` (None: a CPU, always 3), else 1 (a third of the activations)."""
    if free_bytes is None:
        return CFG_BRANCHES
    need = window_batch * _call_bytes(height, width, window, dtype, CFG_BRANCHES)
    return CFG_BRANCHES if need <= free_bytes * WINDOW_BATCH_MEMORY_MARGIN else 1


def plan_batching(
    free_bytes: int | None,
    height: int,
    width: int,
    window: int,
    dtype: torch.dtype,
    num_windows: int,
    window_batch: int = 0,
    guidance_rows: int = 0,
    clip_bytes: float = 0.0,
) -> tuple[int, int]:
    """(windows per UNet call, CFG rows per call); a 0 asks for that one to be planned from
    ``free_bytes``: rows first (3 if one window of 3 rows fits, else 1), then as many windows as fit.

    ``clip_bytes`` (``clip_state_bytes``): what the sampler itself will place on the device for the
    whole clip (latents, audio tokens), taken off ``free_bytes`` first: for a ten-minute clip at
    512x512 in fp16 that is 0.74 GB, which the UNet's activations cannot also use.
    """
    if guidance_rows and guidance_rows not in GUIDANCE_ROWS_CHOICES:
        raise ValueError(f"guidance_rows={guidance_rows} must be one of {GUIDANCE_ROWS_CHOICES} (0 = auto)")
    if window_batch < 0:
        raise ValueError(f"window_batch={window_batch} must be at least 1 (0 = auto)")
    if free_bytes is not None:
        free_bytes = max(0, int(free_bytes - clip_bytes))
    rows = guidance_rows or auto_guidance_rows(free_bytes, height, width, window, dtype, window_batch or 1)
    batch = window_batch or auto_window_batch(free_bytes, height, width, window, dtype, num_windows, rows)
    return batch, rows


def clip_state_bytes(num_frames: int, height: int, width: int, cond_tokens_shape, dtype: torch.dtype,
                     window: int = SAMPLER_DEFAULTS.frames_per_window) -> int:
    """Bytes ``sample`` keeps on its device for the whole clip: the latents ``[F,4,h,w]``, the
    step's accumulator for the frames several windows share (``StepAccumulator``: fewer than
    ``window`` with overlap 0) and the audio tokens ``[F,K,D]``, all in ``dtype``
    (``height``/``width``: latent sizes; ``cond_tokens_shape``: ``[F,K,D]``, only K and D are read)."""
    k, d = (int(n) for n in tuple(cond_tokens_shape)[-2:])
    elem = torch.finfo(dtype).bits // 8
    latent = LATENT_CHANNELS * height * width
    return (num_frames * (latent + k * d) + min(num_frames, window) * latent) * elem


def _call_bytes(height: int, width: int, window: int, dtype: torch.dtype, rows: int) -> float:
    """Estimated peak activation bytes of one window's UNet call with ``rows`` CFG rows."""
    return rows * window * height * width * WINDOW_BYTES_PER_LATENT_ELEMENT * torch.finfo(dtype).bits / 16


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, torch.Tensor], None]  # (UNet calls done, total, preview latents)
StepFn = Callable[[int, torch.Tensor], None]  # (step index, latents [F,4,h,w] after the step)


class StepAccumulator:
    """SPEC §9's ``latents = acc / cnt`` for one outer step, written into ``latents`` in place.

    A frame that one window covers (``cnt`` 1: all frames but at most W-1 when F is no multiple
    of W, with overlap 0) ends the step as that window's Euler output, ``(0 + x) / 1 == x``
    exactly, and no other window of the step reads it, so the output is written straight into
    ``latents`` once its round is computed. Only the frames more than one window covers (the
    wrap-around, overlaps, or every frame of a clip shorter than a window) keep their old value
    until the step ends, and get a small accumulator, summed in the same order and divided as
    before. Same values as a whole-clip ``acc``/``cnt`` (the sign of a zero aside), without a
    second clip-sized tensor: 64 KB a frame at 512x512 in float32, 491 MB for ten minutes.
    """

    def __init__(self, wins: list[list[int]], num_frames: int, latents: torch.Tensor):
        counts = [0] * num_frames
        for idx in wins:
            for f in idx:
                counts[f] += 1
        self.latents, self.counts = latents, counts
        shared = [f for f in range(num_frames) if counts[f] > 1]
        self.slot = {f: k for k, f in enumerate(shared)}  # frame -> row of the small accumulator
        dev, dt = latents.device, latents.dtype
        self.index = torch.tensor(shared, dtype=torch.long, device=dev)  # [S]
        self.acc = latents.new_zeros((len(shared), *latents.shape[1:]))  # [S,4,h,w] latent dtype
        self.cnt = torch.zeros(len(shared), 1, 1, 1, device=dev, dtype=dt)  # [S,1,1,1]

    def add(self, idx: list[int], x_out: torch.Tensor) -> None:
        """One window's Euler output ``x_out`` [W,4,h,w] for frames ``idx`` (window order)."""
        dev = x_out.device
        alone = [j for j, f in enumerate(idx) if self.counts[f] == 1]
        if len(alone) == len(idx):
            self.latents.index_copy_(0, torch.tensor(idx, device=dev), x_out)
            return
        if alone:
            js = torch.tensor(alone, device=dev)
            self.latents.index_copy_(0, torch.tensor([idx[j] for j in alone], device=dev), x_out[js])
        many = [j for j, f in enumerate(idx) if self.counts[f] > 1]
        rows = torch.tensor([self.slot[idx[j]] for j in many], device=dev)  # may repeat (F < W)
        self.acc.index_add_(0, rows, x_out[torch.tensor(many, device=dev)])
        self.cnt.index_add_(0, rows, torch.ones(len(many), 1, 1, 1, device=dev, dtype=self.cnt.dtype))

    def finish(self) -> None:
        """Write the shared frames' means into ``latents`` (after the step's last window)."""
        if len(self.slot):
            self.latents.index_copy_(0, self.index, self.acc.div_(self.cnt))


def initial_latents(ref_latents: torch.Tensor, noise: torch.Tensor, sigma0: torch.Tensor) -> torch.Tensor:
    """x = ref_latents + noise * sigma[t_start], broadcast over frames (SPEC §8). Returns [F,4,h,w].

    The sum is formed in the product's buffer (a + b == b + a exactly), so one clip-sized tensor
    is made, not two: 491 MB less at the start of a ten-minute clip at 512x512."""
    return (noise * sigma0).add_(ref_latents)  # [F,4,h,w] + [1,4,h,w]


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    *,
    image_latents: torch.Tensor,
    ref_latents: torch.Tensor,
    clip_embeds: torch.Tensor,
    cond_tokens: torch.Tensor,
    uncond_tokens: torch.Tensor,
    buckets: torch.Tensor,
    face_mask: torch.Tensor | None,
    noise: torch.Tensor,
    settings: SamplerDefaults = SAMPLER_DEFAULTS,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    window_batch: int = 1,
    callback: ProgressFn | None = None,
    on_step: StepFn | None = None,
    scheduler_config: dict | None = None,
    resume=None,
    group=None,
) -> torch.Tensor:
    """Denoise the whole clip with position-shifted windows; returns latents [F,4,h,w] (x 0.18215).

    image_latents: [1,4,h,w] unscaled VAE mode of the (noise-augmented) reference (SPEC §7).
    ref_latents: [1,4,h,w] VAE mode of the reference times 0.18215 (initial-latent mean).
    clip_embeds: [1,D] image embedding. cond_tokens: [F,K,D]; uncond_tokens: [K,D].
    buckets: [F,2] motion buckets with scales applied. face_mask: [1,1,H,W] in 0..1 or None.
    noise: [F,4,h,w] (or [1,F,4,h,w]) unit normal noise.
    settings: steps, frames_per_window, overlap, shift_offset, guidance ramps, i2i_strength,
    fps_conditioning, audio_scale are read. window_batch: windows per UNet call (>= 1); on an
    out-of-memory error the batch is halved and the call retried (same result).
    callback(done, total, preview) after every UNet call (may raise to cancel);
    on_step(i, latents) after every outer step (latents [F,4,h,w], not a copy: the next step
    updates it in place, so clone what you keep).
    resume: a sonic_core.resume.ResumeStore: the state is saved after every outer step and a saved
    state of the same inputs (fingerprint) is continued from; removed once the run finishes. A
    store that keeps results returns a kept result of the same inputs without sampling (no UNet
    call, no callback) and keeps this run's result.
    group: a torch.distributed process group: every rank runs a share of each step's windows,
    all ranks return the same latents, equal to one process's (sonic_core/distributed.py); only
    rank 0 reads and writes ``resume``; ``callback`` counts this rank's windows.
    """
    device = device or noise.device
    if noise.dim() == 5:
        noise = noise[0]  # [1,F,4,h,w] -> [F,4,h,w]
    num_frames = noise.shape[0]
    validate(settings, num_frames)
    _check_shapes(num_frames, image_latents, ref_latents, clip_embeds, cond_tokens, uncond_tokens, buckets)
    if window_batch < 1:
        raise ValueError(f"window_batch={window_batch} must be at least 1")

    sched = make_schedule(settings.steps, settings.i2i_strength, scheduler_config)
    sigmas = sched.sigmas.to(device)  # [n_run + 1] float32
    n_run = sched.timesteps.shape[0]
    g1 = guidance_scales(settings.min_appearance_guidance, settings.max_appearance_guidance, n_run, dtype)
    g2 = guidance_scales(settings.min_audio_guidance, settings.max_audio_guidance, n_run, dtype)

    to = dict(device=device, dtype=dtype)
    latents = initial_latents(
        ref_latents.to(device, torch.float32), noise.to(device, torch.float32), sigmas[0]
    ).to(**to)  # [F,4,h,w]
    img_lat = image_latents.to(**to)  # [1,4,h,w]
    clip = clip_embeds.to(**to).reshape(1, 1, -1)  # [1,1,D]
    cond = cond_tokens.to(**to)  # [F,K,D]
    uncond = uncond_tokens.to(**to)  # [K,D]
    mb = buckets.to(device, torch.float32)  # [F,2]
    mask = face_mask.to(**to) if face_mask is not None else None

    from .distributed import Shard, plan_rounds

    w, ov = settings.frames_per_window, settings.overlap
    n_windows = len(range(0, num_frames, w - ov))
    shard = Shard.of(group)
    # rounds of consecutive windows, a block of each per rank (one rank: one UNet call per round)
    rounds = plan_rounds(n_windows, shard.world, window_batch)
    mine = sum(plan[shard.rank][1] - plan[shard.rank][0] for plan in rounds)  # this rank's windows a step
    total = n_run * mine
    start = 0
    fp = None
    if resume is not None and shard.is_main:  # one writer, one reader; the others get rank 0's state
        fp = _fingerprint(unet, image_latents, ref_latents, clip_embeds, cond_tokens, uncond_tokens, buckets,
                          face_mask, noise, settings, dtype, sched, scheduler_config)
        kept = resume.find_result(fp, latents, n_run)  # validated like a state: untrusted
        if kept is not None:  # start at the end: the loop below runs no step, on any rank
            start, latents = n_run, kept
            log.info("these inputs equal a finished sampling kept in %s; returning it without "
                     "sampling", resume.kept)
        else:
            state = resume.load(fp, latents, n_run)
            if state is not None:
                start, latents = state
                if start == n_run:  # a held final state (resume.py hold_final): no step left
                    log.info("sampling had finished (%s holds its final latents): going straight to "
                             "decoding", resume.path(fp))
                else:
                    log.info("resuming at step %d of %d from %s", start + 1, n_run, resume.path(fp))
    del noise  # only the start and the fingerprint need it: 64 KB a frame at 512x512 less while sampling
    if shard.world > 1:
        shard.check_same_run([num_frames, *latents.shape[1:], n_run, n_windows, window_batch,
                              latents.element_size()], device)
        start, latents = shard.broadcast_state(start, latents)  # every rank starts where rank 0 does
    done = start * mine
    shift = start * settings.shift_offset
    batch = min(window_batch, n_windows)
    for i in range(start, n_run):
        t = sched.timesteps[i].to(device)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        wins = window_indices(num_frames, w, ov, shift)
        shared = StepAccumulator(wins, num_frames, latents)  # the frames more than one window writes
        for plan in rounds:
            lo, hi = plan[shard.rank]  # this rank's windows of the round
            outs = []  # their Euler outputs [W,4,h,w], in window order
            b0 = lo
            while b0 < hi:
                chunk = wins[b0 : min(b0 + batch, hi)]
                try:
                    v = _guided_velocity(
                        unet,
                        latents,
                        chunk,
                        t,
                        sigma,
                        img_lat,
                        clip,
                        cond,
                        uncond,
                        mb,
                        mask,
                        g1[i],
                        g2[i],
                        settings,
                    )  # [nb,W,4,h,w]
                except torch.OutOfMemoryError:
                    if batch == 1:
                        raise
                    batch = max(1, batch // 2)
                    log.warning(
                        "out of memory with %d windows per UNet call; retrying with %d", len(chunk), batch
                    )
                    continue
                for k, idx in enumerate(chunk):
                    index = torch.tensor(idx, device=device)  # [W]
                    x_out = euler_step(v[k], latents[index], sigma, sigma_next)  # [W,4,h,w]
                    outs.append(x_out)
                    done += 1
                    if callback is not None:
                        callback(done, total, x_out)
                b0 += len(chunk)
            if shard.world > 1:  # every rank's outputs of the round, by copy: no float op in the exchange
                outs = shard.gather_round(outs, plan, w, latents, i)
            # accumulate in the official window order on every rank: each frame's sum is added in the
            # order of one process, so all ranks hold the single-process latents (distributed.py)
            for idx, x_out in zip(wins[plan[0][0] : plan[-1][1]], outs):
                shared.add(idx, x_out)
        shift += settings.shift_offset
        shared.finish()  # latents now hold step i + 1 (SPEC §9's acc / cnt, updated in place)
        if resume is not None and shard.is_main and i + 1 < n_run:
            resume.save(fp, i + 1, latents)
        if on_step is not None:
            on_step(i, latents)
    if resume is not None and shard.is_main and start < n_run:
        resume.finish(fp, latents, n_run)  # keeps the result when the store keeps any; drops the state
    return latents


def _fingerprint(unet, image_latents, ref_latents, clip_embeds, cond_tokens, uncond_tokens, buckets, face_mask,
                 noise, settings: SamplerDefaults, dtype, sched: Schedule, scheduler_config) -> str:
    """Everything that changes the sampler's result, the UNet's weights as stored included (not
    window_batch, guidance_rows or the device: rounding only)."""
    from .resume import fingerprint, weights_digest

    used = {k: getattr(settings, k) for k in (
        "steps", "frames_per_window", "overlap", "shift_offset", "min_appearance_guidance",
        "max_appearance_guidance", "min_audio_guidance", "max_audio_guidance", "i2i_strength",
        "fps_conditioning", "audio_scale")}
    tensors = {"image_latents": image_latents, "ref_latents": ref_latents, "clip_embeds": clip_embeds,
               "cond_tokens": cond_tokens, "uncond_tokens": uncond_tokens, "buckets": buckets,
               "face_mask": face_mask, "noise": noise, "sigmas": sched.sigmas}
    return fingerprint(tensors, {**used, "dtype": str(dtype), "scheduler_config": scheduler_config,
                                 "unet": weights_digest(unet)})


def _guided_velocity(
    unet, latents, chunk, t, sigma, img_lat, clip, cond, uncond, mb, mask, g1, g2, settings
) -> torch.Tensor:
    """UNet calls for ``len(chunk)`` windows x 3 branches, then 3-way guidance -> [nb,W,4,h,w].

    ``settings.guidance_rows`` 3: one call with the rows [uncond, drop_audio, cond] of every window
    (SPEC §10); 1: three calls, one branch each (the same rows, a third of the activations).
    """
    index = torch.tensor(chunk, device=latents.device)  # [nb,W]
    rows = window_rows(latents[index], sigma, img_lat, clip, cond[index], uncond, mb[index], settings)
    return guided_call(unet, *rows, t, mask, g1, g2, settings)


def window_rows(x, sigma, img_lat, clip, tok_c, uncond, mb_w, settings):
    """The UNet inputs of ``nb`` windows of one face: ``x`` [nb,W,4,h,w] their latents, ``tok_c``
    [nb,W,K,D] their audio tokens, ``mb_w`` [nb,W,2] their motion buckets; ``img_lat`` [1,4,h,w],
    ``clip`` [1,1,D], ``uncond`` [K,D] the face's. Returns sample [nb,3,W,8,h,w], CLIP context
    [nb,3,1,D], audio tokens [nb,3,W,K,D], time ids [nb,3,3] (rows [uncond, drop_audio, cond])."""
    nb, w = x.shape[:2]
    x_in = x / ((sigma**2 + 1) ** 0.5)  # scale_model_input (c_in), SPEC §8
    x_in = x_in.unsqueeze(1).expand(nb, CFG_BRANCHES, *x.shape[1:])  # [nb,3,W,4,h,w]
    zero_img = torch.zeros_like(img_lat)
    img = torch.stack([zero_img, img_lat, img_lat])  # [3,1,4,h,w]
    img = img.unsqueeze(0).expand(nb, CFG_BRANCHES, w, *img_lat.shape[1:])  # [nb,3,W,4,h,w]
    sample_in = torch.cat([x_in, img], dim=3)  # [nb,3,W,8,h,w]

    ehs = torch.stack([torch.zeros_like(clip), clip, clip])  # [3,1,1,D]
    ehs = ehs.unsqueeze(0).expand(nb, -1, -1, -1, -1).flatten(2, 3)  # [nb,3,1,D]

    tok_u = uncond.expand(nb, w, *uncond.shape)  # [nb,W,K,D]
    tokens = torch.stack([tok_u, tok_u, tok_c], dim=1)  # [nb,3,W,K,D]

    mean_mb = mb_w.mean(dim=1)  # [nb,2]
    fps = torch.full((nb, 1), float(settings.fps_conditioning), device=mb_w.device)
    ids = torch.cat([fps, mean_mb], dim=1).to(clip.dtype)  # [nb,3]
    ids = ids.unsqueeze(1).expand(nb, CFG_BRANCHES, 3)  # [nb,3,3]
    return sample_in, ehs, tokens, ids


def guided_call(unet, sample_in, ehs, tokens, ids, t, mask, g1, g2, settings) -> torch.Tensor:
    """The UNet call(s) for ``nb`` windows' rows (``window_rows``, windows of several faces may be
    stacked along nb) and 3-way guidance -> [nb,W,4,h,w]. ``mask``: None, one face mask
    [1,1,H,W] for every window, or one per window [nb,1,H,W]."""
    nb = sample_in.shape[0]

    def call(rows: slice) -> torch.Tensor:  # the CFG rows ``rows`` of every window -> [nb,r,W,4,h,w]
        r = len(range(CFG_BRANCHES)[rows])
        v = unet(
            sample_in[:, rows].flatten(0, 1),  # [nb*r,W,8,h,w]
            t,
            ehs[:, rows].flatten(0, 1),  # [nb*r,1,D]
            ids[:, rows].flatten(0, 1),  # [nb*r,3]
            audio_tokens=tokens[:, rows].flatten(0, 1),  # [nb*r,W,K,D]
            face_mask=mask,
            audio_scale=settings.audio_scale,
            groups=nb,
        )  # [nb*r,W,4,h,w]
        return v.unflatten(0, (nb, r))  # [nb,r,W,4,h,w]

    if settings.guidance_rows == CFG_BRANCHES:
        v = call(slice(None))  # [nb,3,W,4,h,w]
        v_u, v_d, v_c = v[:, 0], v[:, 1], v[:, 2]
    else:  # one branch per call: only three [nb,W,4,h,w] outputs stay alive between calls
        v_u, v_d, v_c = (call(slice(b, b + 1))[:, 0] for b in range(CFG_BRANCHES))
    return v_u + g1 * (v_d - v_u) + g2 * (v_c - v_d)  # [nb,W,4,h,w]


def _check_shapes(f, image_latents, ref_latents, clip_embeds, cond_tokens, uncond_tokens, buckets):
    if cond_tokens.shape[0] != f:
        raise ValueError(
            f"audio tokens cover {cond_tokens.shape[0]} frames but the noise has {f}; "
            "use the SONIC_AUDIO the motion was predicted from"
        )
    if buckets.shape != (f, 2):
        raise ValueError(
            f"motion buckets have shape {tuple(buckets.shape)}, expected ({f}, 2): "
            "predict the motion from the same SONIC_AUDIO"
        )
    if image_latents.shape != ref_latents.shape or image_latents.dim() != 4:
        raise ValueError(
            f"image latents {tuple(image_latents.shape)} / reference latents "
            f"{tuple(ref_latents.shape)} must both be [1,4,h,w]"
        )
    if clip_embeds.shape[0] != 1:
        raise ValueError(f"clip_embeds has batch {clip_embeds.shape[0]}; give one reference image")
    if uncond_tokens.shape != cond_tokens.shape[1:]:
        raise ValueError(
            f"uncond tokens {tuple(uncond_tokens.shape)} do not match cond tokens {tuple(cond_tokens.shape)}"
        )


def to_vae_space(latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> VAE space: one multiply by 1/0.18215 (reciprocal in double, SPEC §11)."""
    return latents * (1.0 / VAE_SCALING_FACTOR)


def make_noise(seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Unit normal initial noise [F,4,h,w] from a CPU generator (device-independent)."""
    from .config import LATENT_CHANNELS

    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))
    return torch.randn(1, num_frames, LATENT_CHANNELS, height, width, generator=gen, dtype=torch.float32)[
        0
    ]  # [1,F,4,h,w] -> [F,4,h,w]


def window_count(num_frames: int, settings: SamplerDefaults) -> int:
    """Windows per outer step: ceil(F / (W - overlap))."""
    return math.ceil(num_frames / (settings.frames_per_window - settings.overlap))


# ----------------------------------------------------------------------------------------------
# The whole sampler node: reference -> VAE / CLIP -> noise -> windows -> VAE-space latents
# ----------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The reference image at the working size and what the sampler derives from it."""

    pixels: torch.Tensor  # [1,H,W,3] float32 u8/255 at the working size
    face_mask: torch.Tensor  # [1,1,H,W] float32 in 0..1
    image_latents: torch.Tensor  # [1,4,h,w] unscaled VAE mode of the (noise-augmented) reference
    ref_latents: torch.Tensor  # [1,4,h,w] VAE mode of the reference x 0.18215
    clip_embeds: torch.Tensor  # [1,D]


@torch.no_grad()
def prepare_reference(
    vae,
    clip_vision,
    image: torch.Tensor,
    mask: torch.Tensor,
    min_resolution: int,
    noise_aug: float = 0.0,
    generator: torch.Generator | None = None,
) -> Reference:
    """Working-size image and mask (SPEC §2), VAE latents (SPEC §7) and CLIP embedding.

    ``image``: ComfyUI IMAGE ``[B,H0,W0,C]`` (first used); ``mask``: MASK ``[B,H0,W0]`` or ``[H0,W0]``.
    ``vae`` / ``clip_vision`` answer ComfyUI's ``encode(pixels)`` / ``encode_image(image, crop=False)``.
    With ``noise_aug > 0`` the image latents encode ``ref + noise_aug * eps`` (eps ~ N(0,1) in
    [-1,1] pixel space, drawn from ``generator``); the reference latents never carry it.
    """
    from . import image as img

    rgb = img.to_rgb(image)  # [H0,W0,3]
    m = mask[0] if mask.dim() == 3 else mask  # [H0,W0]
    if m.dim() != 2 or tuple(m.shape) != tuple(rgb.shape[:2]):
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match the image {tuple(rgb.shape[:2])}; "
            "use the image and mask from the same Face Mask Detect node"
        )
    u8, mask_w = img.prepare_reference(rgb, m.float(), min_resolution)  # [H,W,3] u8, [H,W]
    pixels = torch.from_numpy(u8).to(torch.float32)[None] / U8_MAX  # [1,H,W,3]
    z = vae.encode(pixels).float()  # [1,4,h,w] unscaled mode
    if noise_aug > 0:
        eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)  # [1,H,W,3]
        img_z = vae.encode(pixels + noise_aug * 0.5 * eps).float()  # (2p-1) + s*eps in [-1,1] space
    else:
        img_z = z
    emb = clip_vision.encode_image(pixels, crop=False).image_embeds.float().reshape(1, -1)  # [1,D]
    return Reference(
        pixels=pixels,
        face_mask=mask_w[None, None],
        image_latents=img_z,
        ref_latents=z * VAE_SCALING_FACTOR,
        clip_embeds=emb,
    )


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    vae,
    clip_vision,
    image: torch.Tensor,
    mask: torch.Tensor,
    audio,
    motion,
    *,
    settings: SamplerDefaults = SAMPLER_DEFAULTS,
    seed: int = SAMPLER_DEFAULTS.seed,
    dtype: torch.dtype = torch.float32,
    window_batch: int = 1,
    noise: torch.Tensor | None = None,
    callback: ProgressFn | None = None,
    on_step: StepFn | None = None,
    resume=None,
    group=None,
) -> torch.Tensor:
    """Everything the sampler node does; returns VAE-space latents ``[F,4,h,w]`` float32 on the CPU.

    ``unet``: the Sonic UNet on its compute device; ``audio``: SonicAudio; ``motion``: SonicMotion.
    ``noise``: optional unit normal ``[F,4,h,w]`` / ``[1,F,4,h,w]`` replacing the seeded noise.
    Noise comes from a CPU generator seeded with ``seed``: first the latent noise, then (only
    with ``noise_aug_strength > 0``) the pixel noise, so results do not depend on the device.
    ``group``: a torch.distributed process group to share the windows across ranks (see ``sample``).
    """
    from .config import check_inputs

    seed, window_batch = check_inputs({"seed": seed, "window_batch": window_batch}).values()  # as the node
    device = next(unet.parameters()).device
    inputs = face_inputs(vae, clip_vision, image, mask, audio, motion, settings=settings, seed=seed,
                         dtype=dtype, device=device, noise=noise)
    # handed over, not kept here: sample() drops the noise once the start latents exist
    handoff = [inputs.pop("noise")]
    del noise
    latents = sample(
        unet,
        image_latents=inputs["image_latents"],
        ref_latents=inputs["ref_latents"],
        clip_embeds=inputs["clip_embeds"],
        cond_tokens=inputs["cond_tokens"],
        uncond_tokens=inputs["uncond_tokens"],
        buckets=inputs["buckets"],
        face_mask=inputs["face_mask"],
        noise=handoff.pop(),
        settings=settings,
        device=device,
        dtype=dtype,
        window_batch=window_batch,
        callback=callback,
        on_step=on_step,
        resume=resume,
        group=group,
    )  # [F,4,h,w], ours: scaled in place, so the clip is not held twice (same values as to_vae_space)
    return latents.float().mul_(1.0 / VAE_SCALING_FACTOR).cpu()


def face_inputs(vae, clip_vision, image, mask, audio, motion, *, settings: SamplerDefaults, seed: int,
                dtype: torch.dtype, device: torch.device, noise: torch.Tensor | None = None,
                faces: int = 1) -> dict:
    """``sample``'s keyword inputs for one face (what ``generate`` feeds it): the seeded noise, the
    reference's latents, CLIP embedding and working-size mask, the audio tokens and motion buckets.
    ``faces``: how many faces sample together (their clip state is checked against memory at once)."""
    from .config import LATENT_CHANNELS, check_inputs

    seed = check_inputs({"seed": seed})["seed"]  # as the node
    num_frames = int(audio.num_frames)
    if motion.buckets.shape[0] != num_frames:
        raise ValueError(
            f"motion has {motion.buckets.shape[0]} frames but the audio {num_frames}; predict "
            "the motion from the same SONIC_AUDIO the sampler gets"
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))
    rgb_hw = image.shape[-3:-1]
    from .image import working_size

    w_img, h_img = working_size(int(rgb_hw[1]), int(rgb_hw[0]), settings.min_resolution)
    from .budget import MemoryEstimate, add_sampler, check_fits

    check_fits(add_sampler(MemoryEstimate(num_frames * faces), (w_img, h_img), dtype, device.type != "cpu"),
               device, "Sonic sampler")  # before the noise is drawn
    latent_shape = (1, num_frames, LATENT_CHANNELS, h_img // VAE_SCALE, w_img // VAE_SCALE)
    seeded = torch.randn(latent_shape, generator=gen, dtype=torch.float32)  # [1,F,4,h,w]
    if noise is None:
        noise = seeded
    elif tuple(noise.reshape(-1, *noise.shape[-3:]).shape) != latent_shape[1:]:
        raise ValueError(f"noise {tuple(noise.shape)} must be {latent_shape} for this image and audio")
    del seeded  # drawn either way: the pixel noise below comes after it in the generator
    ref = prepare_reference(
        vae, clip_vision, image, mask, settings.min_resolution, settings.noise_aug_strength, gen
    )
    return dict(image_latents=ref.image_latents, ref_latents=ref.ref_latents, clip_embeds=ref.clip_embeds,
                cond_tokens=audio.cond_tokens, uncond_tokens=audio.uncond_tokens, buckets=motion.buckets,
                face_mask=ref.face_mask, noise=noise.reshape(latent_shape[1:]))  # noise [F,4,h,w]
