"""SonicSampler: the whole clip denoised in position-shifted windows -> LATENT (frames) + fps.

Python callers (tests, scripts) may pass two keywords that the UI does not show: ``noise``
(unit normal ``[F,4,h,w]`` or ``[1,F,4,h,w]`` replacing the seeded noise, e.g. a recorded
reference run) and ``on_step`` (``f(step, latents)`` after every denoising step).
"""

from __future__ import annotations

import dataclasses
import logging

from . import runtime
from .runtime import core

log = logging.getLogger(__name__)

GUIDANCE_ROWS = ["auto", "3", "1"]  # combo choices: auto, or config.GUIDANCE_ROWS_CHOICES as text


def _float(name: str, tip: str, step: float = 0.05) -> tuple:
    """A FLOAT widget of the sampler with its range from config.LIMITS."""
    return core("config").LIMITS[name].widget(tip, step=step)


class SonicSampler:
    DESCRIPTION = (
        "Sonic's long-video sampler on the SVD-xt UNet: every denoising step runs the whole clip "
        "in windows whose starts move by shift_offset frames per step (wrapping around the "
        "clip end) and averages overlapping frames, with 3-way guidance (reference image, "
        "audio). Output: one latent per video frame (decode with VAE Decode) and the "
        "generated frame rate."
    )
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("sampler", "audio driven", "audio to video", "speech to video",
                                            "采样")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("min_appearance_guidance", "max_appearance_guidance", "min_audio_guidance",
                       "max_audio_guidance", "frames_per_window", "overlap", "shift_offset", "i2i_strength",
                       "noise_aug", "fps_conditioning", "audio_scale", "window_batch")
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "FLOAT")
    RETURN_NAMES = ("latent", "fps")
    OUTPUT_TOOLTIPS = (
        "One latent per generated frame (batch = frames), in VAE space for VAE Decode.",
        "Frame rate of the generated frames (12.5; 25 after 2x frame interpolation).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        cfg = core("config")
        L = cfg.LIMITS
        return runtime.advanced({
            "required": {
                "sonic_model": ("SONIC_MODEL", {"tooltip": "From Sonic Model Loader (the UNet is used)."}),
                "vae": (
                    "VAE",
                    {"tooltip": "SVD-xt VAE (svd_xt checkpoint or SVD VAE + Image Encoder Loader)."},
                ),
                "clip_vision": ("CLIP_VISION", {"tooltip": "SVD-xt image encoder (CLIP ViT-H/14)."}),
                "image": (
                    "IMAGE",
                    {"tooltip": "Reference portrait (from Face Mask Detect; first of a batch)."},
                ),
                "face_mask": (
                    "MASK",
                    {
                        "tooltip": "Face region of that image (from Face Mask Detect): audio "
                        "attention acts inside it."
                    },
                ),
                "sonic_audio": (
                    "SONIC_AUDIO",
                    {"tooltip": "From Whisper Audio Encode; sets the frame count."},
                ),
                "sonic_motion": ("SONIC_MOTION", {"tooltip": "From Motion Bucket Predict (same audio)."}),
                "seed": L["seed"].widget(
                    "Initial noise seed (CPU generator: same result on every device).", control_after_generate=True
                ),
                "steps": L["steps"].widget("Denoising steps (official 25)."),
                "min_resolution": L["min_resolution"].widget(
                    "Short side of the working size; both sides are rounded to multiples of 64 "
                    "(official 512). Keep Motion Bucket Predict's min_resolution equal.",
                    step=cfg.SIZE_MULTIPLE,
                ),
                "min_appearance_guidance": _float(
                    "min_appearance_guidance", "Reference-image guidance at the first step (official 2.0)."
                ),
                "max_appearance_guidance": _float(
                    "max_appearance_guidance",
                    "Reference-image guidance at the last step, linear in between (official 2.0).",
                ),
                "min_audio_guidance": _float(
                    "min_audio_guidance", "Audio guidance at the first step (official 7.5)."
                ),
                "max_audio_guidance": _float(
                    "max_audio_guidance", "Audio guidance at the last step, linear in between (official 7.5)."
                ),
                "frames_per_window": L["frames_per_window"].widget(
                    "Frames the UNet denoises together (official 25, what SVD-xt was trained on)."
                ),
                "overlap": L["overlap"].widget(
                    "Frames shared by consecutive windows, averaged (official 0; the shift already "
                    "stitches windows). Must be smaller than frames_per_window."
                ),
                "shift_offset": L["shift_offset"].widget(
                    "Frames every window start moves back after each step, wrapping around the clip "
                    "(official 7; 0 = fixed windows)."
                ),
                "i2i_strength": _float(
                    "i2i_strength",
                    "1.0 = start from noise (official). Lower skips the first steps and starts nearer "
                    "the reference image: int(steps x strength) steps run, so it must be at least "
                    "1/steps (0.04 at 25 steps, 0.1 at 10); lower values are refused before sampling.",
                    0.01,
                ),
                "noise_aug": _float(
                    "noise_aug",
                    "Noise added to the reference before its image latents are encoded (official 0.0).",
                    0.01,
                ),
                "fps_conditioning": _float(
                    "fps_conditioning",
                    "fps value the UNet is conditioned on "
                    "(official 12.5). Does not change the frame count or output fps.",
                    0.5,
                ),
                "audio_scale": _float(
                    "audio_scale",
                    "Weight of the audio cross-attention in every attention layer (official 1.0).",
                ),
            },
            "optional": {
                "window_batch": L["window_batch"].widget(
                    "Windows per UNet call; 0 = auto (as many as free GPU memory allows). "
                    "Same computation either way (float rounding may differ); higher is faster "
                    "if memory allows."
                ),
                "guidance_rows": (
                    GUIDANCE_ROWS,
                    {
                        "default": GUIDANCE_ROWS[0],
                        "tooltip": (
                            "Guidance branches (uncond / image / image+audio) per UNet call. 3 = one call "
                            "per window (fastest); 1 = the three one after another, about a third of the "
                            "UNet's activation memory (512x512 fits an 8 GB GPU). Same result either way "
                            "(float rounding may differ). auto = 3 when free GPU memory allows, else 1."
                        ),
                    },
                ),
            },
        }, cls.ADVANCED_INPUTS)

    def sample(
        self,
        sonic_model,
        vae,
        clip_vision,
        image,
        face_mask,
        sonic_audio,
        sonic_motion,
        seed=72589,
        steps=25,
        min_resolution=512,
        min_appearance_guidance=2.0,
        max_appearance_guidance=2.0,
        min_audio_guidance=7.5,
        max_audio_guidance=7.5,
        frames_per_window=25,
        overlap=0,
        shift_offset=7,
        i2i_strength=1.0,
        noise_aug=0.0,
        fps_conditioning=12.5,
        audio_scale=1.0,
        window_batch=0,
        guidance_rows="auto",
        noise=None,
        on_step=None,
    ):
        cfg, smp = core("config"), core("sampler")
        if not hasattr(sonic_audio, "cond_tokens"):
            raise ValueError(f"sonic_audio is a {type(sonic_audio).__name__}; connect Whisper Audio Encode")
        if not hasattr(sonic_motion, "buckets"):
            raise ValueError(
                f"sonic_motion is a {type(sonic_motion).__name__}; connect Motion Bucket Predict"
            )
        n = cfg.check_inputs(dict(  # NaN, inf and out-of-range numbers (linked inputs too), before loading
            seed=seed, steps=steps, min_resolution=min_resolution, min_appearance_guidance=min_appearance_guidance,
            max_appearance_guidance=max_appearance_guidance, min_audio_guidance=min_audio_guidance,
            max_audio_guidance=max_audio_guidance, frames_per_window=frames_per_window, overlap=overlap,
            shift_offset=shift_offset, i2i_strength=i2i_strength, noise_aug=noise_aug,
            fps_conditioning=fps_conditioning, audio_scale=audio_scale, window_batch=window_batch))
        seed, window_batch = n.pop("seed"), n.pop("window_batch")
        n["noise_aug_strength"] = n.pop("noise_aug")
        settings = dataclasses.replace(cfg.SAMPLER_DEFAULTS, **n)  # ints and floats as the limits say
        smp.check_face_mask(face_mask)  # all zero: the audio would move nothing
        if str(guidance_rows) not in GUIDANCE_ROWS:
            raise ValueError(f"guidance_rows={guidance_rows!r} must be one of {GUIDANCE_ROWS}")
        smp.validate(settings, int(sonic_audio.num_frames))
        n_run = len(smp.make_schedule(settings.steps, settings.i2i_strength).timesteps)  # before loading
        w_img, h_img = core("image").working_size(  # refuses an oversized working size before loading
            image.shape[-2], image.shape[-3], settings.min_resolution
        )
        resume = core("resume")
        store = resume.ResumeStore(runtime.resume_dir(), keep_bytes=resume.keep_limit_bytes())
        problem = store.check()  # before the UNet loads: one warning, and the run goes on without states
        if problem:
            store.disable(f"{problem}: set {runtime.RESUME_ENV} to a writable folder")
        unet = sonic_model.load("unet")
        device = next(unet.parameters()).device
        n_windows = smp.window_count(int(sonic_audio.num_frames), settings)
        window_batch, rows = smp.plan_batching(  # 0 = auto, from the memory left with the UNet loaded
            runtime.free_memory(device),
            h_img // cfg.VAE_SCALE,
            w_img // cfg.VAE_SCALE,
            settings.frames_per_window,
            sonic_model.dtype,
            n_windows,
            max(int(window_batch), 0),
            0 if str(guidance_rows) == "auto" else int(guidance_rows),
            smp.clip_state_bytes(int(sonic_audio.num_frames), h_img // cfg.VAE_SCALE, w_img // cfg.VAE_SCALE,
                                 sonic_audio.cond_tokens.shape, sonic_model.dtype),
        )
        settings = dataclasses.replace(settings, guidance_rows=rows)
        log.info(
            "Sonic sampler: %d frames, %d windows x %d steps, %d window(s) x %d guidance row(s) a UNet call",
            sonic_audio.num_frames,
            n_windows,
            n_run,
            window_batch,
            rows,
        )
        progress = runtime.Progress(n_run * n_windows, "Sonic sampler")
        preview = runtime.latent_previewer()

        def callback(done, total, x):
            progress.update(done - progress.current, preview(x[:1].float()) if preview else None)

        latents = smp.generate(
            unet,
            vae,
            clip_vision,
            image,
            face_mask,
            sonic_audio,
            sonic_motion,
            settings=settings,
            seed=int(seed),
            dtype=sonic_model.dtype,
            window_batch=int(window_batch),
            noise=noise,
            callback=callback,
            on_step=on_step,
            resume=store,  # a crashed run continues here; an identical finished one is returned at once
        )  # [F,4,h,w] VAE space
        latent = {"samples": latents.to(runtime.intermediate_device())}
        if store.kept is not None:  # tells Latent Segment that a forgetful cache costs no second sampling
            latent[runtime.KEPT_RESULT_KEY] = str(store.kept)
        return (latent, float(sonic_audio.fps))


NODE_CLASS_MAPPINGS = {"SonicSampler": SonicSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicSampler": "Sonic Sampler (position shift)"}
