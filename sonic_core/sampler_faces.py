"""Several faces sampled together: windows of different faces share a UNet call (issue 30 item 7).

N faces of one conversation are N Sonic runs with the same frame count, seed, steps, schedule and
settings; only their conditioning differs (image and reference latents, CLIP embedding, audio
tokens, motion buckets, face mask). Every window of one outer step reads only the latents of the
previous step, so windows of different faces are as independent as windows of one face, and
``window_batch`` windows (of any faces) share one UNet call: the conditioning of each window is
stacked along the batch, the face masks one per window (``SonicUNet.forward`` groups). Each face
keeps its own latents and step accumulator, summed in its own window order, so each face's result
is its single-face ``sampler.sample`` result (rounding aside: see sampler.py's module note).

Faces whose working sizes differ (crops of different sizes) cannot share a call: they are grouped
by latent shape and each group runs its own step loop, one group after another.
"""

from __future__ import annotations

import logging

import torch

from .config import SAMPLER_DEFAULTS, VAE_SCALING_FACTOR, SamplerDefaults
from .sampler import (
    ProgressFn,
    StepAccumulator,
    _check_shapes,
    _fingerprint,
    euler_step,
    face_inputs,
    guidance_scales,
    guided_call,
    initial_latents,
    make_schedule,
    validate,
    window_indices,
    window_rows,
)

log = logging.getLogger(__name__)

FACE_KEYS = ("image_latents", "ref_latents", "clip_embeds", "cond_tokens", "uncond_tokens", "buckets",
             "face_mask", "noise")  # one face's inputs: sampler.sample's keyword arguments


def shape_groups(faces: list[dict]) -> list[list[int]]:
    """Indices of the faces that can share UNet calls: the same latent shape (and mask size), in order."""
    groups: dict[tuple, list[int]] = {}
    for k, face in enumerate(faces):
        mask = face["face_mask"]
        key = (tuple(face["image_latents"].shape), None if mask is None else tuple(mask.shape))
        groups.setdefault(key, []).append(k)
    return list(groups.values())


@torch.no_grad()
def sample_faces(
    unet: torch.nn.Module,
    faces: list[dict],
    *,
    settings: SamplerDefaults = SAMPLER_DEFAULTS,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    window_batch: int = 1,
    callback: ProgressFn | None = None,
    scheduler_config: dict | None = None,
    resume=None,
    kept: list | None = None,
    labels: list[str] | None = None,
) -> list[torch.Tensor]:
    """``sampler.sample`` for every face of ``faces`` (dicts of its keyword inputs, FACE_KEYS; the
    ``noise`` is taken out of each dict, handed over) -> each face's latents [F,4,h,w] (x 0.18215).

    ``window_batch``: windows per UNet call, counted over all faces of a shape group. All faces
    need the same frame count; all or none have a face mask. ``callback(done, total, preview)``
    after every window, counted over all faces (may raise to cancel). ``resume``: a ResumeStore;
    each face has its own state under its own fingerprint (the same as its single-face run's), saved
    after every step; a face resumes from its state, faces at different steps join the loop at their
    own step, a kept result returns that face without sampling. ``kept``: a list that receives the
    path of each face's kept result (``resume.kept``) as it is written or found. ``labels``: each
    face's name in messages (default "face 1", "face 2"...).
    """
    if not faces:
        raise ValueError("sample_faces needs at least one face")
    if window_batch < 1:
        raise ValueError(f"window_batch={window_batch} must be at least 1")
    missing = [sorted(set(FACE_KEYS) - set(f)) for f in faces]
    if any(missing):
        raise ValueError(f"face {next(k for k, m in enumerate(missing) if m) + 1} lacks the inputs "
                         f"{next(m for m in missing if m)}; give each face sampler.sample's keyword inputs")
    if len({f["face_mask"] is None for f in faces}) > 1:
        raise ValueError("some faces have a face mask and some none: give every face its mask (Face Mask "
                         "Detect)")
    noises = [f.pop("noise") for f in faces]
    noises = [n[0] if n.dim() == 5 else n for n in noises]  # [1,F,4,h,w] -> [F,4,h,w]
    frames = {int(n.shape[0]) for n in noises}
    if len(frames) > 1:
        raise ValueError(f"the faces have {sorted(frames)} frames; pad every voice to the longest so all "
                         "faces share the frame count")
    num_frames = frames.pop()
    validate(settings, num_frames)
    for face in faces:
        _check_shapes(num_frames, face["image_latents"], face["ref_latents"], face["clip_embeds"],
                      face["cond_tokens"], face["uncond_tokens"], face["buckets"])
    device = device or noises[0].device
    labels = labels or [f"face {k + 1}" for k in range(len(faces))]
    groups = shape_groups(faces)
    n_win = len(range(0, num_frames, settings.frames_per_window - settings.overlap))
    n_run = make_schedule(settings.steps, settings.i2i_strength, scheduler_config).timesteps.shape[0]
    progress = _Progress(callback, n_run * n_win * len(faces))
    out: list[torch.Tensor | None] = [None] * len(faces)
    for group in groups:
        if len(groups) > 1:
            log.info("%s share UNet calls (latents %s)", ", ".join(labels[k] for k in group),
                     tuple(faces[group[0]]["image_latents"].shape[-2:]))
        handoff = [noises[k] for k in group]
        for k in group:
            noises[k] = None
        results = _sample_group(unet, [faces[k] for k in group], handoff, settings, device, dtype,
                                window_batch, progress, scheduler_config, resume, kept,
                                [labels[k] for k in group])
        for k, lat in zip(group, results):
            out[k] = lat
    return out


class _Progress:
    """Window count over every face of every group, for the one callback."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, preview: torch.Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, preview)


def _sample_group(unet, faces, noises, settings, device, dtype, window_batch, progress, scheduler_config,
                  resume, kept, labels) -> list[torch.Tensor]:
    """The step loop of faces with one latent shape; see ``sample_faces``."""
    sched = make_schedule(settings.steps, settings.i2i_strength, scheduler_config)
    sigmas = sched.sigmas.to(device)  # [n_run + 1] float32
    n_run = sched.timesteps.shape[0]
    g1 = guidance_scales(settings.min_appearance_guidance, settings.max_appearance_guidance, n_run, dtype)
    g2 = guidance_scales(settings.min_audio_guidance, settings.max_audio_guidance, n_run, dtype)
    to = dict(device=device, dtype=dtype)
    num_frames = noises[0].shape[0]
    w, ov = settings.frames_per_window, settings.overlap
    n_windows = len(range(0, num_frames, w - ov))
    state = []  # per face: its tensors on the device, fingerprint and first step to run
    for face in faces:
        latents = initial_latents(face["ref_latents"].to(device, torch.float32),
                                  noises[0].to(device, torch.float32), sigmas[0]).to(**to)  # [F,4,h,w]
        fp, start = None, 0
        if resume is not None:
            fp = _fingerprint(unet, face["image_latents"], face["ref_latents"], face["clip_embeds"],
                              face["cond_tokens"], face["uncond_tokens"], face["buckets"], face["face_mask"],
                              noises[0], settings, dtype, sched, scheduler_config)
            found = resume.find_result(fp, latents, n_run)
            if found is not None:
                start, latents = n_run, found
                log.info("%s: its inputs equal a finished sampling kept in %s; not sampling it again",
                         labels[len(state)], resume.kept)
                _take_kept(resume, kept)
            else:
                saved = resume.load(fp, latents, n_run)
                if saved is not None:
                    start, latents = saved
                    log.info("%s: resuming at step %d of %d from %s", labels[len(state)], start + 1, n_run,
                             resume.path(fp))
        noises.pop(0)  # only the start and the fingerprint need it
        mask = face["face_mask"]
        state.append(dict(latents=latents, img=face["image_latents"].to(**to),
                          clip=face["clip_embeds"].to(**to).reshape(1, 1, -1),  # [1,1,D]
                          cond=face["cond_tokens"].to(**to), uncond=face["uncond_tokens"].to(**to),
                          mb=face["buckets"].to(device, torch.float32),
                          mask=None if mask is None else mask.to(**to), fp=fp, start=start))
    progress.done += sum(min(s["start"], n_run) for s in state) * n_windows
    batch = window_batch
    for i in range(min(s["start"] for s in state), n_run):
        active = [s for s in state if s["start"] <= i]
        t = sched.timesteps[i].to(device)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        wins = window_indices(num_frames, w, ov, i * settings.shift_offset)
        acc = [StepAccumulator(wins, num_frames, s["latents"]) for s in active]
        items = [(a, j) for a in range(len(active)) for j in range(n_windows)]  # face-major, window order
        b0 = 0
        while b0 < len(items):
            chunk = items[b0 : b0 + batch]
            try:
                v = _velocity(unet, active, chunk, wins, t, sigma, g1[i], g2[i], settings)  # [nb,W,4,h,w]
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                log.warning("out of memory with %d windows per UNet call; retrying with %d", len(chunk),
                            batch)
                continue
            for k, (a, j) in enumerate(chunk):
                lat = active[a]["latents"]
                index = torch.tensor(wins[j], device=device)  # [W]
                x_out = euler_step(v[k], lat[index], sigma, sigma_next)  # [W,4,h,w]
                acc[a].add(wins[j], x_out)  # a frame one window covers: only that window reads it
                progress(x_out)
            b0 += len(chunk)
        for s, a in zip(active, acc):
            a.finish()  # latents now hold step i + 1
            if resume is not None and i + 1 < n_run:
                resume.save(s["fp"], i + 1, s["latents"])
    for s in state:
        if resume is not None and s["start"] < n_run:
            resume.finish(s["fp"], s["latents"], n_run)
            _take_kept(resume, kept)
    return [s["latents"] for s in state]


def _take_kept(resume, kept: list | None) -> None:
    if resume.kept is not None and kept is not None:
        kept.append(resume.kept)
    resume.kept = None


def _velocity(unet, active, chunk, wins, t, sigma, g1, g2, settings) -> torch.Tensor:
    """One UNet call (per CFG branch with guidance_rows 1) for the windows ``chunk`` ((face, window)
    pairs, face-major) -> guided velocity [nb,W,4,h,w]."""
    parts, masks = [], []
    b = 0
    while b < len(chunk):
        a, e = chunk[b][0], b
        while e < len(chunk) and chunk[e][0] == a:
            e += 1
        js = [j for _, j in chunk[b:e]]  # this face's windows in the call, in window order
        s = active[a]
        index = torch.tensor([wins[j] for j in js], device=s["latents"].device)  # [n,W]
        parts.append(window_rows(s["latents"][index], sigma, s["img"], s["clip"], s["cond"][index],
                                 s["uncond"], s["mb"][index], settings))  # one face's windows
        masks.append(None if s["mask"] is None else s["mask"].expand(len(js), *s["mask"].shape[1:]))
        b += len(js)
    if len(parts) == 1:
        rows = parts[0]
        mask = None if masks[0] is None else active[chunk[0][0]]["mask"]  # [1,1,H,W]: the one-face call
    else:
        rows = [torch.cat(p) for p in zip(*parts)]  # windows of several faces along the batch
        mask = None if masks[0] is None else torch.cat(masks)  # [nb,1,H,W], one per window
    return guided_call(unet, *rows, t, mask, g1, g2, settings)


@torch.no_grad()
def generate_faces(unet: torch.nn.Module, vae, clip_vision, faces: list[tuple], *,
                   settings: SamplerDefaults = SAMPLER_DEFAULTS, seed: int = SAMPLER_DEFAULTS.seed,
                   dtype: torch.dtype = torch.float32, window_batch: int = 1,
                   callback: ProgressFn | None = None, resume=None, kept: list | None = None,
                   labels: list[str] | None = None) -> list[torch.Tensor]:
    """``sampler.generate`` for several faces, sampled together: ``faces`` holds each face's
    ``(image, mask, audio, motion)``; returns each face's VAE-space latents [F,4,h,w] float32 on
    the CPU, each what its own ``generate`` call returns (same seed, same noise rule)."""
    device = next(unet.parameters()).device
    inputs = [face_inputs(vae, clip_vision, image, mask, audio, motion, settings=settings, seed=seed,
                          dtype=dtype, device=device, faces=len(faces))
              for image, mask, audio, motion in faces]
    latents = sample_faces(unet, inputs, settings=settings, device=device, dtype=dtype,
                           window_batch=window_batch, callback=callback, resume=resume, kept=kept,
                           labels=labels)
    return [lat.float().mul_(1.0 / VAE_SCALING_FACTOR).cpu() for lat in latents]
