"""The whole Sonic chain without ComfyUI: image + audio files -> mp4 (``python -m sonic_core animate``).

The same sonic_core calls the nodes make, in the order of the basic workflow: load models ->
whisper audio encode -> face mask -> motion buckets -> position-shift sampler -> temporal VAE
decode -> RIFE 2x -> PyAV encode with the audio. Devices and dtypes are arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import (
    DIST_ERROR_EXIT,
    DIST_TIMEOUT_S,
    GENERATED_FPS,
    LIMITS,
    OUTPUT_FPS,
    PASTE_FACE_SCALE,
    PASTE_FEATHER,
    PASTE_REGION,
    PASTE_REGIONS,
    RESULT_KEEP_ENV,
    RESULT_KEEP_MB,
    RIFE_BATCH,
    RIFE_MULTIPLIER,
    SAMPLER_DEFAULTS,
    U8_MAX,
    VAE_SCALE,
    VIDEO_CRF,
)
from . import conversation
from . import identify
from .audio_file import read_audio, wav_declared_seconds  # noqa: F401 (the file readers live there)
from .paths import FILE, FOLDER, check_input, path_problem
from .resume import ResumeStore

log = logging.getLogger(__name__)

MODELS_ENV = "SONIC_MODELS_DIR"  # default for --models
DEFAULT_MODELS_DIR = os.path.join("models", "sonic")
SONIC_REPO = "LeonJoe13/Sonic"  # Hugging Face: Sonic/*.pth, RIFE/flownet.pkl, yoloface_v5m.pt
WHISPER_REPO = "openai/whisper-tiny"
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
SVD_FOLDER = "stable-video-diffusion-img2vid-xt"
WHISPER_FOLDER = "whisper-tiny"


@dataclass(frozen=True)
class WeightFile:
    """One file or folder a full run needs, where it goes under the models folder, and its source."""

    path: str  # relative to the models folder
    what: str
    size: str
    source: str
    license: str
    folder: bool = False


WEIGHTS = (
    WeightFile("Sonic/unet.pth", "Sonic UNet (SVD-xt + audio attention)", "6.3 GB",
               f"huggingface.co/{SONIC_REPO}", "CC BY-NC-SA 4.0"),
    WeightFile("Sonic/audio2token.pth", "audio -> 32 tokens per frame", "217 MB",
               f"huggingface.co/{SONIC_REPO}", "CC BY-NC-SA 4.0"),
    WeightFile("Sonic/audio2bucket.pth", "audio + image -> motion buckets", "87 MB",
               f"huggingface.co/{SONIC_REPO}", "CC BY-NC-SA 4.0"),
    WeightFile("yoloface_v5m.pt", "YOLOv5-face detector (TorchScript)", "0.1 GB",
               f"huggingface.co/{SONIC_REPO}", "GPL-3.0 (YOLOv5-face)"),
    WeightFile("RIFE/flownet.pkl", "RIFE HDv3 frame interpolation", "12 MB",
               f"huggingface.co/{SONIC_REPO}", "MIT (RIFE)"),
    WeightFile(WHISPER_FOLDER, "whisper-tiny (config.json, model.safetensors, preprocessor_config.json)",
               "151 MB", f"huggingface.co/{WHISPER_REPO}", "Apache-2.0", folder=True),
    WeightFile(SVD_FOLDER, "SVD-xt's fp16 VAE (vae/) and CLIP image encoder (image_encoder/)", "1.46 GB",
               f"huggingface.co/{SVD_REPO}", "Stability AI Community License", folder=True),
)
DOWNLOAD_TOTAL = "8.3 GB"  # the sizes above added up
WEIGHT_MODELS = {"Sonic/unet.pth": identify.UNET, "Sonic/audio2token.pth": identify.AUDIO2TOKEN,
                 "Sonic/audio2bucket.pth": identify.AUDIO2BUCKET, "yoloface_v5m.pt": identify.DETECTOR,
                 "RIFE/flownet.pkl": identify.RIFE, WHISPER_FOLDER: identify.WHISPER,
                 SVD_FOLDER: identify.SVD}  # what each weight path must hold (sonic_core.identify)


@dataclass(frozen=True)
class Download:
    """One ``hf download`` call: the files the pack reads from one Hub repository, into one folder."""

    repo: str
    files: tuple[str, ...]
    folder: str  # relative to the models folder; "" is the models folder itself
    gated: bool = False  # the repository's page asks you to accept its licence first

    def destination(self, models_dir: str | os.PathLike) -> str:
        return str(Path(models_dir) / self.folder) if self.folder else str(models_dir)

    def command(self, models_dir: str | os.PathLike, files: tuple[str, ...] | None = None) -> str:
        """The shell command (huggingface_hub 0.34 and later install ``hf``; huggingface-cli is gone)."""
        names = " ".join(files or self.files)
        return f"hf download {self.repo} {names} --local-dir {self.destination(models_dir)}"


# Only the files the pack reads. SVD-xt's repository also holds multi-GB files it never reads (its
# UNet, which Sonic's own replaces, two single-file checkpoints, fp32 copies); the official pipeline
# loads the fp16 VAE and image encoder, as here.
DOWNLOADS = (
    Download(SONIC_REPO, ("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth",
                          "yoloface_v5m.pt", "RIFE/flownet.pkl"), ""),
    Download(WHISPER_REPO, ("config.json", "model.safetensors", "preprocessor_config.json"), WHISPER_FOLDER),
    Download(SVD_REPO, ("model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
                        "image_encoder/config.json", "image_encoder/model.fp16.safetensors"), SVD_FOLDER,
             gated=True),
)
HF_INSTALL = "pip install -U huggingface_hub"  # brings the hf command
GATED_STEPS = ("{repo} is gated: open https://huggingface.co/{repo}, log in and accept its licence, then run "
               "'hf auth login' once with a read token from https://huggingface.co/settings/tokens")


class MissingWeights(FileNotFoundError):
    """Raised with a message that lists every missing file, where it goes and where it is published."""


def missing_weights(models_dir: str | os.PathLike, need_detector: bool = True,
                    need_rife: bool = True) -> list[WeightFile]:
    root = Path(models_dir)
    if os.path.lexists(root):  # a models folder that is a file, a FIFO, a loop... is said as such
        check_input(root, "models folder", FOLDER, fix=f"give --models (or ${MODELS_ENV}) a folder")
    skip = set()
    if not need_detector:
        skip.add("yoloface_v5m.pt")
    if not need_rife:
        skip.add("RIFE/flownet.pkl")
    out = []
    for w in WEIGHTS:
        p = root / w.path
        if w.path in skip:
            continue
        problem = path_problem(p, FOLDER if w.folder else FILE, allow_empty=True)  # the loader says "empty"
        if problem is None:
            continue
        if problem[1] == "does not exist":  # nothing there: listed with its download
            out.append(w)
            continue
        with identify.expecting(p, WEIGHT_MODELS[w.path]):  # something else is there: say what
            check_input(p, w.what, FOLDER if w.folder else FILE,
                        fix=f"it must be a {'folder' if w.folder else 'file'} (see README 'Weights'); move it "
                            "away and download it again")
    return out


def _download_plan(missing: list[WeightFile]) -> list[tuple[Download, tuple[str, ...]]]:
    """(download, files) for every repository that holds a missing weight: single files by name,
    a folder (whisper, SVD) whole."""
    paths = {w.path for w in missing}
    plan = []
    for d in DOWNLOADS:
        files = d.files if d.folder in paths else tuple(f for f in d.files if f in paths)
        if files:
            plan.append((d, files))
    return plan


def missing_message(models_dir: str | os.PathLike, missing: list[WeightFile]) -> str:
    lines = [f"{len(missing)} weight file(s) missing under {Path(models_dir).resolve()}:"]
    for w in missing:
        lines.append(f"  {w.path:<38} {w.what} ({w.size}) from {w.source} [{w.license}]")
    plan = _download_plan(missing)
    lines += ["First: " + GATED_STEPS.format(repo=d.repo) + "." for d, _files in plan if d.gated]
    lines.append(f"Download them (all weights: {DOWNLOAD_TOTAL}) with huggingface_hub's hf command "
                 f"({HF_INSTALL}):")
    lines += [f"  {d.command(models_dir, files)}" for d, files in plan]
    lines.append("or run this command again with --download. Sonic weights are CC BY-NC-SA 4.0: "
                 "non-commercial use only.")
    return "\n".join(lines)


def download_weights(models_dir: str | os.PathLike, need_detector: bool = True,
                     need_rife: bool = True) -> None:
    """Fetch the missing weights, file by file, with huggingface_hub (online machines only)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise RuntimeError(f"--download needs huggingface_hub: {HF_INSTALL}") from e
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    for d, files in _download_plan(missing_weights(root, need_detector, need_rife)):
        for name in files:
            log.info("downloading %s/%s -> %s", d.repo, name, d.destination(root))
            try:
                hf_hub_download(d.repo, name, local_dir=d.destination(root))
            except GatedRepoError as e:
                raise MissingWeights(f"{d.repo}/{name}: access refused. {GATED_STEPS.format(repo=d.repo)}; "
                                     f"then run again, or download by hand: {d.command(root, files)}") from e


# ----------------------------------------------------------------------------------------------
# Files in and out
# ----------------------------------------------------------------------------------------------
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP",
                    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}  # first bytes of each format
IMAGE_SIGNATURE_BYTES = 8  # the longest signature above
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image file as ComfyUI's LoadImage gives it: IMAGE [1,H,W,3] in 0..1 (EXIF-rotated; 16-bit,
    float, palette, CMYK... images read as image.pil_pixels says), and a MASK [1,H,W] from the alpha
    channel or a tRNS colour, 1 where transparent (None without transparent pixels). Whether that mask
    marks the face is face.judge_mask's call. An image under MIN_IMAGE_SIDE is refused from its
    header, before its pixels are decoded."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    from . import imagefile
    from .budget import check_image_read
    from .image import check_image_size, pil_pixels

    check_input(path, "image", fix="give an image file (png, jpg, webp)")  # what a non-file really is
    try:
        with warnings.catch_warnings():  # Pillow only warns below twice its limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except PermissionError as e:
        raise PermissionError(e.errno, f"image {path} cannot be opened ({e.strerror}): give this user read "
                                       "permission or copy the image somewhere readable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image {path} refused: {e} Resize it to a portrait of a few megapixels "
                         "(the model works at 512 px)") from None
    except UnidentifiedImageError as e:
        with open(path, "rb") as f:
            head = f.read(IMAGE_SIGNATURE_BYTES)
        kind = next((k for sig, k in IMAGE_SIGNATURES.items() if head.startswith(sig)), None)
        layout = imagefile.tiff_layout(path) if kind == "TIFF" else None
        if layout is not None:  # a TIFF whose header parses: a layout Pillow does not read (CMYK + alpha)
            raise ValueError(f"image {path} is a TIFF of {layout}: Pillow, the image library used here, cannot "
                             "read that layout. Convert it to RGB or RGBA (an image editor's Image > Mode, or "
                             "`magick in.tif -colorspace sRGB out.png`) and give that file") from None
        if kind is not None:  # an image file whose header does not parse: damaged, not a wrong format
            raise ValueError(f"image {path} cannot be read: it starts like a {kind} file but its header is "
                             "damaged; open and re-save it in an image editor, or download/copy it again") \
                from None
        raise ValueError(f"image {path} is not an image Pillow can read ({e}); use png, jpg or webp") \
            from None
    except IMAGE_DECODE_ERRORS as e:
        raise ValueError(f"image {path} cannot be read ({type(e).__name__}: {e}): the file is damaged; "
                         "open and re-save it in an image editor, or download/copy it again") from None
    with im:
        check_image_size(*im.size, what=f"image {path}")
        check_image_read(*im.size, what=f"image {path}")  # its pixels and their float32 copy: before decoding
        try:
            with imagefile.strict_pillow():  # truncated data raises, whatever another pack set
                im.load()
            imagefile.check_complete(im, path)  # pixel data shorter than the header says (a PNG: black rows)
            ImageOps.exif_transpose(im, in_place=True)  # no copy of an upright photo
            rgb, transparency = pil_pixels(im)  # [H,W,3], [H,W] or None
        except imagefile.TruncatedImage:
            raise
        except IMAGE_DECODE_ERRORS as e:
            raise ValueError(f"image {path} cannot be decoded ({e}): the file is damaged or incomplete (an "
                             "interrupted download or copy?); open and re-save it in an image editor, or "
                             "download/copy it again") from None
    mask = None
    if transparency is not None and (transparency > 0).any():
        mask = torch.from_numpy(transparency)[None]  # [1,H,W], 1 where transparent
    return torch.from_numpy(rgb)[None], mask


# ----------------------------------------------------------------------------------------------
# The chain
# ----------------------------------------------------------------------------------------------
@dataclass
class AnimateSettings:
    steps: int = SAMPLER_DEFAULTS.steps
    seed: int = SAMPLER_DEFAULTS.seed
    min_resolution: int = SAMPLER_DEFAULTS.min_resolution
    dynamic_scale: float = SAMPLER_DEFAULTS.motion_bucket_scale
    crop: bool = False  # the official demo.py crops only with --crop
    interpolate: bool = True
    max_seconds: float = 0.0
    frames_per_window: int = SAMPLER_DEFAULTS.frames_per_window
    window_batch: int = 1  # 0 = as many as free GPU memory allows
    guidance_rows: int = 0  # CFG rows per UNet call: 3, 1 (low VRAM) or 0 = from free GPU memory
    weight_dtype: str = "default"  # UNet weight storage: "default" (= dtype) or "fp8_e4m3fn"
    crf: int = VIDEO_CRF
    paste_back: bool = False  # with crop: the animated crop blended back into the whole photo, at its size
    paste_feather: float = PASTE_FEATHER  # soft edge, fraction of the pasted region's shorter side
    paste_region: str = PASTE_REGION  # "crop" or "face"


Progress = Callable[[str, int, int], None]  # (stage, done, total)


@torch.no_grad()
def animate(image_path: str | os.PathLike, audio_path: str | os.PathLike, output: str | os.PathLike,
            models_dir: str | os.PathLike, settings: AnimateSettings | None = None, *,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            svd_dir: str | os.PathLike | None = None, progress: Progress | None = None,
            state_dir: str | os.PathLike | None = None, resume: bool = False, keep_result: bool = True,
            group=None) -> Path | None:
    """Image + audio files -> ``output`` (.mp4 with the audio). Returns the output path.

    The sampler's state is saved after every denoising step in ``state_dir`` (default: a hidden
    ``.<output name>.resume`` folder beside the output); with ``resume`` a run with the same inputs
    continues from the last saved step (sonic_core/resume.py). The final latents stay as a state until
    the video is written (a crash while decoding or encoding loses no sampling: ``resume`` then goes
    straight to decoding); then the state goes.
    With an explicit ``state_dir`` (and ``keep_result``) the final latents stay there too, up to
    RESULT_KEEP_MB / $SONIC_KEEP_MB in all: a later run with equal inputs (another -o, crf, RIFE
    choice) skips the sampler. A ``state_dir`` that cannot hold states is refused up front
    (ValueError); the default one only turns resume off, with a warning.
    ``group``: a torch.distributed process group (torchrun): the ranks share the sampler's windows
    (sonic_core/distributed.py); rank 0 alone decodes and writes the video, the others return None
    once sampling ends.
    """
    settings = settings or AnimateSettings()
    from . import audio as audio_mod
    from . import distributed, face, lowvram, motion, sampler, weights
    from . import image as image_mod
    from .models import svd

    from . import budget, preflight

    # everything that can be checked without a model, first: numbers, output, inputs, memory
    output = preflight.check_output(output)
    preflight.check_settings(settings, OUTPUT_FPS if settings.interpolate else GENERATED_FPS)
    models_dir = Path(models_dir)
    if svd_dir is not None:
        with identify.expecting(svd_dir, identify.SVD):  # a file or another model's folder: says which
            check_input(svd_dir, "--svd", FOLDER, fix=f"give the diffusers SVD-xt folder ({SVD_REPO})")
    device = torch.device(device)
    image, alpha_mask = read_image(image_path)
    wave, rate = read_audio(audio_path, settings.max_seconds)  # [1,C,T]: decoding stops at the cap's needs
    estimate = preflight.estimate_run(tuple(image.shape[1:3]), wave.shape[-1], rate, settings, dtype, device,
                                      channels=wave.shape[1])
    preflight.check_frame_count(estimate.frames, settings.interpolate)  # RIFE with one frame: before loading
    budget.check_fits(estimate, device, "this run")
    preflight.check_output_space(output, tuple(image.shape[1:3]), wave.shape[-1], rate, settings)
    detector_path = models_dir / "yoloface_v5m.pt"
    # transparency marks the face only if it plausibly is a face mask; else the detector finds it
    alpha_face = alpha_mask is not None and face.judge_mask(alpha_mask[0]).kind == "face"
    missing = missing_weights(models_dir, need_detector=not alpha_face, need_rife=settings.interpolate)
    if svd_dir is not None:
        missing = [w for w in missing if w.path != SVD_FOLDER]
    if missing:
        if alpha_mask is not None and not alpha_face and any(w.path == detector_path.name for w in missing):
            log.warning("image %s: %s; the face detector is needed to find the face", image_path,
                        face.judge_mask(alpha_mask[0], "its transparency").why)
        raise MissingWeights(missing_message(models_dir, missing))
    store = state_store(output, state_dir, resume, keep_result)  # before any model loads

    def stage(name: str) -> Callable[..., None] | None:
        if progress is None:
            return None
        return lambda done, total, *_: progress(name, done, total)

    # the detector first: a refused file (see models/torchscript_check.py) stops before the big loads
    detector = None if alpha_face else face.load_detector(str(detector_path), device)
    t0 = time.perf_counter()
    models = weights.load_sonic_models(models_dir / "Sonic" / "unet.pth", models_dir / "Sonic" / "audio2token.pth",
                                       models_dir / "Sonic" / "audio2bucket.pth", models_dir / WHISPER_FOLDER,
                                       dtype=dtype, device=device, load_device=device,
                                       weight_dtype=lowvram.WEIGHT_DTYPES[settings.weight_dtype])
    vae, clip = svd.load_svd(svd_dir or models_dir / SVD_FOLDER, dtype, device)
    log.info("models loaded in %.1f s", time.perf_counter() - t0)

    sonic_audio = audio_mod.encode_audio(models, wave, rate, settings.max_seconds, callback=stage("audio"),
                                         out_device=torch.device("cpu"))
    found = face.detect_face_mask(image, detector=detector, mask=alpha_mask, crop=settings.crop,
                                  mask_name=f"the transparency of {Path(image_path).name}")
    paste = image_mod.PasteBack(image, found.box, settings.paste_feather, settings.paste_region) \
        if settings.paste_back else None
    ref_image, ref_mask = found.image[None], found.mask[None]  # [1,h,w,3], [1,h,w]
    embeds = motion.reference_embeds(clip, ref_image, settings.min_resolution)
    sonic_motion = motion.predict_motion(models.load("audio2bucket"), sonic_audio, embeds,
                                         settings.dynamic_scale, settings.dynamic_scale)
    run = dataclasses.replace(SAMPLER_DEFAULTS, steps=settings.steps, min_resolution=settings.min_resolution,
                              frames_per_window=settings.frames_per_window)
    w_img, h_img = image_mod.working_size(ref_image.shape[2], ref_image.shape[1], settings.min_resolution)
    window_batch, rows = sampler.plan_batching(  # 0 = auto, from what the loaded models leave free
        budget.device_free_bytes(device), h_img // VAE_SCALE, w_img // VAE_SCALE, run.frames_per_window,
        dtype, sampler.window_count(sonic_audio.num_frames, run), settings.window_batch, settings.guidance_rows,
        sampler.clip_state_bytes(sonic_audio.num_frames, h_img // VAE_SCALE, w_img // VAE_SCALE,
                                 sonic_audio.cond_tokens.shape, dtype))
    run = dataclasses.replace(run, guidance_rows=rows)
    log.info("sampler: %d window(s) x %d guidance row(s) per UNet call", window_batch, rows)
    latents = sampler.generate(models.load("unet"), vae, clip, ref_image, ref_mask, sonic_audio, sonic_motion,
                               settings=run, seed=settings.seed, dtype=dtype, window_batch=window_batch,
                               callback=stage("sampling"), resume=store,
                               group=group)  # [F,4,h,w] VAE space
    if group is not None and distributed.rank_of(group) != 0:
        return None  # rank 0 decodes and writes the video (the state folder is rank 0's too)
    with sampling_kept_until_written(store):
        frames, fps = write_animation(vae, latents, rife_path=models_dir / "RIFE" / "flownet.pkl", paste=paste,
                        wave=wave, rate=rate, fps=sonic_audio.fps, size=(w_img, h_img), output=output,
                        settings=settings, device=device, dtype=dtype, callback=stage("encoding"))
    log.info("%s: %d frames at %g fps in %.1f s", output, frames, fps, time.perf_counter() - t0)
    return output


@contextlib.contextmanager
def sampling_kept_until_written(store: ResumeStore):
    """The sampler's final latents (held by ``store``, resume.py hold_final) stay on disk until the
    block, which writes the video, ends without an error; then they go, with the folder if empty.
    A failure (full disk, a crash) leaves them, with a line saying that --resume goes on from them."""
    try:
        yield
    except Exception:
        if store.held is not None:
            log.warning("the finished sampling is kept in %s: run the same command again with --resume to "
                        "go straight to decoding", store.held)
        raise
    store.release()
    store.remove_folder_if_empty()


def write_animation(vae, latents: torch.Tensor, *, rife_path: Path, paste, wave: torch.Tensor, rate: int,
                    fps: float, size: tuple[int, int], output: Path, settings: AnimateSettings,
                    device: torch.device, dtype: torch.dtype, callback) -> tuple[int, float]:
    """Latents [F,4,h,w] -> ``output``: temporal VAE decode -> RIFE (settings.interpolate) -> paste back
    -> PyAV encode with the audio ``wave`` [1,C,T], streamed in decoder chunks. Returns (frames, fps)."""
    from . import budget, lowvram, stream, video
    from .models.rife import load_rife

    w_img, h_img = size
    rife = None
    if settings.interpolate:
        rife = load_rife(str(rife_path), device)
        fps = OUTPUT_FPS
    # decode -> RIFE -> encode stream in temporal-decoder chunks: memory does not grow with length
    # (the encoding bar counts output frames, so it covers decode and RIFE too)
    free = budget.device_free_bytes(device)  # None on a CPU: the official chunk and the default batch
    chunk = lowvram.auto_decode_chunk(free, h_img, w_img, dtype, vae.decode_chunk_size)
    pairs = lowvram.auto_rife_batch(free, h_img, w_img, torch.float32, cpu=RIFE_BATCH)  # RIFE runs in fp32
    frames = stream.video_frames(vae, latents, chunk, rife, RIFE_MULTIPLIER, pairs, paste=paste)
    fmt = {".mp4": "h264-mp4", ".webm": "vp9-webm", ".gif": "gif"}[output.suffix.lower()]
    output.parent.mkdir(parents=True, exist_ok=True)
    video.write_video(frames, str(output), fps, audio=(wave[0], rate), format=fmt, crf=settings.crf,
                      callback=callback)
    return len(frames), fps


def state_store(output: Path, state_dir: str | os.PathLike | None, resume: bool,
                keep_result: bool) -> ResumeStore:
    """The run's ResumeStore, its folder checked (and left as it was). A ``state_dir`` the user named
    that cannot hold states is a ValueError naming it; the default one (hidden, beside the output,
    removed once empty: it keeps no results) turns resume off with one warning."""
    from .resume import keep_limit_bytes

    if state_dir is None:
        store = ResumeStore(output.parent / f".{output.name}.resume", resume=resume, hold_final=True)
    else:
        store = ResumeStore(state_dir, resume=resume, keep_bytes=keep_limit_bytes() if keep_result else 0,
                            hold_final=True)
    problem = store.check()
    if problem and state_dir is not None:
        raise ValueError(f"--state-dir: {problem}: choose a writable folder, or leave --state-dir out "
                         "(the state then goes beside -o)")
    if problem:
        store.disable(problem)
    return store


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name != "auto":
        from .preflight import check_device

        return check_device(name)  # ValueError for a bogus name or a GPU this build cannot use
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name != "auto":
        return table[name]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def _span(key: str, default: float | None = None) -> str:
    """``default; lo-hi`` of a number's limit (or the CLI's own ``default``), for --help."""
    limit = LIMITS[key]
    return f"{limit.default if default is None else default:g}; {limit.lo:g}-{limit.hi:g}"


class GivenFlag(argparse.Action):
    """Stores the value like argparse's default action and records the flag as given on the command
    line (``args.given_flags``: flag -> value), which a default alone cannot tell."""

    RECORD = "given_flags"

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, self.RECORD, {**getattr(namespace, self.RECORD, {}), option_string: values})


def configure_cli(p) -> None:
    p.add_argument("image", help="portrait image (png/jpg/webp; transparent pixels mark the face if any)")
    p.add_argument("audio", nargs="?", default=None,
                   help="speech or singing (wav/mp3/flac/m4a/... or a video with sound); with --voice, leave it out")
    p.add_argument("-o", "--output", default=None, help="video to write (.mp4, .webm or .gif); never overwritten")
    p.add_argument("--models", default=os.environ.get(MODELS_ENV, DEFAULT_MODELS_DIR),
                   help=f"models folder (default ${MODELS_ENV} or {DEFAULT_MODELS_DIR}); see README 'Weights'")
    p.add_argument("--svd", default=None, help=f"diffusers SVD-xt folder (default MODELS/{SVD_FOLDER})")
    # every number: the default and range of the node input it stands for (config.LIMITS, checked by
    # preflight.check_settings before anything is read)
    p.add_argument("--steps", type=int, default=LIMITS["steps"].default, help=f"denoising steps ({_span('steps')})")
    p.add_argument("--seed", type=int, default=LIMITS["seed"].default, help="noise seed (72589)")
    p.add_argument("--min-resolution", type=int, default=LIMITS["min_resolution"].default,
                   help=f"short side before rounding to a multiple of 64 ({_span('min_resolution')})")
    p.add_argument("--dynamic-scale", type=float, default=LIMITS["motion_scale"].default,
                   help=f"motion intensity: 0.5 mild, 1.0 normal, 2.0 intense ({_span('motion_scale')})")
    p.add_argument("--crop", action="store_true", help="crop a square around the face first (official --crop)")
    p.add_argument("--paste-back", action="store_true",
                   help="with --crop: paste the animated crop back into the whole photo, so the video has the "
                        "photo's own size (outside the crop it is the photo)")
    p.add_argument("--paste-feather", type=float, default=PASTE_FEATHER, action=GivenFlag,
                   help=f"paste-back soft edge, a fraction of the pasted region's shorter side ({PASTE_FEATHER:g})")
    p.add_argument("--paste-region", default=PASTE_REGION, choices=list(PASTE_REGIONS), action=GivenFlag,
                   help=f"paste-back area: the whole crop square (default) or the face box scaled by "
                        f"{PASTE_FACE_SCALE:g}")
    p.add_argument("--no-interpolate", action="store_true", help="keep 12.5 fps (skip RIFE 2x)")
    p.add_argument("--max-seconds", type=float, default=LIMITS["max_seconds"].default,
                   help=f"use only the first N seconds of audio; only those are decoded ({_span('max_seconds')}, "
                        "0 = all)")
    p.add_argument("--window-batch", type=int, default=1,
                   help="windows per UNet call (more = faster, more memory; 0 = as many as free GPU memory "
                        f"allows; {_span('window_batch', 1)})")
    p.add_argument("--guidance-rows", default="auto", choices=["auto", "3", "1"],
                   help="guidance branches per UNet call: 3 (fastest), 1 (a third of the activation memory: "
                        "512x512 on an 8 GB GPU), auto (3 if free GPU memory allows); same result either way")
    p.add_argument("--weight-dtype", default="default", choices=["default", "fp8_e4m3fn"],
                   help="UNet weight storage: default (= --dtype, 3.0 GB in fp16) or fp8_e4m3fn (1.5 GB, "
                        "upcast per layer; results differ slightly, README 'Low VRAM')")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="UNet/VAE/CLIP dtype (auto: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same inputs from its last finished step (straight "
                        "from decoding when its sampling had finished)")
    p.add_argument("--state-dir", default=None,
                   help="where the sampler saves its state after every step (default: .OUTPUT.resume beside "
                        "-o); a given folder also keeps finished samplings (see --no-keep-result)")
    p.add_argument("--no-keep-result", action="store_true",
                   help=f"with --state-dir: neither keep this run's final latents nor use kept ones (by "
                        f"default an identical run skips the sampler; up to ${RESULT_KEEP_ENV} MiB in all, "
                        f"{RESULT_KEEP_MB} by default, the oldest removed first)")
    p.add_argument("--download", action="store_true",
                   help="download the missing weights (only the files used) with huggingface_hub first")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                   help=f"under torchrun: seconds a rank waits for the others at an exchange before it fails "
                        f"({DIST_TIMEOUT_S:g}; covers model loading and audio encoding before the first one)")
    conversation.configure_cli(p)  # --voice, --timeline, --speaker, --preview-faces (several faces)


PASTE_ONLY_FLAGS = ("--paste-feather", "--paste-region")  # they shape --paste-back and nothing else


def check_paste_flags(args) -> None:
    """``--paste-feather`` / ``--paste-region`` given without ``--paste-back`` are refused (ValueError
    naming the flag and its value), not silently ignored."""
    given = getattr(args, GivenFlag.RECORD, {})
    for flag in PASTE_ONLY_FLAGS:
        if flag in given and not args.paste_back:
            raise ValueError(f"{flag} {given[flag]} only shapes --paste-back, which is off: add --crop "
                             f"--paste-back to paste the animated crop back into the photo, or leave {flag} out")


def run_cli(args) -> int:
    from .preflight import check_output, check_settings
    from .progress import CliProgress

    check_paste_flags(args)  # before any other check, download or weight
    settings = AnimateSettings(steps=args.steps, seed=args.seed, min_resolution=args.min_resolution,
                               dynamic_scale=args.dynamic_scale, crop=args.crop,
                               interpolate=not args.no_interpolate, max_seconds=args.max_seconds,
                               window_batch=args.window_batch,
                               guidance_rows=0 if args.guidance_rows == "auto" else int(args.guidance_rows),
                               weight_dtype=args.weight_dtype, paste_back=args.paste_back,
                               paste_feather=args.paste_feather, paste_region=args.paste_region)
    check_settings(settings, OUTPUT_FPS if settings.interpolate else GENERATED_FPS)  # before any download
    if conversation.wanted(args):  # several faces, or the numbered face preview
        return conversation.run_cli(args, settings)
    if args.audio is None or args.output is None:
        raise ValueError(f"{'AUDIO' if args.audio is None else '-o/--output'} is missing: animate PHOTO AUDIO -o "
                         "VIDEO (several faces: --voice N=AUDIO, README 'Conversations')")
    limit = LIMITS["dist_timeout"]
    args.dist_timeout = limit.check(args.dist_timeout, limit.flag)
    output = check_output(args.output)
    if args.state_dir is not None:  # a bad --state-dir is refused before any download
        state_store(output, args.state_dir, args.resume, not args.no_keep_result)
    device = pick_device(args.device)
    from . import distributed

    several = distributed.world_size_from_env() > 1  # started by torchrun with more than one rank
    if several and args.download:
        raise ValueError("--download under torchrun would download once per rank: run it once without "
                         "torchrun (or hf download, see README 'Weights'), then start torchrun")
    if args.download and missing_weights(args.models, need_rife=not args.no_interpolate):
        try:
            download_weights(args.models, need_rife=not args.no_interpolate)
        except MissingWeights as e:
            print(str(e), file=sys.stderr)
            return 3
    try:
        with distributed.joined(device, args.dist_timeout) as run:  # run.group None: one process
            main = distributed.rank_of(run.group) == 0
            if not main and not getattr(args, "verbose", False):  # one rank speaks; the others only warn
                logging.getLogger(__package__).setLevel(logging.WARNING)
            progress = CliProgress() if main else None  # tqdm bars on a terminal, else log lines
            with progress.logging_around_bars() if progress else contextlib.nullcontext():
                out = animate(args.image, args.audio, args.output, args.models, settings, device=run.device,
                              dtype=pick_dtype(args.dtype, run.device), svd_dir=args.svd, progress=progress,
                              state_dir=args.state_dir, resume=args.resume,
                              keep_result=not args.no_keep_result, group=run.group)
    except MissingWeights as e:
        print(str(e), file=sys.stderr)
        return 3
    except distributed.DistributedError as e:  # another rank died or stalled: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return DIST_ERROR_EXIT
    if out is not None:
        from .cli import say

        say(f"wrote {out}")  # a closed pipe or full device on stdout does not fail the written video
    return 0
